"""Running a model: jitted prefill/decode and the generation loop (`decode`), sampling, chat
templates and sessions, and perplexity evaluation."""

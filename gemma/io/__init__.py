"""Checkpoints and tokenizers: `checkpoint.load` detects the format (`formats/`); tokenizers
from SentencePiece files, GGUF metadata or tokenizer.json."""

"""The KV cache: float buffers and ring buffers (`cache`), what queries read (`view`), and the
TurboQuant-coded cache (`quant`)."""

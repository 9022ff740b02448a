"""Checkpoint formats; `gemma.io.checkpoint.load` detects which one a path is."""

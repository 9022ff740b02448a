"""Checkpoint formats; `gemma.checkpoint.load` detects which one a path is."""

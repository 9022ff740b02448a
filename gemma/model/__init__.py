"""The model: config and presets, the params pytree and its weight table, layers, attention, MoE
and the forward pass.

Imports nothing above it (no KV cache code except the cache types the forward pass threads
through, no checkpoints, no training)."""

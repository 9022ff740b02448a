"""KV cache: full buffers for global layers, ring buffers of `sliding_window` for local layers,
nothing for KV-shared layers.

Every slot records the absolute position of the token it holds (-1: empty or padding), so masks
come from positions alone: ring wraparound, left padding and bucket padding need no special cases.
Columns of one call are written to slots `(length + t) % S`; all rows of a batch advance together
(left-padded rows simply hold -1 positions in their padding slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma.config import AttentionType, ModelConfig
from gemma.params import pytree_dataclass


@pytree_dataclass
class LayerCache:
  k: jax.Array  # [B, S, K, H]
  v: jax.Array  # [B, S, K, H]
  pos: jax.Array  # [B, S] int32 absolute position held by each slot, -1 if none


@pytree_dataclass
class KVCache:
  layers: tuple[LayerCache | None, ...]  # None for KV-shared layers
  length: jax.Array  # [] int32 columns written so far (the write pointer)
  next_pos: jax.Array  # [B] int32 position of each row's next token

  @property
  def max_length(self) -> int:
    """Columns this cache can take: the global buffers' size (ring buffers never fill up)."""
    sizes = [c.pos.shape[1] for c in self.layers if c is not None]
    return max(sizes)


def cache_size(cfg: ModelConfig, layer: int, max_length: int) -> int:
  spec = cfg.layers[layer]
  if spec.attention is AttentionType.LOCAL:
    return min(spec.window, max_length)
  return max_length


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
  """An empty cache for `batch` rows and up to `max_length` columns (prompt + generated)."""
  layers = []
  for spec in cfg.layers:
    if spec.shares_kv:
      layers.append(None)
      continue
    s = cache_size(cfg, spec.index, max_length)
    shape = (batch, s, spec.num_kv_heads, spec.head_dim)
    layers.append(LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                             pos=jnp.full((batch, s), -1, jnp.int32)))
  return KVCache(layers=tuple(layers), length=jnp.zeros((), jnp.int32),
                 next_pos=jnp.zeros((batch,), jnp.int32))


def write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array,
          start: jax.Array, num_columns: jax.Array) -> LayerCache:
  """Writes the first `num_columns` of this call's K/V at slots `(start + t) % S`.

  Args:
    k, v: [B, T, K, H] this call's keys/values; columns >= num_columns are bucket padding.
    positions: [B, T] their absolute positions (-1 for padding).
    start: [] int32 write pointer; num_columns: [] int32 valid columns.
  Only the last S valid columns are written (earlier ones would be overwritten in the ring).
  """
  s, t = cache.pos.shape[1], k.shape[1]
  col = jnp.arange(t)
  keep = (col < num_columns) & (col >= num_columns - s)
  # [T] slot per column; S (out of range) drops the write
  slots = jnp.where(keep, (start + col) % s, s)
  return LayerCache(
      k=cache.k.at[:, slots].set(k.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[:, slots].set(v.astype(cache.v.dtype), mode="drop"),
      pos=cache.pos.at[:, slots].set(positions.astype(jnp.int32), mode="drop"))


def update_and_view(cache: LayerCache | None, k: jax.Array, v: jax.Array,
                    positions: jax.Array, start: jax.Array, num_columns: jax.Array):
  """Stores this call's K/V and returns what the queries attend to.

  Returns:
    ((k [B, S', K, H], v [B, S', K, H], key_positions [B, S']), new cache or None).
    Without a cache the view is this call's K/V. A single-token call (decode) attends over the
    updated buffer. A multi-token call attends over the old buffer plus its own K/V, because a
    ring buffer may overwrite slots that earlier queries of the same call still need.
  """
  if cache is None:
    return (k, v, positions), None
  new = write(cache, k, v, positions, start, num_columns)
  if k.shape[1] == 1:
    return (new.k, new.v, new.pos), new
  view = (jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1),
          jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1),
          jnp.concatenate([cache.pos, positions.astype(jnp.int32)], axis=1))
  return view, new

"""KV cache: full buffers for global layers, ring buffers of `sliding_window` for local layers,
nothing for KV-shared layers.

Every slot records the absolute position of the token it holds (-1: empty or padding), so masks
come from positions alone: ring wraparound, left padding and bucket padding need no special cases.
Columns of one call are written to slots `(length + t) % S`; all rows of a batch advance together
(left-padded rows simply hold -1 positions in their padding slots).

With `kv_quant` set, layers hold `gemma.kv.quant.QuantLayerCache`s (TurboQuant codes) and the
cache carries the shared rotations (`codec`); attention reads either through a view
(`FloatView` / `QuantView`) with the same two methods, scores(q) and mix(probs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemma.kv import quant as kv_quant_lib
from gemma.kv.view import FloatKV, FloatView, scatter, update_float
from gemma.model.config import AttentionType, ModelConfig
from gemma.model.params import pytree_dataclass

__all__ = ["FloatView", "KVCache", "KVView", "LayerCache", "init_cache", "scatter",
           "rollback", "update_and_view", "view_of"]


LayerCache = FloatKV  # a float layer cache: k, v [B, S, K, H], pos [B, S]

KVView = FloatView | kv_quant_lib.QuantView


@pytree_dataclass
class KVCache:
  layers: tuple[LayerCache | kv_quant_lib.QuantLayerCache | None, ...]  # None: KV-shared layers
  length: jax.Array  # [] int32 columns written so far (the write pointer)
  next_pos: jax.Array  # [B] int32 position of each row's next token
  codec: kv_quant_lib.Codec | None = None  # rotations of a TurboQuant cache

  @property
  def max_length(self) -> int:
    """Columns this cache can take: the global buffers' size (ring buffers never fill up)."""
    sizes = [c.pos.shape[1] for c in self.layers if c is not None]
    return max(sizes)


def cache_size(cfg: ModelConfig, layer: int, max_length: int, slack: int = 0) -> int:
  """Slots of a layer's buffer: `max_length`, or the window for a sliding layer; `slack` more
  for a speculative step that writes `slack` columns it may roll back (`rollback`)."""
  spec = cfg.layers[layer]
  if spec.attention is AttentionType.LOCAL:
    return min(spec.window, max_length) + slack
  return max_length + slack


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32,
               kv_quant: str | kv_quant_lib.KVQuant | None = None, slack: int = 0) -> KVCache:
  """An empty cache for `batch` rows and up to `max_length` columns (prompt + generated).

  kv_quant: None (K/V in `dtype`), "bf16" / "f32" (K/V stored in that dtype), or a TurboQuant
  width of `gemma.kv.quant.KV_QUANTS` ("tq2", "tq2.5", "tq3", "tq3.5", "tq4").
  slack: extra slots in every buffer (ring buffers and a TurboQuant recent window included) for
  a speculative step's verified-then-rejected columns: written, then rolled back (`rollback`),
  they never overwrite a token that is still attended to.
  """
  if isinstance(kv_quant, str) and kv_quant in kv_quant_lib.FLOAT_CACHES:
    dtype, kv_quant = kv_quant_lib.FLOAT_CACHES[kv_quant], None
  spec = kv_quant_lib.get_kv_quant(kv_quant) if kv_quant is not None else None
  layers, dims = [], set()
  for ls in cfg.layers:
    if ls.shares_kv:
      layers.append(None)
      continue
    s = cache_size(cfg, ls.index, max_length, slack)
    if spec is not None:
      layers.append(kv_quant_lib.init_layer(spec, batch, s, ls.num_kv_heads, ls.head_dim,
                                            ls.index, slack))
      dims.add(kv_quant_lib.part_dims(spec, ls.head_dim))
      continue
    shape = (batch, s, ls.num_kv_heads, ls.head_dim)
    layers.append(LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                             pos=jnp.full((batch, s), -1, jnp.int32)))
  codec = kv_quant_lib.make_codec(spec, dims) if spec is not None else None
  return KVCache(layers=tuple(layers), length=jnp.zeros((), jnp.int32),
                 next_pos=jnp.zeros((batch,), jnp.int32), codec=codec)


def update_and_view(cache, codec: kv_quant_lib.Codec | None, k: jax.Array, v: jax.Array,
                    positions: jax.Array, start: jax.Array, num_columns: jax.Array,
                    q: jax.Array | None = None, ring: bool = True):
  """Stores this call's K/V and returns what the queries attend to: the one dispatch point
  between float and TurboQuant caches.

  Args:
    k, v: [B, T, K, H] this call's keys/values; positions [B, T] (-1 for padding).
    start: [] int32 write pointer; num_columns: [] int32 valid columns.
    q: this call's queries [B, T, K, G, H] (a TurboQuant cache fits its key scaling to them).
    ring: the layer's cache is a ring buffer (a sliding-window layer); False for global layers,
      whose cache holds every column of the run.
  Returns:
    (a view (FloatView or QuantView) over [B, S', ...] keys, new cache or None). Without a cache
    the view is this call's K/V. A single-token call (decode) attends over the updated buffer. A
    multi-token call attends over the updated buffer when it is not a ring and has room for
    the call, else over the old buffer plus its own K/V (`update_float`).
  """
  if cache is None:
    return FloatView(k, v, positions), None
  if isinstance(cache, kv_quant_lib.QuantLayerCache):
    return kv_quant_lib.update_and_view(cache, codec, k, v, positions, start, num_columns,
                                        scatter, q)
  return update_float(cache, k, v, positions, start, num_columns, ring)


def view_of(layer, codec: kv_quant_lib.Codec | None) -> KVView:
  """What a query reads from one layer's stored cache (float or TurboQuant), unchanged: an MTP
  drafter attends to the target's cache through it."""
  if isinstance(layer, kv_quant_lib.QuantLayerCache):
    exact = lambda b: None if b is None else FloatView(b.k, b.v, b.pos)  # noqa: E731
    return kv_quant_lib.QuantView(k=layer.k, v=layer.v, pos=layer.pos, k_perm=layer.k_perm,
                                  v_perm=layer.v_perm, k_mean=layer.k_mean,
                                  v_mean=layer.v_mean, k_scale=layer.k_scale, codec=codec,
                                  recent=exact(layer.recent), sink=exact(layer.sink))
  return FloatView(layer.k, layer.v, layer.pos)


def rollback(cache: KVCache, columns: jax.Array, next_pos: jax.Array) -> KVCache:
  """`cache` cut back to `columns` columns, its rows' next positions `next_pos` [B]: the write
  pointer moves back, nothing is erased. A rolled-back column keeps its slot and position until
  the next call overwrites it (the call writes the same columns); until then no query of the
  target sees it: later positions are causally invisible, and a multi-token call that attends
  over a copy of the old buffer drops old entries at or after its first position
  (`gemma.kv.view.drop_stale`). Exact for float and TurboQuant caches, rings and a quantized
  cache's recent window and sink, given `slack` slots (nothing still attended is overwritten).
  An MTP drafter reads the rolled-back K/V, as the reference's assistant does.
  """
  return dataclasses.replace(cache, length=columns, next_pos=next_pos)


"""What queries attend to: the float view of keys/values and the causal/sliding mask.

A view has `pos` (key positions), `kv_heads`, `scores(q)`, `mix(probs)` and `visible(q_pos,
window)`; `FloatView` holds keys and values in floating point, `gemma.kv.quant.QuantView` holds
TurboQuant codes (and, with a recent window, a FloatView of the newest tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemma.model.params import pytree_dataclass
from pallas_kernels import registry


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
  """Key s visible to query t iff k_pos >= 0 and 0 <= q_pos - k_pos (< window).

  q_pos: [B, T]; k_pos: [B, S] -> [B, T, S] bool.
  """
  # [B, T, S]
  delta = q_pos[:, :, None] - k_pos[:, None, :]
  mask = (k_pos[:, None, :] >= 0) & (delta >= 0)
  if window is not None:
    mask &= delta < window
  return mask


@pytree_dataclass
class FloatKV:
  """A float K/V buffer (a layer's cache, or a TurboQuant cache's recent window)."""

  k: jax.Array  # [B, S, K, H]
  v: jax.Array  # [B, S, K, H]
  pos: jax.Array  # [B, S] int32 absolute position held by each slot, -1 if none


@dataclasses.dataclass(frozen=True)
class FloatView:
  """Keys and values in floating point: what queries attend to (and KV-shared layers reuse)."""

  k: jax.Array  # [B, S, K, H]
  v: jax.Array  # [B, S, K, H]
  pos: jax.Array  # [B, S] key positions, < 0 never attended

  @property
  def kv_heads(self) -> int:
    return self.k.shape[2]

  def visible(self, q_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: which keys each query attends to."""
    return causal_mask(q_pos, self.pos, window)

  def scores(self, q: jax.Array) -> jax.Array:
    """q: [B, T, K, G, H] -> logits [B, K, G, T, S] float32 (unscaled)."""
    return jnp.einsum("btkgh,bskh->bkgts", q, self.k, preferred_element_type=jnp.float32)

  def mix(self, probs: jax.Array) -> jax.Array:
    """probs: [B, K, G, T, S] float32 -> [B, T, K, G, H] float32."""
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(self.v.dtype), self.v,
                      preferred_element_type=jnp.float32)

  def attend_blocks(self, q: jax.Array, q_pos: jax.Array, *, window: int | None, scale: float,
                    cap: float | None, block: int, dense) -> jax.Array:
    """Attention without the [T, S] scores: flash attention over blocks of `block` queries and
    keys (the Pallas kernel on a GPU). q: [B, T, K, G, H] -> [B, T, K, G, H] float32; query
    rows that see no key (padding) get 0."""
    del dense
    return registry.call("flash_attention", q, self.k, self.v, q_pos, self.pos, scale=scale,
                         window=window, cap=cap, block_q=block, block_k=block)


def attend_query_blocks(dense, q: jax.Array, q_pos: jax.Array, queries_per_block: int):
  """`dense(q_block, q_pos_block)` over blocks of queries, one after the other (`lax.map`): the
  score buffer is [B, K, G, queries_per_block, S] at a time. q: [B, T, K, G, H]; returns
  [B, T, K, G, H]."""
  b, t = q_pos.shape
  bq = max(1, min(queries_per_block, t))
  extra = -t % bq
  q = jnp.pad(q, [(0, 0), (0, extra)] + [(0, 0)] * (q.ndim - 2))
  q_pos = jnp.pad(q_pos, [(0, 0), (0, extra)], constant_values=-1)
  n = q.shape[1] // bq
  # [n, B, bq, ...]
  blocks = lambda x: jnp.moveaxis(x.reshape(b, n, bq, *x.shape[2:]), 1, 0)  # noqa: E731
  out = jax.lax.map(lambda a: dense(*a), (blocks(q), blocks(q_pos)))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * bq, *out.shape[3:])[:, :t]


def scatter(old, new, start: jax.Array, num_columns: jax.Array):
  """Writes the first `num_columns` columns of `new` at slots `(start + t) % S` of `old`.

  old, new: pytrees with the same structure whose leaves are [B, S, ...] and [B, T, ...];
  columns >= num_columns are bucket padding. Only the last S valid columns are written (earlier
  ones would be overwritten in the ring).
  """
  s = jax.tree.leaves(old)[0].shape[1]
  t = jax.tree.leaves(new)[0].shape[1]
  if t == 1:  # a decode step (its column is valid): an in-place update, never a copy of `old`
    # the barrier keeps XLA from duplicating the update into each reader of the new buffer
    # (the attention and the returned cache), which copied the whole buffer every step
    return jax.lax.optimization_barrier(jax.tree.map(
        lambda o, n: jax.lax.dynamic_update_slice_in_dim(o, n.astype(o.dtype), start % s, axis=1),
        old, new))
  col = jnp.arange(t)
  keep = (col < num_columns) & (col >= num_columns - s)
  # [T] slot per column; S (out of range) drops the write
  slots = jnp.where(keep, (start + col) % s, s)
  return jax.tree.map(lambda o, n: o.at[:, slots].set(n.astype(o.dtype), mode="drop"), old, new)


def drop_stale(old_pos: jax.Array, positions: jax.Array, num_columns: jax.Array) -> jax.Array:
  """Positions [B, S] of an old buffer as a multi-token call sees them beside its own K/V: an
  entry at or after the call's first position is a rolled-back column
  (`gemma.kv.cache.rollback`) that the call rewrites, so it is dropped (-1).
  positions: [B, T] of the call (-1 padding); columns >= num_columns are bucket padding."""
  valid = (positions >= 0) & (jnp.arange(positions.shape[1])[None, :] < num_columns)
  first = jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max), axis=1)
  return jnp.where(old_pos >= first[:, None], -1, old_pos)


def update_float(cache: FloatKV, k: jax.Array, v: jax.Array, positions: jax.Array,
                 start: jax.Array, num_columns: jax.Array,
                 ring: bool = True) -> tuple[FloatView, FloatKV]:
  """Stores this call's K/V [B, T, K, H] in a float buffer; returns (view, new buffer).

  A single-token call (decode), or a call into a buffer that is not a ring (`ring` False: a
  global layer's cache, which holds every column of the run: generate and chat check the
  capacity first) and has room for the call, attends over the updated buffer. Otherwise the call
  attends over the old buffer plus its own K/V (a copy): a ring (or a buffer shorter than the
  call, as evaluation's one-slot cache) may overwrite slots that earlier queries of the same
  call still need.
  """
  positions = positions.astype(jnp.int32)
  k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
  new = FloatKV(*scatter((cache.k, cache.v, cache.pos), (k, v, positions), start, num_columns))
  if k.shape[1] == 1 or (not ring and cache.k.shape[1] >= k.shape[1]):
    return FloatView(new.k, new.v, new.pos), new
  old_pos = drop_stale(cache.pos, positions, num_columns)
  view = FloatView(jnp.concatenate([cache.k, k], axis=1), jnp.concatenate([cache.v, v], axis=1),
                   jnp.concatenate([old_pos, positions], axis=1))
  return view, new

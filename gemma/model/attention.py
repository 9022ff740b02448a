"""Self-attention of one layer: projections, q/k/v norms, RoPE, KV cache and KV sharing, GQA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma.kv import cache as kv_cache
from gemma.kv.cache import KVView
from gemma.model.config import LayerSpec, ModelConfig
from gemma.model.fused import project_qkv
from gemma.model.layers import einsum, rms_norm, rope, softcap
from gemma.model.params import Attention

# Finite so that fully masked rows (padding queries) stay NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend(q: jax.Array, view: KVView, q_pos: jax.Array, *, window: int | None, scale: float,
           cap: float | None = None, blockwise: bool = False, block: int = 512) -> jax.Array:
  """Masked grouped-query attention with an f32 softmax.

  Args:
    q: [B, T, N, H]; view: keys/values [B, S, K, H] (float or TurboQuant) with key positions
      view.pos [B, S] (< 0 never attended); N is a multiple of K (consecutive heads share a KV
      head).
    q_pos: [B, T] absolute positions.
    window: sliding window including self (key kept iff 0 <= q_pos - k_pos < window), or None.
    blockwise: never build the [T, S] scores (`view.attend_blocks`: flash attention over float
      keys, query blocks over TurboQuant codes), in blocks of `block`; query rows that see no
      key (padding) then get 0 instead of an average of values.
  Returns:
    [B, T, N, H]
  """
  b, t, n, h = q.shape
  kh = view.kv_heads
  # [B, T, K, G, H]
  qg = q.reshape(b, t, kh, n // kh, h)

  def dense(qg, q_pos):
    # [B, K, G, T, S]
    logits = softcap(view.scores(qg) * scale, cap)
    # [B, T, S]
    mask = view.visible(q_pos, window)
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    # [B, T, K, G, H]
    return view.mix(probs)

  if blockwise:
    out = view.attend_blocks(qg, q_pos, window=window, scale=scale, cap=cap, block=block,
                             dense=dense)
  else:
    out = dense(qg, q_pos)
  return out.reshape(b, t, n, h).astype(q.dtype)


def attention(p: Attention, x: jax.Array, positions: jax.Array, spec: LayerSpec,
              cfg: ModelConfig, *, shared: KVView | None, cache, codec,
              start: jax.Array, num_columns: jax.Array):
  """One layer's attention.

  Args:
    x: [B, T, D] normed input. positions: [B, T] (-1 for padding).
    shared: the producer layer's K/V view when this layer shares KV (spec.shares_kv).
    cache: this layer's cache (None without a cache, and on KV-shared layers); codec: the
      cache's TurboQuant rotations (None for a float cache).
    start, num_columns: cache write pointer and valid columns of this call.
  Returns:
    (out [B, T, D], the K/V view attended to, the updated layer cache or None).
  """
  rope_cfg = cfg.rope(spec.attention)
  norm = dict(eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  # [B, T, N, H]
  # [B, T, N, H], [B, T, K, H] x 2 (None on KV-shared layers)
  q, k_raw, v = project_qkv(p, x, cfg, spec)
  q = rope(rms_norm(q, p.q_norm, **norm), positions, rope_cfg)
  new_cache = None
  if spec.shares_kv:
    view = shared
  else:
    k = rope(rms_norm(k_raw, p.k_norm, **norm), positions, rope_cfg)
    if cfg.use_v_norm:
      v = rms_norm(v, None, eps=cfg.rms_eps)
    b, t, n, h = q.shape
    kh = k.shape[2]
    view, new_cache = kv_cache.update_and_view(cache, codec, k, v, positions, start,
                                               num_columns, q.reshape(b, t, kh, n // kh, h),
                                               ring=spec.window is not None)
  out = attend(q, view, positions, window=spec.window, scale=cfg.attn_scale,
               cap=cfg.attn_softcap, block=cfg.attention_block,
               blockwise=cfg.attends_blockwise(q.shape[1], view.pos.shape[1]))
  return einsum("btnh,nhd->btd", out, p.o), view, new_cache

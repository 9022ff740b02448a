"""The decoder forward pass: embeddings, per-layer embeddings, the layer stack, tied logits.

`forward(params, tokens, positions, cfg, cache)` is pure; the cache is passed in and returned.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gemma.kv.cache import KVCache, KVView
from gemma.model import fused
from gemma.model.attention import attention
from gemma.model.config import LayerSpec, ModelConfig
from gemma.model.layers import einsum, gelu, rms_norm, softcap
from gemma.model.moe import moe_ffn
from gemma.model.params import Layer, Params


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig, dtype) -> jax.Array:
  """Scaled token embeddings. tokens: [B, T] -> [B, T, D]; sqrt(D) is rounded to `dtype`."""
  x = params.embed[tokens].astype(dtype)
  return x * jnp.asarray(math.sqrt(cfg.embed_dim), dtype)


def per_layer_inputs(params: Params, x: jax.Array, tokens: jax.Array,
                     cfg: ModelConfig) -> jax.Array:
  """Per-layer embeddings (PLE), computed once before layer 0.

  Args:
    x: [B, T, D] scaled token embeddings; tokens: [B, T].
  Returns:
    [B, T, L, P]: layer i reads [:, :, i].
  """
  # [B, T, L, P] projection of the main embedding, normed over P per layer slice
  ctx = einsum("btd,dlp->btlp", x, params.ple_proj) * jnp.asarray(cfg.embed_dim ** -0.5, x.dtype)
  ctx = rms_norm(ctx, params.ple_norm, eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  ids = jnp.where((tokens >= 0) & (tokens < cfg.ple_vocab_size), tokens, 0)
  tok = params.ple_embed[ids].astype(x.dtype) * jnp.asarray(math.sqrt(cfg.ple_dim), x.dtype)
  return (ctx + tok) * jnp.asarray(2 ** -0.5, x.dtype)


def dense_ffn(layer: Layer, h: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Feed-forward branch of a dense layer (before the residual add). [B, T, D] -> [B, T, D]."""
  norm = dict(eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  m = fused.mlp(layer.mlp, rms_norm(h, layer.mlp_pre_norm, **norm))
  return rms_norm(m, layer.mlp_post_norm, **norm)


def decoder_layer(layer: Layer, h: jax.Array, positions: jax.Array, spec: LayerSpec,
                  cfg: ModelConfig, *, ple: jax.Array | None, shared: KVView | None,
                  cache, codec, start, num_columns):
  """One decoder layer. h: [B, T, D]; ple: [B, T, P] or None. Returns (h, kv view, cache)."""
  norm = dict(eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  with jax.named_scope("attn"):
    a, view, new_cache = attention(
        layer.attn, rms_norm(h, layer.attn_pre_norm, **norm), positions, spec, cfg,
        shared=shared, cache=cache, codec=codec, start=start, num_columns=num_columns)
    h = h + rms_norm(a, layer.attn_post_norm, **norm)
  with jax.named_scope("mlp"):
    h = h + (moe_ffn(layer, h, cfg) if layer.moe is not None else dense_ffn(layer, h, cfg))
  if layer.ple is not None:
    with jax.named_scope("ple"):
      # [B, T, P] gate of the raw residual times this layer's per-layer embedding
      g = gelu(einsum("btd,dp->btp", h, layer.ple.gate)) * ple
      g = einsum("btp,pd->btd", g, layer.ple.proj)
      h = h + rms_norm(g, layer.ple.norm, **norm)
  if layer.scalar is not None:
    h = h * layer.scalar.astype(h.dtype)
  return h, view, new_cache


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
            cache: KVCache | None = None, num_columns: jax.Array | None = None,
            logits_at: jax.Array | None = None, return_hidden: bool = False):
  """Runs the decoder over one chunk of tokens.

  Args:
    params: model params (dtype of the computation = dtype of params.embed).
    tokens: [B, T] int32 token ids.
    positions: [B, T] int32 absolute positions, -1 for padding (left or bucket padding).
    cfg: the model config (static under jit).
    cache: a KVCache to attend over and update, or None (attend within the chunk only).
    num_columns: [] int32 number of valid columns (the rest is bucket padding); default T.
    logits_at: [] int32 column whose logits to return as [B, V]; default all columns [B, T, V].
    return_hidden: also return the final-normed hidden states the logits are read from
      ([B, T, D] or [B, D]; what an MTP drafter takes as input).
  Returns:
    (logits float32 [B, T, V] or [B, V], the updated cache or None[, hidden])
  """
  b, t = tokens.shape
  dtype = params.embed.dtype
  if num_columns is None:
    num_columns = jnp.asarray(t, jnp.int32)
  start = cache.length if cache is not None else jnp.zeros((), jnp.int32)
  h = embed(params, tokens, cfg, dtype)
  ple = per_layer_inputs(params, h, tokens, cfg) if cfg.use_ple else None
  views: dict[int, KVView] = {}
  new_layers = []
  for spec, layer in zip(cfg.layers, params.layers, strict=True):
    layer_cache = cache.layers[spec.index] if cache is not None else None
    h, views[spec.index], new_cache = decoder_layer(
        layer, h, positions, spec, cfg, ple=None if ple is None else ple[:, :, spec.index],
        shared=views.get(spec.kv_source), cache=layer_cache,
        codec=cache.codec if cache is not None else None, start=start, num_columns=num_columns)
    new_layers.append(new_cache)
  if logits_at is not None:
    h = jax.lax.dynamic_index_in_dim(h, logits_at, axis=1, keepdims=False)
  h = rms_norm(h, params.final_norm, eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  spec_out = "btd,vd->btv" if h.ndim == 3 else "bd,vd->bv"
  logits = einsum(spec_out, h, params.embed, out_dtype=jnp.float32)
  logits = softcap(logits, cfg.final_softcap)
  extra = (h,) if return_hidden else ()
  if cache is None:
    return logits, None, *extra
  # Each row's next position follows its last valid token.
  valid = jnp.arange(t)[None, :] < num_columns
  last = jnp.max(jnp.where(valid, positions, -1), axis=1)
  next_pos = jnp.where(last >= 0, last + 1, cache.next_pos)
  new_cache = KVCache(layers=tuple(new_layers), length=cache.length + num_columns,
                      next_pos=next_pos, codec=cache.codec)
  return logits, new_cache, *extra

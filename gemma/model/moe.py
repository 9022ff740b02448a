"""Mixture-of-experts feed-forward (26B-A4B): router, top-k experts via ragged_dot, shared MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma.model import fused
from gemma.model.config import ModelConfig
from gemma.model.layers import einsum, gelu, ragged_dot, rms_norm
from gemma.model.params import Layer


def route(x: jax.Array, router, router_scale, expert_scale, top_k: int, eps: float):
  """Reference router: softmax over all experts in f32, top-k, renormalise, per-expert scale.

  Args:
    x: [M, D] raw residual stream.
  Returns:
    (weights [M, k] f32, expert ids [M, k] int32).
  """
  d = x.shape[-1]
  r_in = rms_norm(x, None, eps=eps) * router_scale.astype(x.dtype) * jnp.asarray(d ** -0.5, x.dtype)
  # [M, E]
  probs = jax.nn.softmax(einsum("md,de->me", r_in, router).astype(jnp.float32), axis=-1)
  weights, ids = jax.lax.top_k(probs, top_k)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights * expert_scale.astype(jnp.float32)[ids], ids


def experts(x: jax.Array, weights: jax.Array, ids: jax.Array, gate, up, down) -> jax.Array:
  """Weighted sum of each token's top-k experts, computed as grouped (ragged) matmuls.

  Args:
    x: [M, D]; weights, ids: [M, k]; gate, up: [E, D, I]; down: [E, I, D].
  Returns:
    [M, D]
  """
  m, k = ids.shape
  num_experts = gate.shape[0]
  flat_ids = ids.reshape(-1)
  # [A] assignments sorted by expert so each expert's rows are contiguous
  order = jnp.argsort(flat_ids, stable=True)
  rows = x[order // k]
  group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

  # [A, I]
  hidden = gelu(ragged_dot(rows, gate, group_sizes)) * ragged_dot(rows, up, group_sizes)
  # [A, D] back in (token, slot) order
  out = jnp.zeros_like(rows).at[order].set(ragged_dot(hidden, down, group_sizes))
  out = out.reshape(m, k, -1).astype(jnp.float32) * weights[..., None]
  return jnp.sum(out, axis=1).astype(x.dtype)


def moe_ffn(layer: Layer, h: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Feed-forward branch of a MoE layer (before the residual add). h: [B, T, D] -> [B, T, D]."""
  norm = dict(eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  p = layer.moe
  dense = fused.mlp(layer.mlp, rms_norm(h, layer.mlp_pre_norm, **norm))
  dense = rms_norm(dense, p.dense_post_norm, **norm)
  b, t, d = h.shape
  flat = h.reshape(b * t, d)
  weights, ids = route(flat, p.router, p.router_scale, p.expert_scale, cfg.top_k_experts,
                       cfg.rms_eps)
  routed = experts(rms_norm(flat, p.pre_norm, **norm), weights, ids, p.gate, p.up, p.down)
  routed = rms_norm(routed.reshape(b, t, d), p.post_norm, **norm)
  return rms_norm(dense + routed, layer.mlp_post_norm, **norm)

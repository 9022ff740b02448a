"""Fused input projections: q/k/v as one weight and the MLP's gate/up as one, made at load time.

A decode step at batch 1 is many small matmuls per layer, each a kernel launch on a GPU and a
call on a CPU. Every projection that reads the same normed input is concatenated along its
output axis, so a layer runs one matmul where it ran two or three:

  Attention.qkv   [D, (N + K + K)·H]   q | k | v flattened  (k_eq_v layers: q | k, [D, (N + K)·H])
  Mlp.gate_up     [D, 2F]              gate | up

The separate fields are then None. A float weight is concatenated; a `QArray` is concatenated
code column by code column (its input blocks, rotation and spec are shared), so the fused weight
holds exactly the same codes and scales and computes the same values. Weights that cannot be
concatenated (different quantizers, LoRA-wrapped) stay separate. `unfuse` is the exact inverse:
saving, quantizing, LoRA and NNX work on the separate weights.

  params = fuse(params)               # what `gemma.load` serves by default
  q, k, v = project_qkv(p, x, spec)   # model code: fused or not, the same call
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma.model.config import LayerSpec, ModelConfig
from gemma.model.layers import einsum, gelu
from gemma.model.params import Attention, Layer, Mlp, Params
from gemma.quant.qarray import MATH_LAYOUT, QArray

_QARRAY_PARTS = ("codes", "scales", "qjl", "gamma")


def _concatenable(ws) -> bool:
  """Whether these [D, ...] weights can become one [D, sum] weight (same kind, input, dtype)."""
  if all(isinstance(w, QArray) for w in ws):
    first = ws[0]
    return all(w.spec == first.spec and w.layout == MATH_LAYOUT and w.shape[0] == first.shape[0]
               and w.dtype_name == first.dtype_name
               and all((getattr(w, f) is None) == (getattr(first, f) is None)
                       for f in _QARRAY_PARTS) for w in ws)
  return (all(isinstance(w, jax.Array) for w in ws)
          and len({(w.shape[0], w.dtype) for w in ws}) == 1)


def _concat(ws):
  """[D, *out_i] weights -> [D, Σ prod(out_i)] (a QArray: its stored columns concatenated)."""
  if isinstance(ws[0], QArray):
    parts = {}
    for f in _QARRAY_PARTS:
      if getattr(ws[0], f) is not None:
        # stored [m, *out] -> [m, n_out], columns concatenated
        parts[f] = jnp.concatenate([getattr(w, f).reshape(getattr(w, f).shape[0], -1)
                                    for w in ws], axis=1)
    n_out = sum(w.size // w.shape[0] for w in ws)
    return dataclasses.replace(ws[0], shape=(ws[0].shape[0], n_out), **parts)
  return jnp.concatenate([w.reshape(w.shape[0], -1) for w in ws], axis=1)


def _split(w, shapes):
  """Inverse of `_concat`: [D, Σ] -> weights of [D, *shape] for each output shape."""
  out, start = [], 0
  for shape in shapes:
    n = math.prod(shape)
    if isinstance(w, QArray):
      parts = {f: getattr(w, f)[:, start:start + n].reshape(-1, *shape)
               for f in _QARRAY_PARTS if getattr(w, f) is not None}
      out.append(dataclasses.replace(w, shape=(w.shape[0], *shape), **parts))
    else:
      out.append(w[:, start:start + n].reshape(w.shape[0], *shape))
    start += n
  return out


def _qkv_shapes(cfg: ModelConfig, spec: LayerSpec):
  """Output shapes of the fused q, k (and v) of a layer that owns its K/V."""
  q = (cfg.num_heads, spec.head_dim)
  kv = (spec.num_kv_heads, spec.head_dim)
  return (q, kv) if spec.k_eq_v else (q, kv, kv)


def _fused(ws, consume: bool):
  out = _concat(ws)
  if consume:  # free each separate weight now: peak memory grows by one layer's projections
    for leaf in jax.tree.leaves(ws):
      leaf.delete()
  return out


def _fuse_layer(layer: Layer, consume: bool) -> Layer:
  a, m = layer.attn, layer.mlp
  if a.qkv is None and a.k is not None:
    ws = (a.q, a.k) if a.v is None else (a.q, a.k, a.v)
    if _concatenable(ws):
      a = dataclasses.replace(a, q=None, k=None, v=None, qkv=_fused(ws, consume))
  if m.gate_up is None and _concatenable((m.gate, m.up)):
    m = dataclasses.replace(m, gate=None, up=None, gate_up=_fused((m.gate, m.up), consume))
  return dataclasses.replace(layer, attn=a, mlp=m)


def fuse(params: Params, consume: bool = False) -> Params:
  """Params whose q/k/v (layers that own their K/V) and gate/up are single weights where they
  can be (the same storage). consume: delete each separate weight once it is fused (the caller
  holds no other reference to them, e.g. params just loaded), so peak memory grows by one
  layer's projections instead of all of them."""
  return dataclasses.replace(params, layers=tuple(_fuse_layer(ly, consume)
                                                  for ly in params.layers))


def _unfuse_layer(layer: Layer, cfg: ModelConfig, spec: LayerSpec) -> Layer:
  a, m = layer.attn, layer.mlp
  if a.qkv is not None:
    parts = _split(a.qkv, _qkv_shapes(cfg, spec))
    a = dataclasses.replace(a, q=parts[0], k=parts[1], v=parts[2] if len(parts) > 2 else None,
                            qkv=None)
  if m.gate_up is not None:
    gate, up = _split(m.gate_up, [(m.gate_up.shape[1] // 2,)] * 2)
    m = dataclasses.replace(m, gate=gate, up=up, gate_up=None)
  return dataclasses.replace(layer, attn=a, mlp=m)


def unfuse(params: Params, cfg: ModelConfig) -> Params:
  """The separate q/k/v and gate/up weights of fused params (exact; unfused params unchanged)."""
  if not is_fused(params):
    return params
  layers = tuple(_unfuse_layer(ly, cfg, spec) for ly, spec in zip(params.layers, cfg.layers,
                                                                 strict=True))
  return dataclasses.replace(params, layers=layers)


def is_fused(params: Params) -> bool:
  """Whether any layer holds a fused projection."""
  return any(ly.attn.qkv is not None or ly.mlp.gate_up is not None for ly in params.layers)


def project_qkv(p: Attention, x: jax.Array, cfg: ModelConfig, spec: LayerSpec):
  """q [B, T, N, H] and, on a layer that owns its K/V, raw k and v [B, T, K, H] (v is k on
  k_eq_v layers; both None on KV-shared layers). x: [B, T, D] normed input."""
  if p.qkv is None:
    q = einsum("btd,dnh->btnh", x, p.q)
    if p.k is None:
      return q, None, None
    k = einsum("btd,dkh->btkh", x, p.k)
    return q, k, k if p.v is None else einsum("btd,dkh->btkh", x, p.v)
  b, t, _ = x.shape
  # [B, T, (N + K + K)·H]
  y = einsum("btd,df->btf", x, p.qkv)
  shapes = _qkv_shapes(cfg, spec)
  sizes = [s[0] * s[1] for s in shapes]
  q, k, *v = jnp.split(y, [sizes[0], sizes[0] + sizes[1]][:len(sizes) - 1], axis=-1)
  q, k = q.reshape(b, t, *shapes[0]), k.reshape(b, t, *shapes[1])
  return q, k, v[0].reshape(b, t, *shapes[2]) if v else k


def mlp(m: Mlp, x: jax.Array) -> jax.Array:
  """GeGLU feed-forward, fused or not. x: [B, T, D] -> [B, T, D]."""
  if m.gate_up is None:
    # [B, T, F]
    hidden = gelu(einsum("btd,df->btf", x, m.gate)) * einsum("btd,df->btf", x, m.up)
  else:
    # [B, T, 2F] -> 2 x [B, T, F]
    gate, up = jnp.split(einsum("btd,df->btf", x, m.gate_up), 2, axis=-1)
    hidden = gelu(gate) * up
  return einsum("btf,fd->btd", hidden, m.down)

"""Pure building blocks: norms, RoPE, GeGLU MLP, soft-cap, and the one matmul dispatch point.

`einsum` is where every weight is consumed; quantized weight types plug in there, so model code
never branches on how a weight is stored.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gemma.model.config import RopeConfig, rope_inv_freq


def einsum(spec: str, x: jax.Array, w, out_dtype=None) -> jax.Array:
  """`jnp.einsum(spec, x, w)` for activations `x` and a weight `w`, output in `out_dtype`
  (default x's dtype), accumulated in float32.

  The one dispatch point of every weight. A weight type that is not an array plugs in by
  defining `__gemma_einsum__(spec, x, out_dtype)` (and `__gemma_ragged_dot__(x, group_sizes)`
  for expert weights): a quantized `gemma.quant.QArray` runs as (Π x) · (scale ⊙ table[code]),
  a `gemma.training.lora.LoraWeight` adds its low-rank update, a `gemma.quant.probe.Probe`
  records its inputs. Model code never branches on how a weight is stored, and this module
  imports none of those types.
  """
  custom = getattr(w, "__gemma_einsum__", None)
  if custom is not None:
    return custom(spec, x, out_dtype)
  w = w.astype(x.dtype)
  k = matmul_axes(spec)
  if k:  # one 2-D matmul over the flattened contracted axes
    lead = x.shape[:x.ndim - k]
    # [*lead, I] x [I, O] -> [*lead, O]
    out = jnp.einsum("...i,io->...o", x.reshape(*lead, -1),
                     w.reshape(math.prod(w.shape[:k]), -1), preferred_element_type=jnp.float32)
    out = out.reshape(*lead, *w.shape[k:])
  else:
    out = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
  return out.astype(out_dtype or x.dtype)


@functools.cache
def matmul_axes(spec: str) -> int:
  """k when `spec` contracts x's last k axes with w's first k (in order) and lists the output as
  x's other axes then w's ('btnh,nhd->btd', 'btd,dnh->btnh'), else 0.

  Such an einsum runs as one matmul over the flattened axes: XLA then keeps the weight in its
  stored layout instead of choosing to transpose it (a copy of the weight on every call).
  """
  operands, out = spec.replace(" ", "").split("->")
  xs, ws = operands.split(",")
  contracted = [a for a in xs if a in ws and a not in out]
  k = len(contracted)
  if k == 0 or xs[len(xs) - k:] != ws[:k] or out != xs[:len(xs) - k] + ws[k:]:
    return 0
  return k


def ragged_dot(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
  """Grouped matmul: rows of x [M, D] in consecutive groups times w [G, D, O] -> [M, O]."""
  custom = getattr(w, "__gemma_ragged_dot__", None)
  if custom is not None:
    return custom(x, group_sizes)
  out = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float = 1e-6,
             plus_one: bool = False) -> jax.Array:
  """RMSNorm over the last axis, computed in float32: `x / rms(x) * w` (or `* (1 + w)`).

  `scale=None` is the scale-free norm (Gemma 4's v-norm and router norm).
  """
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if scale is not None:
    w = scale.astype(jnp.float32)
    y = y * (1.0 + w if plus_one else w)
  return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig) -> jax.Array:
  """Rotary embedding, split-half ("rotate_half") convention, computed in float32.

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [B, T] absolute positions (padding may carry any value).
  Returns:
    [B, T, N, H] rotated, in x's dtype. Pairs with frequency 0 pass through unchanged.
  """
  h = x.shape[-1]
  inv_freq = jnp.asarray(rope_inv_freq(cfg, h), jnp.float32)
  # [B, T, 1, H/2]
  angles = (positions.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """tanh-approximate GELU (HF `gelu_pytorch_tanh`)."""
  return jax.nn.gelu(x, approximate=True)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)

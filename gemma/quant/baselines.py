"""Baselines in the same framework: round-to-nearest int8 / int4 and NF4, absmax scale per block.

Same `QArray` type and layouts as TurboQuant (rotation "none"), so ablations swap only the spec:
  int b: scale = absmax / (2^(b-1) - 1), code = round(w / scale) + 2^(b-1) - 1 (symmetric grid),
  nf4:   scale = absmax, code = nearest NormalFloat-4 level of w / scale (QLoRA's levels).
With g = 128 and fp16 scales, int4 and nf4 cost 4.125 bits per weight, like tq4 with fp16 norms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma.quant import codebook
from gemma.quant.qarray import MATH_LAYOUT, Layout, QArray, QuantSpec, assemble, to_blocks


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_weight(w: jax.Array, spec: QuantSpec, layout: Layout = MATH_LAYOUT) -> QArray:
  """RTN ("int", bits 2..8) or NF4 of a weight, one absmax scale per (output row, block).

  Args:
    w: [*batch, *in, *out] (or [*batch, *out, *in] with layout.in_last).
  """
  if spec.method not in ("int", "nf4"):
    raise ValueError(f"baselines.quantize_weight got method {spec.method!r}")
  blocks, spec = to_blocks(w, spec, layout)  # [*batch, n_out, nb, g]
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  if spec.method == "int":
    if spec.bits < 2:
      raise ValueError("int needs bits >= 2")
    qmax = 2 ** (spec.bits - 1) - 1
    # Round against the scale as stored, so decoding reproduces round-to-nearest exactly.
    scale = (absmax / qmax).astype(spec.scale_dtype).astype(jnp.float32)
    v = blocks / jnp.where(scale > 0, scale, 1)[..., None]
    idx = jnp.clip(jnp.round(v), -qmax, qmax).astype(jnp.int32) + qmax
  else:
    scale = absmax.astype(spec.scale_dtype).astype(jnp.float32)
    v = blocks / jnp.where(scale > 0, scale, 1)[..., None]
    levels = codebook.nf4_levels()
    mid = jnp.asarray((levels[1:] + levels[:-1]) / 2, jnp.float32)
    idx = jnp.searchsorted(mid, v, method="compare_all").astype(jnp.int32)
  flat = idx.reshape(*idx.shape[:-2], -1)
  return assemble(spec, layout, w.shape, w.dtype, flat, scale)

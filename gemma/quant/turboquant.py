"""TurboQuant (arXiv:2504.19874): TurboQuant_mse (Alg. 1) and TurboQuant_prod (Alg. 2).

Vectors (for the KV cache and the paper's experiments): x [..., d] with an explicit rotation
matrix Π [d, d] and, for _prod, a Gaussian projection S [d, d]; vmap over draws of (Π, S).
  mse:  s = ‖x‖, idx = Q(Π x / s) with the Lloyd-Max codebook of the rotated-coordinate law,
        x̃ = s · Πᵀ c[idx].
  prod: idx from mse at b - 1 bits, r = x/s - x̃_mse, qjl = sign(S r), γ = ‖r‖,
        x̃ = s · (x̃_mse + √(π/2)/d · γ · Sᵀ qjl)  — unbiased for inner products.

Weights: `quantize_weight` treats each output channel's input vector as
the vector, in blocks of g with one norm per (row, block), and returns a `QArray`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma.quant import codebook
from gemma.quant.qarray import MATH_LAYOUT, Layout, QArray, QuantSpec, assemble, to_blocks
from gemma.quant.rotation import gaussian_np

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Table:
  """A scalar codebook as data: centroids [K] and boundaries [K - 1] (unit-vector coordinates).

  Padding with unused centroids and +inf boundaries is allowed (one compiled function then
  serves every bit width); a 0-bit table (the single centroid 0) is the empty mse stage of
  TurboQuant_prod at b = 1.
  """

  centroids: jax.Array
  boundaries: jax.Array


@dataclasses.dataclass(frozen=True)
class Code:
  """Quantized vectors [..., d]: codes and norms, and (prod) QJL signs and residual norms."""

  idx: jax.Array  # [..., d] int32 codes
  norm: jax.Array  # [...] ‖x‖
  qjl: jax.Array | None = None  # [..., d] ±1 signs of S r (prod)
  gamma: jax.Array | None = None  # [...] ‖r‖ of the unit-norm residual (prod)


jax.tree_util.register_dataclass(Table, data_fields=["centroids", "boundaries"], meta_fields=[])
jax.tree_util.register_dataclass(Code, data_fields=["idx", "norm", "qjl", "gamma"], meta_fields=[])


def table(bits: int, d: int, law: str = "beta", pad_bits: int | None = None) -> Table:
  """The Lloyd-Max table for coordinates of unit vectors in R^d (bits = 0: the centroid 0)."""
  if bits == 0:
    c, b = np.zeros(1, np.float32), np.zeros(0, np.float32)
  else:
    c, b = codebook.sphere_codebook(bits, d, law)
  if pad_bits is not None:
    k = 2 ** pad_bits
    c = np.concatenate([c, np.zeros(k - c.size, np.float32)])
    b = np.concatenate([b, np.full(k - 1 - b.size, np.inf, np.float32)])
  return Table(jnp.asarray(c), jnp.asarray(b))


def _unit(x: jax.Array):
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
  return x / jnp.where(norm > 0, norm, 1)[..., None], norm


def _rot(x, pi):  # y = Π x on row vectors
  return jnp.einsum("...j,ij->...i", x, pi, precision=_HI)


def _unrot(y, pi):  # x = Πᵀ y on row vectors
  return jnp.einsum("...i,ij->...j", y, pi, precision=_HI)


def nearest(y: jax.Array, tab: Table) -> jax.Array:
  """Index of the nearest centroid (bin of y among the sorted boundaries). -> int32, y's shape."""
  return jnp.searchsorted(tab.boundaries, y, method="compare_all").astype(jnp.int32)


# ----------------------------------------------------------------------------- TurboQuant_mse
@jax.jit
def mse_quantize(x: jax.Array, pi: jax.Array, tab: Table) -> Code:
  """TurboQuant_mse. x: [..., d]; pi: [d, d] orthogonal; tab: `table(bits, d)`."""
  u, norm = _unit(x.astype(jnp.float32))
  return Code(idx=nearest(_rot(u, pi), tab), norm=norm)


@jax.jit
def mse_dequantize(code: Code, pi: jax.Array, tab: Table) -> jax.Array:
  """x̃ = ‖x‖ · Πᵀ c[idx]. -> [..., d] float32."""
  return code.norm[..., None] * _unrot(tab.centroids[code.idx], pi)


# ----------------------------------------------------------------------------- TurboQuant_prod
@jax.jit
def prod_quantize(x: jax.Array, pi: jax.Array, s: jax.Array, tab: Table) -> Code:
  """TurboQuant_prod at b bits: `tab` is the (b-1)-bit table, then sign(S r) of the residual.

  x: [..., d]; pi: [d, d] orthogonal; s: [d, d] i.i.d. N(0, 1).
  """
  u, norm = _unit(x.astype(jnp.float32))
  idx = nearest(_rot(u, pi), tab)
  r = u - _unrot(tab.centroids[idx], pi)
  proj = jnp.einsum("...j,ij->...i", r, s, precision=_HI)
  qjl = jnp.where(proj >= 0, 1, -1).astype(jnp.int8)  # sign(0) := +1
  return Code(idx=idx, norm=norm, qjl=qjl, gamma=jnp.linalg.norm(r, axis=-1))


def _qjl_scale(d: int) -> float:
  return math.sqrt(math.pi / 2) / d


@jax.jit
def prod_inner(y: jax.Array, code: Code, pi: jax.Array, s: jax.Array, tab: Table) -> jax.Array:
  """⟨y, x̃⟩ without dequantizing: ‖x‖(⟨Π y, c[idx]⟩ + γ √(π/2)/d ⟨S y, qjl⟩). y: [..., d]."""
  d = code.qjl.shape[-1]
  sy = jnp.einsum("...j,ij->...i", y, s, precision=_HI)
  qjl = _qjl_scale(d) * code.gamma * jnp.sum(sy * code.qjl, axis=-1)
  return code.norm * (jnp.sum(_rot(y, pi) * tab.centroids[code.idx], axis=-1) + qjl)


# ----------------------------------------------------------------------------- QJL alone
@jax.jit
def qjl_inner(q: jax.Array, k: jax.Array, s: jax.Array) -> jax.Array:
  """QJL estimate √(π/2)/m · ‖k‖ · ⟨S q, sign(S k)⟩ of ⟨q, k⟩. q, k: [..., d]; s: [m, d]."""
  sk = jnp.einsum("...j,ij->...i", k, s, precision=_HI)
  sq = jnp.einsum("...j,ij->...i", q, s, precision=_HI)
  signs = jnp.where(sk >= 0, 1.0, -1.0)
  return _qjl_scale(s.shape[0]) * jnp.linalg.norm(k, axis=-1) * jnp.sum(sq * signs, axis=-1)


# ----------------------------------------------------------------------------- accounting
def vector_bits(d: int, bits: int, method: str = "mse", scalar_bits: int = 16,
                unit_norm: bool = False) -> int:
  """Stored bits of one d-vector: codes, the norm (unless unit_norm) and prod's γ."""
  scalars = (0 if unit_norm else 1) + (1 if method == "prod" else 0)
  return bits * d + scalars * scalar_bits


# ----------------------------------------------------------------------------- weights
@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_weight(w: jax.Array, spec: QuantSpec, layout: Layout = MATH_LAYOUT) -> QArray:
  """TurboQuant (mse or prod) of a weight, one norm per (output row, block of g inputs).

  Args:
    w: [*batch, *in, *out] (or [*batch, *out, *in] with layout.in_last).
    spec: method "tq" or "tq_prod"; bits, block, rotation, law, seed.
  """
  if spec.method not in ("tq", "tq_prod"):
    raise ValueError(f"turboquant.quantize_weight got method {spec.method!r}")
  blocks, spec = to_blocks(w, spec, layout)  # [*batch, n_out, nb, g]
  u, norm = _unit(blocks)
  y = spec.rotation_of().apply(u)
  tab = table(spec.code_bits, spec.block, spec.law)
  idx = nearest(y, tab)
  if spec.scale_fit == "unbiased":  # E⟨u, ũ⟩ = 1 - D_mse(b): undo the shrinkage
    norm = norm / (1 - codebook.law_codebook(spec.code_bits, spec.block, spec.law).mse)
  elif spec.scale_fit == "lsq":  # argmin_s ‖y - s c‖² = ⟨y, c⟩ / ⟨c, c⟩ per block
    c = tab.centroids[idx]
    norm = norm * jnp.sum(y * c, -1) / jnp.maximum(jnp.sum(c * c, -1), 1e-30)
  qjl = gamma = None
  if spec.method == "tq_prod":
    # QJL of the residual in the rotated domain (S Π^T is Gaussian too, so this is Alg. 2).
    r = y - tab.centroids[idx]
    s = jnp.asarray(gaussian_np(spec.seed, spec.block), jnp.float32)
    qjl = (jnp.einsum("...j,ij->...i", r, s, precision=_HI) >= 0).astype(jnp.uint8)
    gamma = jnp.linalg.norm(r, axis=-1)
    qjl = qjl.reshape(*qjl.shape[:-2], -1)
  flat = idx.reshape(*idx.shape[:-2], -1)
  return assemble(spec, layout, w.shape, w.dtype, flat, norm, qjl, gamma)

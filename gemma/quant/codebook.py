"""Scalar codebooks: Lloyd-Max for the rotated-coordinate law (exact Beta or Gaussian), NF4, int.

A coordinate of a uniformly random unit vector in R^d has density (TurboQuant Lemma 1)
`f(x) ∝ (1 - x²)^((d-3)/2)` on [-1, 1], i.e. (x + 1)/2 ~ Beta((d-1)/2, (d-1)/2), which tends to
N(0, 1/d). Codebooks are computed (never typed in) by Lloyd iteration on that law, in "√d units"
(z = x·√d, so the Gaussian limit is N(0, 1)): boundaries are midpoints of consecutive centroids,
each centroid is the conditional mean of its bin. Bin moments use closed-form antiderivatives,
so the result is exact to float64 round-off. `mse` is E(z - Q(z))², which in √d units equals the
paper's D_mse = E‖x - x̃‖² for unit x (d coordinates × C(f_X, b)).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import special


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
  """A scalar quantizer: sorted centroids [2^b] and the 2^b - 1 decision boundaries between."""

  centroids: np.ndarray  # [2^b] float64, sorted
  boundaries: np.ndarray  # [2^b - 1] float64 midpoints
  mse: float  # E (z - Q(z))² under the law (√d units: = D_mse of a unit vector)
  probs: np.ndarray  # [2^b] probability of each bin under the law

  @property
  def bits(self) -> int:
    return int(self.centroids.size).bit_length() - 1

  @property
  def entropy(self) -> float:
    """Shannon entropy of the index, in bits (what an entropy coder could reach)."""
    p = self.probs[self.probs > 0]
    return float(-np.sum(p * np.log2(p)))


# ----------------------------------------------------------------------- laws as antiderivatives
# Each law gives odd antiderivatives (F0, F1, F2) of z^k f(z), k = 0, 1, 2, so the bin moments are
# differences F_k(b) - F_k(a) with no quadrature and no cancellation.
def _gauss_antiderivatives(z: np.ndarray):
  finite = np.isfinite(z)
  zf = np.where(finite, z, 0.0)
  phi = np.where(finite, np.exp(-0.5 * zf * zf) / math.sqrt(2 * math.pi), 0.0)
  f0 = special.ndtr(z) - 0.5
  return f0, -phi, f0 - zf * phi


def _beta_antiderivatives(z: np.ndarray, d: int):
  """Moments of z = x·√d where x is one coordinate of a uniform unit vector in R^d."""
  x = np.clip(z / math.sqrt(d), -1.0, 1.0)
  t, sgn, a = x * x, np.sign(x), (d - 1) / 2
  f0 = 0.5 * sgn * special.betainc(0.5, a, t)
  # ∫ x f(x) dx = -C (1 - x²)^((d-1)/2) / (d - 1), C = Γ(d/2) / (√π Γ((d-1)/2))
  log_c = special.gammaln(d / 2) - special.gammaln(a) - 0.5 * math.log(math.pi)
  f1 = -math.sqrt(d) * np.exp(log_c) * (1 - t) ** a / (d - 1)
  f2 = 0.5 * sgn * special.betainc(1.5, a, t)  # d · ∫ x² f(x) dx; total E z² = 1
  return f0, f1, f2


def _moments(edges: np.ndarray, d: int | None):
  anti = _gauss_antiderivatives(edges) if d is None else _beta_antiderivatives(edges, d)
  return tuple(np.diff(f) for f in anti)  # each [2^b]: mass, first and second moment per bin


def _initial(bits: int) -> np.ndarray:
  k = 2 ** bits
  return special.ndtri((np.arange(k) + 0.5) / k)


def _nearest_codebook(c: np.ndarray, d: int | None) -> Codebook:
  """The nearest-centroid quantizer of sorted centroids c: midpoint boundaries, its MSE and bin
  probabilities under the law (d: Beta dimension, None: Gaussian)."""
  mid = (c[1:] + c[:-1]) / 2
  p, m1, m2 = _moments(np.concatenate([[-np.inf], mid, [np.inf]]), d)
  mse = float(np.sum(m2 - 2 * c * m1 + c * c * p))
  for a in (c, mid, p):
    a.setflags(write=False)
  return Codebook(centroids=c, boundaries=mid, mse=mse, probs=p)


@functools.cache
def lloyd_max(bits: int, d: int | None = None, tol: float = 1e-13,
              max_iter: int = 100_000) -> Codebook:
  """Lloyd-Max codebook with 2^bits levels, in √d units.

  Args:
    bits: 1..8.
    d: dimension of the rotated block (exact Beta law of Lemma 1); None: the N(0, 1) limit.
  Returns:
    A Codebook; divide centroids/boundaries by √d for unit-vector coordinates.
  """
  if not 1 <= bits <= 8:
    raise ValueError(f"bits={bits} must be in 1..8")
  if d is not None and d < 2:
    raise ValueError(f"d={d} must be >= 2")
  c = _initial(bits)
  for _ in range(max_iter):
    edges = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
    p, m1, _ = _moments(edges, d)
    new = m1 / p
    done = np.max(np.abs(new - c)) < tol
    c = new
    if done:
      break
  c = (c - c[::-1]) / 2  # the law is symmetric: make the codebook exactly odd
  return _nearest_codebook(c, d)


def poly_degree(bits: int) -> int:
  """Degree of the odd polynomial codebook: cubic up to 3 bits, quintic at 4 and more."""
  return 3 if bits <= 3 else 5


@functools.cache
def poly_codebook(bits: int, d: int | None = None) -> Codebook:
  """Lloyd-Max centroids replaced by an odd polynomial in u = idx - (2^b - 1)/2 (√d units).

  A kernel then turns a code into its value with 2-3 fused multiply-adds instead of a table
  look-up (docs: the decode instruction budget). Coefficients: least squares to the exact
  Lloyd-Max centroids, weighted by each bin's probability; boundaries are the midpoints and
  `mse` is the distortion of this codebook under the same law (slightly above Lloyd-Max's).
  """
  cb = lloyd_max(bits, d)
  u = np.arange(2 ** bits) - (2 ** bits - 1) / 2
  powers = np.stack([u ** k for k in range(1, poly_degree(bits) + 1, 2)], axis=1)
  w = np.sqrt(cb.probs)[:, None]
  coef = np.linalg.lstsq(powers * w, cb.centroids * w[:, 0], rcond=None)[0]
  return _nearest_codebook(powers @ coef, d)


LAWS = ("beta", "gauss", "poly")


def law_codebook(bits: int, d: int, law: str = "beta") -> Codebook:
  """The codebook of a law, in √d units: "beta" (exact Lloyd-Max for dimension d), "gauss" (the
  N(0, 1) limit) or "poly" (an odd polynomial fit to the exact one, see `poly_codebook`)."""
  if law not in LAWS:
    raise ValueError(f"law={law!r}; expected one of {LAWS}")
  if law == "poly":
    return poly_codebook(bits, d)
  return lloyd_max(bits, d if law == "beta" else None)


def sphere_codebook(bits: int, d: int, law: str = "beta") -> tuple[np.ndarray, np.ndarray]:
  """(centroids [2^b], boundaries [2^b - 1]) in float32 for coordinates of unit vectors in R^d.

  law: see `law_codebook`.
  """
  cb = law_codebook(bits, d, law)
  s = 1 / math.sqrt(d)
  return (cb.centroids * s).astype(np.float32), (cb.boundaries * s).astype(np.float32)


# -------------------------------------------------------------------------- baseline grids
@functools.cache
def nf4_levels(offset: float = 0.9677083) -> np.ndarray:
  """The 16 NormalFloat-4 levels (QLoRA), from normal quantiles: 8 positive, 7 negative, and 0.

  This is bitsandbytes' `create_normal_map(offset, use_extra_value=True)`: quantiles of N(0, 1)
  at `linspace(offset, 0.5, 9)` and `linspace(offset, 0.5, 8)`, normalized to [-1, 1].
  """
  pos = special.ndtri(np.linspace(offset, 0.5, 9)[:-1])
  neg = -special.ndtri(np.linspace(offset, 0.5, 8)[:-1])
  v = np.sort(np.concatenate([pos, [0.0], neg]))
  v = v / np.max(np.abs(v))
  v.setflags(write=False)
  return v


def int_levels(bits: int) -> np.ndarray:
  """Symmetric round-to-nearest grid: code k means k - (2^(b-1) - 1), in units of the scale.

  The top code 2^b - 1 (value 2^(b-1)) is never produced by absmax scaling with
  scale = absmax / (2^(b-1) - 1); it is kept so that codes fill b bits.
  """
  return np.arange(2 ** bits, dtype=np.float64) - (2 ** (bits - 1) - 1)

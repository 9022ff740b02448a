"""Random rotations of blocks of g coordinates: dense Haar, and randomized Hadamard (>= 2 rounds).

Convention (row vectors, as everywhere in this package): `y = Π x` is computed as `x @ Π.T` on
[..., g] arrays and inverted as `x = y @ Π`. A `Rotation` is static data (kind, rounds, seed, g):
its matrix is rebuilt deterministically (numpy, cached) wherever it is needed, so a quantized
weight stores only its seed.

- Haar: QR of a Gaussian matrix with the sign fix `Q · sign(diag R)`, which makes Q exactly
  Haar-distributed (TurboQuant Alg. 1).
- Randomized Hadamard (RHT): `Π = (H D_r) ··· (H D_1)` with H the normalized Walsh-Hadamard matrix
  and D_i random ±1 diagonals, applied by a fast Walsh-Hadamard transform in O(g log g). One round
  is *not* Haar-like on structured inputs (x = e1 maps to a flat ±1/√g vector); two rounds are
  close (tests/test_turboquant.py::test_t5_worst_case_invariance).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("none", "haar", "hadamard")
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------ primitives
def haar(key: jax.Array, g: int, shape: tuple[int, ...] = (), dtype=jnp.float32) -> jax.Array:
  """Haar-random orthogonal matrices [*shape, g, g] (QR of a Gaussian with the sign fix)."""
  z = jax.random.normal(key, (*shape, g, g), jnp.float32)
  q, r = jnp.linalg.qr(z)
  return (q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]).astype(dtype)


def haar_np(seed: int, g: int) -> np.ndarray:
  """A deterministic Haar-random orthogonal [g, g] float64 matrix from an integer seed."""
  return _haar_np(int(seed), int(g)).copy()


@functools.lru_cache(maxsize=64)
def _haar_np(seed: int, g: int) -> np.ndarray:
  z = np.random.default_rng(seed).standard_normal((g, g))
  q, r = np.linalg.qr(z)
  return q * np.sign(np.diag(r))[None, :]


def gaussian_np(seed: int, g: int) -> np.ndarray:
  """A deterministic i.i.d. N(0, 1) [g, g] float64 matrix (the QJL projection S) from a seed."""
  return _gaussian_np(int(seed), int(g)).copy()


@functools.lru_cache(maxsize=64)
def _gaussian_np(seed: int, g: int) -> np.ndarray:
  return np.random.default_rng([seed, 0x51]).standard_normal((g, g))


def hadamard(g: int) -> np.ndarray:
  """Normalized Walsh-Hadamard matrix [g, g] (Sylvester order; symmetric, orthogonal)."""
  if g < 1 or g & (g - 1):
    raise ValueError(f"Hadamard size g={g} must be a power of two")
  h = np.ones((1, 1))
  while h.shape[0] < g:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(g)


@jax.jit
def fwht(x: jax.Array) -> jax.Array:
  """Normalized fast Walsh-Hadamard transform over the last axis: x @ hadamard(g) (g = 2^k).

  Computed in float32 (log2 g rounds of additions), returned in x's dtype.
  """
  g = x.shape[-1]
  if g & (g - 1):
    raise ValueError(f"FWHT size g={g} must be a power of two")
  lead = x.shape[:-1]
  y = x.astype(jnp.float32).reshape(-1, g)
  h = 1
  while h < g:
    # [M, g/(2h), 2, h]: butterflies between the two halves of each 2h-long segment
    y = y.reshape(-1, g // (2 * h), 2, h)
    a, b = y[:, :, 0], y[:, :, 1]
    y = jnp.stack([a + b, a - b], axis=2)
    h *= 2
  return (y.reshape(*lead, g) * (1 / np.sqrt(g))).astype(x.dtype)


def rht_signs_np(seed: int, rounds: int, g: int) -> np.ndarray:
  """±1 diagonals [rounds, g] of a randomized Hadamard transform, from an integer seed."""
  rng = np.random.default_rng(seed)
  return np.where(rng.random((rounds, g)) < 0.5, -1.0, 1.0)


@jax.jit
def rht(x: jax.Array, signs: jax.Array) -> jax.Array:
  """y = (H D_r) ··· (H D_1) x over the last axis. x: [..., g]; signs: [rounds, g]."""
  dtype, x = x.dtype, x.astype(jnp.float32)
  for r in range(signs.shape[0]):
    x = fwht(x * signs[r].astype(x.dtype))
  return x.astype(dtype)


@jax.jit
def rht_inverse(y: jax.Array, signs: jax.Array) -> jax.Array:
  """Inverse of `rht` (H is symmetric and orthogonal, D_i² = I)."""
  dtype, y = y.dtype, y.astype(jnp.float32)
  for r in reversed(range(signs.shape[0])):
    y = fwht(y) * signs[r].astype(y.dtype)
  return y.astype(dtype)


# ------------------------------------------------------------------------------ static spec
@dataclasses.dataclass(frozen=True)
class Rotation:
  """A block rotation as static, hashable data. kind: "none" | "haar" | "hadamard"."""

  kind: str = "haar"
  g: int = 128
  seed: int = 0
  rounds: int = 2  # Hadamard rounds (ignored otherwise)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"rotation kind {self.kind!r}; expected one of {KINDS}")
    if self.kind == "hadamard" and (self.g & (self.g - 1) or self.rounds < 1):
      raise ValueError(f"Hadamard rotation needs g a power of two and rounds >= 1: {self}")

  def matrix(self) -> np.ndarray:
    """The dense [g, g] float64 matrix Π of this rotation (y = Π x)."""
    if self.kind == "none":
      return np.eye(self.g)
    if self.kind == "haar":
      return haar_np(self.seed, self.g)
    m = np.eye(self.g)
    h = hadamard(self.g)
    for s in rht_signs_np(self.seed, self.rounds, self.g):
      m = h @ (s[:, None] * m)
    return m

  @functools.partial(jax.jit, static_argnums=0)
  def apply(self, x: jax.Array) -> jax.Array:
    """y = Π x over the last axis. x: [..., g] -> [..., g]."""
    if self.kind == "none":
      return x
    if self.kind == "hadamard":
      return rht(x, jnp.asarray(rht_signs_np(self.seed, self.rounds, self.g), x.dtype))
    pi = jnp.asarray(haar_np(self.seed, self.g), x.dtype)
    return jnp.einsum("...j,ij->...i", x, pi, preferred_element_type=jnp.float32,
                      precision=_HIGHEST).astype(x.dtype)

  @functools.partial(jax.jit, static_argnums=0)
  def inverse(self, y: jax.Array) -> jax.Array:
    """x = Πᵀ y over the last axis. y: [..., g] -> [..., g]."""
    if self.kind == "none":
      return y
    if self.kind == "hadamard":
      return rht_inverse(y, jnp.asarray(rht_signs_np(self.seed, self.rounds, self.g), y.dtype))
    pi = jnp.asarray(haar_np(self.seed, self.g), y.dtype)
    return jnp.einsum("...i,ij->...j", y, pi, preferred_element_type=jnp.float32,
                      precision=_HIGHEST).astype(y.dtype)

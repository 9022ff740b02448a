"""Monte Carlo of TurboQuant over random rotations (and QJL projections), for the paper's numbers.

`simulate` takes, per draw, a rotation Π (`draw_rotations`: Haar, or a randomized Hadamard with
`rounds` rounds), a Gaussian S, and unit vectors x and y (uniform, or fixed ones), and returns the
per-vector errors of TurboQuant_mse and TurboQuant_prod. Rotations, vectors and (padded) codebooks
are all data, so one compilation serves every bit width, rotation kind and input. `distortion`
aggregates into D_mse, d·D_prod and the shrinkage factor E⟨x, x̃_mse⟩.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma.quant import codebook, rotation, turboquant


@functools.partial(jax.jit, static_argnums=(1, 2))
def unit_vectors(key: jax.Array, n: int, d: int) -> jax.Array:
  """n uniform random unit vectors [n, d]."""
  x = jax.random.normal(key, (n, d), jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def rht_matrix(signs: jax.Array) -> jax.Array:
  """Dense Π = (H D_r) ··· (H D_1) [g, g] of a randomized Hadamard with signs [rounds, g]."""
  g = signs.shape[-1]
  h = jnp.asarray(rotation.hadamard(g), jnp.float32)
  m = jnp.eye(g, dtype=jnp.float32)
  for r in range(signs.shape[0]):
    m = jnp.matmul(h, signs[r][:, None] * m, precision=jax.lax.Precision.HIGHEST)
  return m


def draw_rotation(key: jax.Array, d: int, kind: str = "haar", rounds: int = 2) -> jax.Array:
  """One random rotation [d, d]: "haar" or "hadamard" (randomized, `rounds` rounds)."""
  if kind == "haar":
    return rotation.haar(key, d)
  if kind == "hadamard":
    return rht_matrix(jax.random.rademacher(key, (rounds, d), jnp.float32))
  raise ValueError(f"rotation kind {kind!r}")


def tables(bits: int, d: int, law: str = "beta", pad_bits: int = 4):
  """(b-bit mse table, (b-1)-bit prod table), both padded to 2^pad_bits entries."""
  pad = max(pad_bits, bits)
  return (turboquant.table(bits, d, law, pad_bits=pad),
          turboquant.table(bits - 1, d, law, pad_bits=pad))


@functools.partial(jax.jit, static_argnames=("draws", "d", "kind", "rounds"))
def draw_rotations(key: jax.Array, draws: int, d: int, kind: str = "haar",
                   rounds: int = 2) -> jax.Array:
  """Independent random rotations [draws, d, d] (one at a time: batched QR is slow on CPU)."""
  return jax.lax.map(lambda k: draw_rotation(k, d, kind, rounds), jax.random.split(key, draws))


@functools.partial(jax.jit, static_argnames=("batch_size",))
def simulate(key: jax.Array, pis: jax.Array, xs: jax.Array, ys: jax.Array,
             mse_tab: turboquant.Table, prod_tab: turboquant.Table,
             batch_size: int = 8) -> dict[str, jax.Array]:
  """Per-vector errors of TurboQuant, each [draws, vectors]; everything is data (one compile).

  Args:
    key: draws the Gaussian QJL matrices S [d, d], one per draw.
    pis: [draws, d, d] rotations; xs, ys: [draws, vectors, d] unit vectors.
    mse_tab, prod_tab: the b-bit table of TurboQuant_mse and the (b-1)-bit table of
      TurboQuant_prod, from `tables(b, d)`.
  Returns:
    mse_sq (‖x - x̃‖²), mse_inner (⟨x, x̃⟩), mse_ip (⟨y, x̃⟩ - ⟨y, x⟩) of TurboQuant_mse and
    prod_ip (⟨y, x̃⟩ - ⟨y, x⟩) of TurboQuant_prod.
  """
  d = pis.shape[-1]

  def one(args):
    k, pi, x, y = args
    s = jax.random.normal(k, (d, d), jnp.float32)
    true = jnp.sum(x * y, axis=-1)
    xt = turboquant.mse_dequantize(turboquant.mse_quantize(x, pi, mse_tab), pi, mse_tab)
    code = turboquant.prod_quantize(x, pi, s, prod_tab)
    prod = turboquant.prod_inner(y, code, pi, s, prod_tab)
    return dict(mse_sq=jnp.sum((x - xt) ** 2, axis=-1), mse_inner=jnp.sum(x * xt, axis=-1),
                mse_ip=jnp.sum(y * xt, axis=-1) - true, prod_ip=prod - true)

  keys = jax.random.split(key, pis.shape[0])
  return jax.lax.map(one, (keys, pis, xs, ys), batch_size=min(batch_size, pis.shape[0]))


def distortion(d: int, bits, draws: int = 20, vectors: int = 4000, seed: int = 0,
               kind: str = "haar", rounds: int = 2, law: str = "beta") -> dict:
  """D_mse, d·D_prod and E⟨x, x̃_mse⟩ per bit width (uniform unit x, independent unit y).

  Returns a JSON-able dict {"d", "mse", "prod", "bias", "mse_se", "prod_mean_error",
  "exact_mse", "predicted_prod"}, each keyed by the bit width as a string.
  """
  out = {k: {} for k in ("mse", "prod", "bias", "mse_se", "prod_mean_error", "exact_mse",
                         "predicted_prod")}
  pad = max(4, *bits)
  law_d = d if law == "beta" else None
  kp, kx, ky, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  pis = draw_rotations(kp, draws, d, kind, rounds)  # shared by every bit width
  xs = unit_vectors(kx, draws * vectors, d).reshape(draws, vectors, d)
  ys = unit_vectors(ky, draws * vectors, d).reshape(draws, vectors, d)
  for b in bits:
    mse_tab, prod_tab = tables(b, d, law, pad)
    r = jax.device_get(simulate(jax.random.fold_in(ks, b), pis, xs, ys, mse_tab, prod_tab))
    k = str(b)
    sq = np.asarray(r["mse_sq"], np.float64)
    out["mse"][k] = float(sq.mean())
    out["mse_se"][k] = float(sq.std() / math.sqrt(sq.size))
    out["bias"][k] = float(np.mean(r["mse_inner"]))
    out["prod"][k] = float(d * np.mean(np.asarray(r["prod_ip"], np.float64) ** 2))
    out["prod_mean_error"][k] = float(np.mean(r["prod_ip"]))
    out["exact_mse"][k] = codebook.lloyd_max(b, law_d).mse
    prev = 1.0 if b == 1 else codebook.lloyd_max(b - 1, law_d).mse
    out["predicted_prod"][k] = (math.pi / 2 - 1 / d) * prev
  return {"d": d, **out}

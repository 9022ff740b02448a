"""Data-aware rounding of a weight on any of our grids, given its inputs' second moments H = Σ x xᵀ.

Three methods, all returning the unchanged `QArray` format (so kernels, sharding, LoRA and every
loader read a calibrated weight like any other):
  gptq       GPTQ (arXiv 2210.17323) / LDLQ (QuIP#, arXiv 2402.04396): round column by column and
             push each column's error onto the columns not yet rounded, weighted by the upper
             Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), with lazy updates one quantization block at a
             time; then refit every block's scale for the chosen codes by weighted least squares.
  awq-scale  importance-weighted scales only: each block's scale is searched (a grid of multiples
             of the data-free scale, codes re-rounded for each) to minimize Σ diag(H)·err², then
             refit in closed form for the chosen codes with the same weights; no error feedback.

TurboQuant weights are rounded in the rotated basis: a row block w maps to Π w and H to
R H Rᵀ (R = diag(Π, ..., Π)), which leaves the objective ‖(W − Ŵ) X‖² unchanged because the
kernel computes (Π x) · (scale ⊙ table[code]). The grid of a block is scale · table: TurboQuant's
codebook of unit-vector coordinates with scale = ‖w_block‖ (of the error-updated weights), int's
symmetric levels with scale = absmax / qmax, NF4's levels with scale = absmax.

Row form (as in `qarray.to_blocks`): W [R, n] (R output rows, n padded inputs, blocks of g),
H [n, n]. Rows are independent, so they are processed in chunks (bounded memory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma.quant.qarray import (
  MATH_LAYOUT,
  Layout,
  QArray,
  QuantSpec,
  assemble,
  dequantize,
  to_blocks,
)

METHODS = ("gptq", "awq-scale")
DAMP = 0.01  # relative damping of H (fraction of its mean diagonal), as in GPTQ
ROW_CHUNK = 16384
_HI = jax.lax.Precision.HIGHEST


def check_method(method: str) -> str:
  if method not in METHODS:
    raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
  return method


# ----------------------------------------------------------------------------- grids
def _grid(spec: QuantSpec):
  """(sorted levels [K], boundaries [K-1]) of the scalar grid in units of the block scale."""
  levels = np.sort(np.asarray(spec.table(), np.float64))
  return (jnp.asarray(levels, jnp.float32),
          jnp.asarray((levels[1:] + levels[:-1]) / 2, jnp.float32))


def _code_of_level(spec: QuantSpec) -> jax.Array:
  """Stored code of each sorted level (tables are sorted already; kept general)."""
  return jnp.asarray(np.argsort(np.asarray(spec.table(), np.float64), kind="stable"), jnp.int32)


def data_free_scale(blocks: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """The quantizer's own scale of each block: (the divisor its rounding uses, the scale as
  stored in spec.scale_dtype). blocks: [..., g] -> ([...], [...]).

  TurboQuant rounds the unit vector w / ‖w‖ (unrounded norm) and stores the norm in float16; the
  baselines round against the stored scale (see `baselines.quantize_weight`). Matching both
  exactly makes GPTQ with H = I reproduce round-to-nearest code for code.
  """
  if spec.method == "tq":
    s = jnp.linalg.norm(blocks, axis=-1)
    return s, _stored(s, spec)
  if spec.method == "int":
    s = _stored(jnp.max(jnp.abs(blocks), axis=-1) / (2 ** (spec.bits - 1) - 1), spec)
  elif spec.method == "nf4":
    s = _stored(jnp.max(jnp.abs(blocks), axis=-1), spec)
  else:
    raise ValueError(f"calibration supports methods tq, int and nf4, not {spec.method!r}")
  return s, s


def _stored(s: jax.Array, spec: QuantSpec) -> jax.Array:
  s = jnp.clip(s, 0, float(jnp.finfo(jnp.dtype(spec.scale_dtype)).max))
  return s.astype(spec.scale_dtype).astype(jnp.float32)


def _round(v: jax.Array, divisor: jax.Array, scale: jax.Array, levels, mids):
  """Nearest level of v / divisor, decoded on scale · levels. -> (level index int32, value)."""
  safe = jnp.where(divisor > 0, divisor, 1.0)
  # compare_all is fastest for small grids but holds [..., K] booleans: int8's 255 boundaries
  # over a block of LM-head rows would take gigabytes, so large grids binary-search instead
  method = "compare_all" if mids.shape[0] < 32 else "scan"
  k = jnp.searchsorted(mids, v / safe, method=method).astype(jnp.int32)
  return k, jnp.where(divisor > 0, levels[k] * scale, 0.0)


# ----------------------------------------------------------------------------- H handling
def rotate_hessian(h: jax.Array, spec: QuantSpec) -> jax.Array:
  """R H Rᵀ for the block rotation of `spec` (identity for the baselines). h: [n, n], n = k·g."""
  rot = spec.rotation_of()
  if rot.kind == "none":
    return h
  g = spec.block
  pi = jnp.asarray(rot.matrix(), jnp.float32)
  h4 = h.reshape(h.shape[0] // g, g, h.shape[1] // g, g)
  # [nb, g, nb, g]: Π H_ab Πᵀ for every block pair
  h4 = jnp.einsum("pi,aibj,qj->apbq", pi, h4, pi, precision=_HI)
  return h4.reshape(h.shape)


def damped(h: jax.Array, damp: float = DAMP) -> jax.Array:
  """H + damp · mean(diag H) · I; the identity where H carries no data (trace 0)."""
  mean = jnp.mean(jnp.diag(h))
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  return jnp.where(mean > 0, h + damp * mean * eye, eye)


def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
  """Upper-triangular U with H⁻¹ = Uᵀ U (GPTQ's `cholesky(cholesky_inverse(cholesky(H)), upper)`).
  Computed in float64 on the host for robustness; h: [n, n] positive definite."""
  h64 = np.asarray(h, np.float64)
  hinv = np.linalg.inv(h64)
  hinv = (hinv + hinv.T) / 2
  return jnp.asarray(np.linalg.cholesky(hinv).T, jnp.float32)


# ----------------------------------------------------------------------------- GPTQ
@functools.partial(jax.jit, static_argnames=("spec",))
def _gptq_rows(w: jax.Array, u: jax.Array, spec: QuantSpec):
  """GPTQ on rows w [R, n] with the upper factor u [n, n]. -> (level idx [R, n], scales [R, nb])."""
  g = spec.block
  n = w.shape[1]
  levels, mids = _grid(spec)

  def block_step(b, carry):
    w, idx, scales = carry
    i1 = b * g
    wb = jax.lax.dynamic_slice_in_dim(w, i1, g, axis=1)  # [R, g]
    ub = jax.lax.dynamic_slice(u, (i1, i1), (g, g))  # [g, g]
    div, scale = data_free_scale(wb, spec)  # [R] from the error-updated block

    def col_step(j, c):
      wb, kb, err = c
      col = jax.lax.dynamic_index_in_dim(wb, j, axis=1, keepdims=False)
      k, q = _round(col, div, scale, levels, mids)
      e = (col - q) / ub[j, j]
      # push this column's error onto the block's later columns (u is upper triangular)
      wb = wb - e[:, None] * ub[j][None, :]
      kb = jax.lax.dynamic_update_index_in_dim(kb, k, j, axis=1)
      err = jax.lax.dynamic_update_index_in_dim(err, e, j, axis=1)
      return wb, kb, err

    zeros = jnp.zeros_like(wb)
    _, kb, err = jax.lax.fori_loop(0, g, col_step, (wb, zeros.astype(jnp.int32), zeros))
    # lazy update of every later column: rows of u in this block, columns after it
    later = jnp.arange(n) >= i1 + g
    urows = jax.lax.dynamic_slice_in_dim(u, i1, g, axis=0) * later[None, :]  # [g, n]
    w = w - jnp.dot(err, urows, precision=_HI)
    idx = jax.lax.dynamic_update_slice_in_dim(idx, kb, i1, axis=1)
    scales = jax.lax.dynamic_update_index_in_dim(scales, scale, b, axis=1)
    return w, idx, scales

  r = w.shape[0]
  init = (w, jnp.zeros((r, n), jnp.int32), jnp.zeros((r, n // g), jnp.float32))
  _, idx, scales = jax.lax.fori_loop(0, n // g, block_step, init)
  return idx, scales


# ----------------------------------------------------------------------------- awq-scale
AWQ_GRID = tuple(float(a) for a in np.linspace(0.70, 1.30, 31))


@functools.partial(jax.jit, static_argnames=("spec",))
def _awq_rows(w: jax.Array, d: jax.Array, spec: QuantSpec):
  """Scale search per block minimizing Σ d·err². w: [R, n]; d: [n] = diag(H) (rotated basis)."""
  g = spec.block
  levels, mids = _grid(spec)
  wb = w.reshape(w.shape[0], -1, g)  # [R, nb, g]
  db = d.reshape(-1, g)  # [nb, g]
  div, base = data_free_scale(wb, spec)  # [R, nb]

  def codes_err(divisor, scale):
    k, q = _round(wb, divisor[..., None], scale[..., None], levels, mids)
    return k, jnp.sum(db * (wb - q) ** 2, axis=-1)

  def body(i, c):
    best_err, best, best_k = c
    scale = _stored(base * jnp.asarray(AWQ_GRID)[i], spec)
    k, e = codes_err(scale, scale)
    better = e < best_err
    return (jnp.where(better, e, best_err), jnp.where(better, scale, best),
            jnp.where(better[..., None], k, best_k))

  k0, e0 = codes_err(div, base)  # round-to-nearest is the first candidate
  _, scale, k = jax.lax.fori_loop(0, len(AWQ_GRID), body, (e0, base, k0))
  # closed-form weighted refit of each block's scale for the chosen codes
  c = levels[k]
  num, den = jnp.sum(db * c * wb, -1), jnp.sum(db * c * c, -1)
  refit = _stored(jnp.where(den > 0, num / jnp.where(den > 0, den, 1), scale), spec)
  better = err_of_codes(wb, c, refit, db) < err_of_codes(wb, c, scale, db)
  return k.reshape(w.shape), jnp.where(better, refit, scale)


def err_of_codes(wb, c, scale, db):
  return jnp.sum(db * (wb - c * scale[..., None]) ** 2, axis=-1)


# ----------------------------------------------------------------------------- refit
@functools.partial(jax.jit, static_argnames=("spec",))
def refit_scales(w: jax.Array, h: jax.Array, k: jax.Array, scales: jax.Array, spec: QuantSpec):
  """Weighted least-squares scales of each row's blocks for fixed codes.

  Minimizes (w − ŵ)ᵀ H (w − ŵ) over the row's block scales s (ŵ_block = s_b · levels[k_block]):
  s = M⁻¹ v with M_ab = c_aᵀ H_ab c_b, v_a = c_aᵀ (H w)_a. Rows whose refit does not lower the
  objective (after rounding the scales to their storage dtype) keep their scales.

  Args:
    w: [R, n] rotated weight rows; h: [n, n] (damped) H in the same basis; k: [R, n] level
    indices; scales: [R, nb].
  """
  g = spec.block
  levels, _ = _grid(spec)
  r, n = w.shape
  nb = n // g
  c4 = levels[k].reshape(r, nb, g)
  h4 = h.reshape(nb, g, nb, g)
  # [R, nb(b), nb(a), g]: H_ab c_b for each block pair
  hc = jnp.einsum("aibj,rbj->rbai", h4, c4, precision=_HI)
  m = jnp.einsum("rbai,rai->rab", hc, c4, precision=_HI)  # [R, nb, nb]
  v = jnp.einsum("rai,rai->ra", c4, (w @ h).reshape(r, nb, g), precision=_HI)
  ridge = 1e-6 * jnp.trace(m, axis1=1, axis2=2)[:, None, None] / nb + 1e-30
  s = jnp.linalg.solve(m + ridge * jnp.eye(nb), v[..., None])[..., 0]
  s = _stored(jnp.where(jnp.isfinite(s), s, scales), spec)

  def objective(sc):
    e = w - (c4 * sc[..., None]).reshape(r, n)
    return jnp.einsum("ri,ij,rj->r", e, h, e, precision=_HI)

  keep = ~(objective(s) < objective(scales))
  return jnp.where(keep[:, None], scales, s)


# ----------------------------------------------------------------------------- entry point
def quantize_rows(w: jax.Array, h: jax.Array, spec: QuantSpec, method: str = "gptq",
                  damp: float = DAMP, refit: bool = True) -> tuple[jax.Array, jax.Array]:
  """Rounds weight rows on spec's grid using H.

  Args:
    w: [R, n] float32 rows in the ORIGINAL basis, n a multiple of spec.block (already planned).
    h: [n, n] Σ x xᵀ of the inputs (original basis); only its diagonal is used by awq-scale.
    spec: the quantizer (method tq, int or nf4; spec.block = g).
    method: "gptq" or "awq-scale".
    refit: GPTQ's weighted least-squares scale refit (off: plain GPTQ/LDLQ scales).
  Returns:
    (stored codes [R, n] int32, scales [R, n / g] float32 as stored).
  """
  check_method(method)
  if spec.method not in ("tq", "int", "nf4"):
    raise ValueError(f"calibration supports methods tq, int and nf4, not {spec.method!r}")
  g = spec.block
  rot = spec.rotation_of()
  # rows in the basis the codes live in: Π w per block
  wr = rot.apply(w.reshape(w.shape[0], -1, g)).reshape(w.shape) if spec.rotates else w
  hr = damped(rotate_hessian(h.astype(jnp.float32), spec), damp)
  code_of = _code_of_level(spec)
  u = inverse_cholesky_upper(hr) if method == "gptq" else None
  ks, ss = [], []
  for r0 in range(0, w.shape[0], ROW_CHUNK):
    chunk = wr[r0:r0 + ROW_CHUNK]
    if method == "gptq":
      k, s = _gptq_rows(chunk, u, spec)
      if refit:
        s = refit_scales(chunk, hr, k, s, spec)
    else:
      k, s = _awq_rows(chunk, jnp.diag(hr), spec)
    ks.append(code_of[k])
    ss.append(s)
  return jnp.concatenate(ks), jnp.concatenate(ss)


def quantize_weight(w: jax.Array, h: jax.Array, spec: QuantSpec, layout: Layout = MATH_LAYOUT,
                    method: str = "gptq", damp: float = DAMP, refit: bool = True) -> QArray:
  """A weight quantized with calibration statistics, as the same `QArray` the data-free
  quantizer makes.

  Args:
    w: the weight in its params layout ([*batch, *in, *out], or in_last).
    h: [*batch, n_in, n_in] Σ x xᵀ over the inputs that reach it (per expert for batch axes),
      inputs flattened in the weight's input-axis order.
  """
  blocks, spec = to_blocks(w, spec, layout)  # [*batch, R, nb, g]
  batch = blocks.shape[:-3]
  r, n = blocks.shape[-3], blocks.shape[-2] * blocks.shape[-1]
  rows = blocks.reshape(-1, r, n)
  n_in = h.shape[-1]
  hs = jnp.asarray(h, jnp.float32).reshape(-1, n_in, n_in)
  if hs.shape[0] != rows.shape[0]:
    raise ValueError(f"H has {hs.shape[0]} batch entries for a weight with {rows.shape[0]}")
  if n != n_in:  # padded inputs carry no data
    hs = jnp.pad(hs, [(0, 0), (0, n - n_in), (0, n - n_in)])
  out = [quantize_rows(rows[i], hs[i], spec, method, damp, refit) for i in range(rows.shape[0])]
  idx = jnp.stack([o[0] for o in out]).reshape(*batch, r, n)
  scales = jnp.stack([o[1] for o in out]).reshape(*batch, r, n // spec.block)
  return assemble(spec, layout, w.shape, w.dtype, idx, scales)


def row_errors(w: jax.Array, q: QArray, h: jax.Array) -> jax.Array:
  """(ΔW H ΔWᵀ)_rr per output row, summed over the batch (experts), in the original basis: each
  row's squared output error over the calibration inputs.

  Args:
    w: the float weight [*batch, *in, *out] (or in_last); q: its quantization;
    h: [*batch, n_in, n_in]. Returns [R] float32.
  """
  blocks, _ = to_blocks(w - dequantize(q).astype(w.dtype), q.spec, q.layout)
  n_in = h.shape[-1]
  e = blocks.reshape(*blocks.shape[:-2], -1)[..., :n_in]  # [*batch, R, n_in]
  return _row_errors(e.reshape(-1, *e.shape[-2:]),
                     jnp.asarray(h, jnp.float32).reshape(-1, n_in, n_in))


@jax.jit
def _row_errors(e, h):
  """e [B, R, n], h [B, n, n] -> [R]: diag(E H Eᵀ) summed over B."""
  return jnp.sum(jnp.einsum("bri,bij->brj", e, h, precision=_HI) * e, axis=(0, 2))


def weighted_error(w: jax.Array, q: QArray, h: jax.Array) -> float:
  """tr((W − Ŵ) H (W − Ŵ)ᵀ): the summed squared output error over the calibration inputs."""
  return float(jnp.sum(row_errors(w, q, h)))


def hessian_of(x: jax.Array) -> jax.Array:
  """Σ x xᵀ over the rows of x [M, n] in float32. -> [n, n]."""
  x = x.astype(jnp.float32)
  return jnp.einsum("mi,mj->ij", x, x, precision=_HI)


def bits_of(spec: QuantSpec) -> float:
  """Stored bits per weight of a spec (codes plus one scale per block of g)."""
  return spec.bits + 8 * jnp.dtype(spec.scale_dtype).itemsize / spec.block


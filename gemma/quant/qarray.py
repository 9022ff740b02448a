"""The quantized-array pytree and the reference ways to consume it (dequantize, matmul, take).

Every format here decodes the same way: a weight row (the vector over the contracted input axes,
one per output channel) is cut into blocks of g inputs, each block stores b-bit codes and one
scale, and

    rotated block = scale · table[code]      (+ γ·√(π/2)/g · Sᵀ qjl for TurboQuant_prod)
    weight block  = Πᵀ · rotated block       (Π = I for the RTN / NF4 baselines)

so y = W x is computed as y = Σ_blocks scale ⊙ (table[code] · (Π x_block)): the activation is
rotated once per input block and the weights are never rotated back.

Layouts (static `Layout`): math layout `[*batch, *in, *out]` (q [D, N, H], o [N, H, D], experts
[E, D, I] with batch_ndim=1), or `in_last` `[*batch, *out, *in]` for tables read by row (the
embedding [V, D], which is also the tied LM head 'btd,vd->btv'; the PLE table [V, L, P]). Codes are
packed along the flattened input axes, which stay where they were; output axes keep their shape:
  codes  [*batch, n_in·b/32, *out]  uint32     (in_last: [*batch, *out, n_in·b/32])
  scales [*batch, n_in/g, *out]     float16    (in_last: [*batch, *out, n_in/g])
n_in is zero-padded up to a multiple of g when needed (tiny test shapes only).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma.quant import codebook, packing
from gemma.quant.rotation import Rotation, gaussian_np
from pallas_kernels import registry

METHODS = ("tq", "tq_prod", "int", "nf4")
SCALE_FITS = ("norm", "unbiased", "lsq")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize a tensor (static, hashable).

  method: "tq" (TurboQuant_mse), "tq_prod" (TurboQuant_prod: b-1 bit codes + 1-bit QJL), "int"
  (round-to-nearest, absmax scale per block), "nf4" (NormalFloat-4, absmax scale per block).
  block: g, inputs per (row, block) scale; a power of two >= 32 (smaller when n_in needs it).
  rotation: "haar" | "hadamard" | "none" (TurboQuant only; baselines never rotate).
  law: TurboQuant codebook law: "beta" (exact for dimension g), "gauss" (the N(0, 1/g) limit) or
    "poly" (an odd polynomial in the code fit to "beta": a kernel evaluates it with FMAs).
  scale_fit: TurboQuant_mse's per-block scale: "norm" (the paper: ‖w_block‖), "unbiased"
    (‖w_block‖ / (1 - D_mse(b)), removing the shrinkage E⟨u, ũ⟩ = 1 - D_mse(b)) or "lsq" (the
    least-squares scale for the chosen codes, ‖w‖ ⟨Πu, c⟩ / ⟨c, c⟩: the lowest MSE for those
    codes).
  """

  method: str = "tq"
  bits: int = 4
  block: int = 128
  rotation: str = "haar"
  rounds: int = 2
  seed: int = 0
  law: str = "beta"
  scale_dtype: str = "float16"
  scale_fit: str = "norm"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method {self.method!r}; expected one of {METHODS}")
    if self.scale_fit not in SCALE_FITS:
      raise ValueError(f"scale_fit {self.scale_fit!r}; expected one of {SCALE_FITS}")
    if self.scale_fit != "norm" and self.method != "tq":
      raise ValueError(f"scale_fit={self.scale_fit!r} applies to method 'tq' only")
    if self.law not in codebook.LAWS:
      raise ValueError(f"law {self.law!r}; expected one of {codebook.LAWS}")
    if self.block < 32 or self.block & (self.block - 1):
      raise ValueError(f"block={self.block} must be a power of two >= 32")
    if self.method == "nf4" and self.bits != 4:
      raise ValueError("nf4 is 4 bits")
    if self.method == "tq_prod" and self.bits < 2:
      raise ValueError("tq_prod weights need bits >= 2 (b - 1 code bits + 1 QJL bit)")

  @property
  def code_bits(self) -> int:
    """Bits of the scalar code (TurboQuant_prod spends one of its bits on the QJL sign)."""
    return self.bits - 1 if self.method == "tq_prod" else self.bits

  @property
  def rotates(self) -> bool:
    return self.method in ("tq", "tq_prod") and self.rotation != "none"

  def rotation_of(self) -> Rotation:
    kind = self.rotation if self.rotates else "none"
    return Rotation(kind=kind, g=self.block, seed=self.seed, rounds=self.rounds)

  def table(self) -> np.ndarray:
    """[2^code_bits] float32 value of each code, in units of the block's scale."""
    if self.method == "int":
      return codebook.int_levels(self.bits).astype(np.float32)
    if self.method == "nf4":
      return codebook.nf4_levels().astype(np.float32)
    return codebook.sphere_codebook(self.code_bits, self.block, self.law)[0]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which axes of a weight are batch (experts), contracted inputs, and outputs (rows)."""

  batch_ndim: int = 0
  in_ndim: int = 1
  in_last: bool = False  # False: [*batch, *in, *out] (math layout); True: [*batch, *out, *in]

  def split(self, shape: tuple[int, ...]):
    """(batch, in, out) shapes of a tensor of `shape`."""
    b, rest = tuple(shape[:self.batch_ndim]), tuple(shape[self.batch_ndim:])
    if self.in_last:
      return b, rest[len(rest) - self.in_ndim:], rest[:len(rest) - self.in_ndim]
    return b, rest[:self.in_ndim], rest[self.in_ndim:]


MATH_LAYOUT = Layout()  # [*in, *out], one contracted axis: the default of every quantizer


def plan_block(n_in: int, block: int) -> tuple[int, int]:
  """(g, padded n_in): the largest power-of-two g <= block (and >= 32) dividing n_in, else pad."""
  g = block
  while g > 32 and n_in % g:
    g //= 2
  if n_in % g:
    g = min(block, max(32, 1 << (n_in - 1).bit_length()))
  return g, -(-n_in // g) * g


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized weight. Children: packed codes, per-(row, block) scales, and for TurboQuant_prod
  the packed QJL signs and residual norms γ. Static: spec (with the block actually used), layout,
  the original shape and dtype."""

  codes: jax.Array  # uint32 packed codes (see module docstring)
  scales: jax.Array  # per-(row, block) norm (TurboQuant) or absmax scale (baselines)
  qjl: jax.Array | None = None  # uint32 packed sign bits (tq_prod), laid out like codes
  gamma: jax.Array | None = None  # residual norms (tq_prod), laid out like scales
  spec: QuantSpec = QuantSpec()  # static
  layout: Layout = Layout()  # static
  shape: tuple[int, ...] = ()  # static: the original weight's shape
  dtype_name: str = "float32"  # static: the original weight's dtype

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def dims(self):
    """(batch shape, n_in, padded n_in, out shape, n_out)."""
    b, i, o = self.layout.split(self.shape)
    n_in = math.prod(i)
    return b, n_in, -(-n_in // self.spec.block) * self.spec.block, o, math.prod(o)

  def __gemma_einsum__(self, spec: str, x: jax.Array, out_dtype=None) -> jax.Array:
    return einsum(spec, x, self, out_dtype=out_dtype)

  def __gemma_ragged_dot__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return ragged_dot(x, self, group_sizes)

  def __getitem__(self, ids):
    return take(self, ids)

  def astype(self, dtype) -> jax.Array:
    """The dequantized weight in `dtype`: a correct but slow fallback for array-only code paths."""
    return dequantize(self).astype(dtype)


jax.tree_util.register_dataclass(
    QArray, data_fields=["codes", "scales", "qjl", "gamma"],
    meta_fields=["spec", "layout", "shape", "dtype_name"])


def nbytes(q: QArray) -> int:
  """Stored bytes (works on arrays and on jax.ShapeDtypeStruct leaves)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(q))


def bits_per_weight(q: QArray) -> float:
  """Stored bits per original weight, scales and QJL side data included."""
  return 8 * nbytes(q) / q.size


# ----------------------------------------------------------------------------- row layouts
def rows_to_stored(a: jax.Array, layout: Layout, out_shape: tuple[int, ...]) -> jax.Array:
  """[*batch, n_out, m] -> stored layout ([*batch, m, *out] or [*batch, *out, m])."""
  *batch, _, m = a.shape
  if layout.in_last:
    return a.reshape(*batch, *out_shape, m)
  return jnp.swapaxes(a, -1, -2).reshape(*batch, m, *out_shape)


def stored_to_rows(a: jax.Array, layout: Layout) -> jax.Array:
  """Stored layout -> [*batch, n_out, m] (inverse of `rows_to_stored`)."""
  batch = a.shape[:layout.batch_ndim]
  if layout.in_last:
    return a.reshape(*batch, -1, a.shape[-1])
  m = a.shape[layout.batch_ndim]
  return jnp.swapaxes(a.reshape(*batch, m, -1), -1, -2)


def assemble(spec: QuantSpec, layout: Layout, shape, dtype, idx, scales, qjl=None,
             gamma=None) -> QArray:
  """Packs row-form results into a QArray.

  Args:
    idx: [*batch, n_out, n_pad] integer codes; scales: [*batch, n_out, n_pad / g];
    qjl: [*batch, n_out, n_pad] in {0, 1} (sign bit set = +1), gamma like scales (tq_prod only).
  """
  out_shape = layout.split(tuple(shape))[2]
  sd = jnp.dtype(spec.scale_dtype)

  def store(a, bits=None):
    a = packing.pack(a, bits, axis=-1) if bits else a.astype(sd)
    return rows_to_stored(a, layout, out_shape)

  return QArray(codes=store(idx, spec.code_bits), scales=store(scales),
                qjl=None if qjl is None else store(qjl, 1),
                gamma=None if gamma is None else store(gamma), spec=spec, layout=layout,
                shape=tuple(int(s) for s in shape), dtype_name=jnp.dtype(dtype).name)


def to_blocks(w: jax.Array, spec: QuantSpec, layout: Layout):
  """Weight rows cut into blocks, ready to quantize.

  Returns:
    (blocks [*batch, n_out, n_pad / g, g] float32, spec with the block g actually used).
  """
  batch, in_shape, out_shape = layout.split(tuple(w.shape))
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  g, n_pad = plan_block(n_in, spec.block)
  if layout.in_last:
    r = w.reshape(*batch, n_out, n_in)
  else:
    r = jnp.swapaxes(w.reshape(*batch, n_in, n_out), -1, -2)
  r = r.astype(jnp.float32)
  if n_pad != n_in:
    r = jnp.pad(r, [(0, 0)] * (r.ndim - 1) + [(0, n_pad - n_in)])
  return r.reshape(*batch, n_out, n_pad // g, g), dataclasses.replace(spec, block=g)


# ---------------------------------------------------------------------------- decoding
def _decode(spec: QuantSpec, n_pad: int, codes, scales, qjl=None, gamma=None) -> jax.Array:
  """Rotated-domain values [..., n_pad] float32 from row-form stored data [..., words]."""
  g = spec.block
  table = jnp.asarray(spec.table())
  idx = packing.unpack(codes, spec.code_bits, n_pad, axis=-1)
  # [..., n_pad / g, g]
  v = table[idx.astype(jnp.int32)].reshape(*idx.shape[:-1], n_pad // g, g)
  if spec.method == "tq_prod":
    z = packing.unpack(qjl, 1, n_pad, axis=-1).astype(jnp.float32) * 2 - 1
    s = jnp.asarray(gaussian_np(spec.seed, g), jnp.float32)
    sz = jnp.einsum("...j,jk->...k", z.reshape(v.shape), s, precision=jax.lax.Precision.HIGHEST)
    v = v + (math.sqrt(math.pi / 2) / g) * gamma.astype(jnp.float32)[..., None] * sz
  v = v * scales.astype(jnp.float32)[..., None]
  return v.reshape(*v.shape[:-2], n_pad)


def _rows(q: QArray, name: str):
  a = getattr(q, name)
  return None if a is None else stored_to_rows(a, q.layout)


def rotated_rows(q: QArray) -> jax.Array:
  """[*batch, n_out, n_pad] float32: every row in the rotated domain (scale ⊙ table[code])."""
  return _decode(q.spec, q.dims[2], *(_rows(q, f) for f in ("codes", "scales", "qjl", "gamma")))


def _unrotate_rows(q: QArray, r: jax.Array) -> jax.Array:
  """Rotated rows [..., n_pad] -> weight rows [..., n_in] (Πᵀ per block, padding dropped)."""
  g, n_in = q.spec.block, q.dims[1]
  r = q.spec.rotation_of().inverse(r.reshape(*r.shape[:-1], -1, g))
  return r.reshape(*r.shape[:-2], -1)[..., :n_in]


@jax.jit
def dequantize(q: QArray) -> jax.Array:
  """The weight that q represents, in its original shape and dtype."""
  batch, _, _, out_shape, _ = q.dims
  in_shape = q.layout.split(q.shape)[1]
  w = _unrotate_rows(q, rotated_rows(q))  # [*batch, n_out, n_in]
  if q.layout.in_last:
    w = w.reshape(*batch, *out_shape, *in_shape)
  else:
    w = jnp.swapaxes(w, -1, -2).reshape(*batch, *in_shape, *out_shape)
  return w.astype(q.dtype)


def rotate_input(x: jax.Array, q: QArray) -> jax.Array:
  """Π x per input block. x: [..., n_in] -> [..., n_pad] (zero padding rotated along)."""
  _, n_in, n_pad, _, _ = q.dims
  if n_pad != n_in:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n_in)])
  xb = q.spec.rotation_of().apply(x.reshape(*x.shape[:-1], -1, q.spec.block))
  return xb.reshape(*x.shape[:-1], n_pad)


def rotated_weight(q: QArray, dtype=jnp.float32) -> jax.Array:
  """(W Πᵀ)_q as a matrix: [*batch, n_pad, n_out] (in_last: [*batch, n_out, n_pad])."""
  r = rotated_rows(q).astype(dtype)
  return r if q.layout.in_last else jnp.swapaxes(r, -1, -2)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def qmatmul(x: jax.Array, q: QArray, out_dtype=None) -> jax.Array:
  """y = x @ W for a 2-D-able weight: x [..., n_in] -> [..., n_out] (out axes flattened).

  Computed as (Π x) @ (scale ⊙ table[code]): the activation is rotated once, the weight never.
  """
  if q.layout.batch_ndim:
    raise ValueError("qmatmul takes weights without batch axes; use ragged_dot for experts")
  xr = rotate_input(x, q)
  if q.spec.method != "tq_prod":  # one codebook per weight: the kernel registry's op
    _, _, n_pad, _, n_out = q.dims
    lead = xr.shape[:-1]
    y = registry.call(
        "codebook_matmul", xr.reshape(-1, n_pad), q.codes.reshape(-1, q.codes.shape[-1])
        if q.layout.in_last else q.codes.reshape(q.codes.shape[0], -1),
        q.scales.reshape(n_out, -1) if q.layout.in_last else q.scales.reshape(-1, n_out),
        tuple(float(t) for t in q.spec.table()), bits=q.spec.code_bits, block=q.spec.block,
        transposed=q.layout.in_last, out_dtype=out_dtype or x.dtype)
    return y.reshape(*lead, n_out)
  w = rotated_weight(q, x.dtype)
  spec = "...i,oi->...o" if q.layout.in_last else "...i,io->...o"
  y = jnp.einsum(spec, xr, w, preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "out_dtype"))
def einsum(spec: str, x: jax.Array, q: QArray, out_dtype=None) -> jax.Array:
  """`jnp.einsum(spec, x, W)` for a quantized W, output in `out_dtype` (default x's dtype).

  Specs that contract x's trailing axes with all of W's input axes and list the output as x's
  leading axes then W's output axes ('btd,dnh->btnh', 'btnh,nhd->btd', 'btd,vd->btv', ...) run
  as `qmatmul`; any other spec falls back to `jnp.einsum` on `dequantize(q)`.
  """
  operands, out = spec.replace(" ", "").split("->")
  xs, ws = operands.split(",")
  lay, k = q.layout, q.layout.in_ndim
  w_in = ws[len(ws) - k:] if lay.in_last else ws[:k]
  w_out = ws[:len(ws) - k] if lay.in_last else ws[k:]
  lead = xs[:len(xs) - k]
  direct = (lay.batch_ndim == 0 and len(ws) == q.ndim and xs.endswith(w_in)
            and out == lead + w_out and not set(lead) & set(ws) and not set(w_in) & set(out))
  if not direct:
    y = jnp.einsum(spec, x, dequantize(q).astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)
  lead_shape = x.shape[:x.ndim - k]
  y = qmatmul(x.reshape(*lead_shape, -1), q, out_dtype)
  return y.reshape(*lead_shape, *q.dims[3])


@jax.jit
def take(q: QArray, ids: jax.Array) -> jax.Array:
  """Rows of a table read by integer index, `W[ids]`, decoding only those rows.

  For `in_last` tables ([V, D] -> [*ids.shape, D]; [V, L, P] -> [*ids.shape, L, P]); other
  layouts dequantize the whole weight first.
  """
  ids = jnp.asarray(ids)
  if q.layout.batch_ndim or not q.layout.in_last:
    return dequantize(q)[ids]
  in_shape = q.layout.split(q.shape)[1]
  fields = [None if a is None else a[ids] for a in (q.codes, q.scales, q.qjl, q.gamma)]
  r = _unrotate_rows(q, _decode(q.spec, q.dims[2], *fields))
  return r.reshape(*r.shape[:-1], *in_shape).astype(q.dtype)


@jax.jit
def ragged_dot(lhs: jax.Array, q: QArray, group_sizes: jax.Array) -> jax.Array:
  """`jax.lax.ragged_dot(lhs, W, group_sizes)` for quantized experts W [E, *in, *out].

  lhs: [A, n_in] rows sorted by expert. Returns [A, n_out] in lhs's dtype. One rotation Π is
  shared by all experts, so the rows are rotated once.
  """
  if q.layout.batch_ndim != 1 or q.layout.in_last:
    raise ValueError("ragged_dot takes [E, *in, *out] weights (batch_ndim=1, math layout)")
  out = jax.lax.ragged_dot(rotate_input(lhs, q), rotated_weight(q, lhs.dtype), group_sizes,
                           preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)

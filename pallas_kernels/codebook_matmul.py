"""Codebook-dequant matmul: y = x @ W for b-bit packed codes W = scale ⊙ table[code] (b = 1..8).

The weight never exists in HBM in floating point: each program loads the packed uint32 words of
one block of g inputs, unpacks them with shifts and masks, turns codes into values in registers
and multiplies on tensor cores (`jnp.dot`, M padded to >= 16), then applies the per-(block,
column) scale to the partial product (one multiply per output per block, not per weight).

Notation: M rows of activations, K contracted inputs (a multiple of the block g), N outputs.
  x       [M, K]            activations (already rotated, or rotated in-kernel by `rotation`)
  codes   [K·b/32, N]       uint32; with transposed=True [N, K·b/32] (tables read by row)
  scales  [K/g, N]          per-(block, column) scale; transposed: [N, K/g]
  table   tuple of 2^b floats: the value of each code in units of the scale (static)
  rotation  optional [g, g] Π: the kernel then rotates each x block itself (x_blk @ Πᵀ)
  y       [M, N]            in out_dtype (default x's dtype); accumulation in float32

Packing (bit planes of power-of-two widths w, widest first, concatenated along K): a plane of
width w holds 32/w codes per word, code j of a word in bits [j·w, (j+1)·w); b = 3 is a 2-bit plane
then a 1-bit plane. Each plane is read through its own row offset, so no code straddles a word.

Paths: M <= 16 (decode) uses bm = 16 and splits K over `split_k` programs per output tile (partial
sums added by one XLA reduction); larger M (prefill) tiles M and N with no split. The code-to-value
step (`codebook_lookup`) is an affine int-to-float conversion for arithmetic progressions (int
baselines), Horner for odd polynomials ("poly" codebooks), a select tree over the code's bits
otherwise (halved for antisymmetric tables).

Byte-permute decode: in bf16, 4-bit antisymmetric tables (every TurboQuant 4-bit codebook) skip
the float lookup altogether: `prmt_lut` turns two words into 16 bf16 values packed in pairs by
PTX `prmt` table lookups (2.5 instructions per weight; interpret mode runs the same operations
in jnp). Other tables, widths and f32 inputs use `lookup_field`.

Field slabs (one plane of width w in {1, 2, 4, 8}, R = g·w/32 >= 16 words per block, no fused
rotation; e.g. 4 bits at g = 128): each block is read as its [R, bn] words once, and field s of
every word is decoded in place (`lookup_field`) into a [R, bn] slab multiplied with the inputs
whose code it holds, x[:, r·32/w + s]; `codebook_matmul` reorders x's inputs block by block so
that those are contiguous (`_slab_order`). The slabs' products are chained through the
accumulator. Triton then decodes each weight directly in the tensor-core operand layout (the
words go through shared memory, the decoded tile does not), where the whole-tile unpack
([g·w/32, 32/w, bn] -> [g, bn]) staged every decoded value through shared memory one 16-bit
store at a time (`docs/BENCHMARKS.md`, compile report).

`codebook_matmul_reference` computes the same product in plain jnp (unpack, gather, scale, dot).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import prmt_lut
from pallas_kernels.codebook_lookup import _affine, _odd_poly, lookup, lookup_field  # noqa: F401

_HIGHEST = jax.lax.Precision.HIGHEST
# bf16 4-bit antisymmetric tables decode by byte permutes (`prmt_lut`); GEMMA_KERNEL_PRMT=0 turns
# it off (the asm compiles for sm_80/sm_90 but has not run on a GPU yet: scripts/gpu_check.sh)
PRMT_DECODE = os.environ.get("GEMMA_KERNEL_PRMT", "1") != "0"


def planes(bits: int) -> tuple[int, ...]:
  """Plane widths of a b-bit code, widest first (plane 0 holds the low bits)."""
  if not 1 <= bits <= 8:
    raise ValueError(f"bits={bits} must be in 1..8")
  return tuple(w for w in (8, 4, 2, 1) if bits & w)


def _check(x, codes, scales, table, bits, block, transposed, rotation):
  """(M, K, N) of a valid call; ValueError naming the first inconsistency."""
  if x.ndim != 2 or codes.ndim != 2 or scales.ndim != 2:
    raise ValueError(f"x, codes and scales must be 2-D; got {x.shape}, {codes.shape}, "
                     f"{scales.shape}")
  m, k = x.shape
  n = codes.shape[0] if transposed else codes.shape[1]
  words = codes.shape[1] if transposed else codes.shape[0]
  if codes.dtype != jnp.uint32:
    raise ValueError(f"codes must be uint32, got {codes.dtype}")
  if block < 32 or block & (block - 1) or k % block:
    raise ValueError(f"block={block} must be a power of two >= 32 dividing K={k}")
  if words != k * bits // 32:
    raise ValueError(f"{words} words do not hold K={k} codes of {bits} bits")
  want = (n, k // block) if transposed else (k // block, n)
  if scales.shape != want:
    raise ValueError(f"scales shape {scales.shape}; expected {want}")
  if len(table) != 2 ** bits:
    raise ValueError(f"table has {len(table)} entries; {bits} bits need {2 ** bits}")
  if rotation is not None and rotation.shape != (block, block):
    raise ValueError(f"rotation shape {rotation.shape}; expected {(block, block)}")
  return m, k, n


def _unpack(words: list[jax.Array], bits: int, g: int, transposed: bool) -> jax.Array:
  """int32 codes [g, bn] (transposed: [bn, g]) of one block from its per-plane words."""
  code, shift = None, 0
  for w, v in zip(planes(bits), words, strict=True):
    per = 32 // w
    offsets = jax.lax.broadcasted_iota(jnp.uint32, (1, per, 1), 1) * w
    if transposed:  # [bn, g·w/32] -> [bn, g·w/32, per] -> [bn, g]
      c = (v[:, :, None] >> jnp.swapaxes(offsets, 1, 2)) & ((1 << w) - 1)
      c = c.reshape(v.shape[0], g)
    else:  # [g·w/32, bn] -> [g·w/32, per, bn] -> [g, bn]
      c = (v[:, None, :] >> offsets) & ((1 << w) - 1)
      c = c.reshape(g, v.shape[1])
    c = c.astype(jnp.int32) << shift
    code = c if code is None else code | c
    shift += w
  return code


def _kernel(x_ref, *refs, bits, g, bm, bn, blocks_per_split, n_blocks, k, table, transposed,
            rotated, slabs=False, lut=None):
  nplanes = len(planes(bits))
  rot_ref = refs[nplanes + 1] if rotated else None
  code_refs, scale_ref, o_ref = refs[:nplanes], refs[nplanes], refs[-1]
  s, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  first = s * blocks_per_split
  last = jnp.minimum(first + blocks_per_split, n_blocks)
  rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)
  # word offset of each plane along K, and its words per block
  starts = np.cumsum((0,) + tuple(k * w // 32 for w in planes(bits)))
  per_block = tuple(g * w // 32 for w in planes(bits))

  if slabs:
    return _slab_kernel(x_ref, code_refs[0], scale_ref, o_ref, bits=bits, g=g, bm=bm, bn=bn,
                        first=first, last=last, table=table, transposed=transposed, lut=lut)

  def body(blk, acc):
    x = x_ref[rows, pl.ds(blk * g, g)]  # [bm, g]
    if rotated:  # Π x per block: [bm, g] @ Πᵀ
      x = jnp.dot(x, rot_ref[...].T.astype(x.dtype), precision=_HIGHEST,
                  preferred_element_type=jnp.float32).astype(x.dtype)
    if transposed:  # words [bn, g·w/32] per plane
      words = [r[cols, pl.ds(st + blk * pb, pb)] for r, st, pb in zip(
          code_refs, starts, per_block, strict=False)]
      w = lookup(_unpack(words, bits, g, True), table, bits).astype(x.dtype)  # [bn, g]
      part = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                 preferred_element_type=jnp.float32)
      scale = scale_ref[cols, pl.ds(blk, 1)].astype(jnp.float32).T  # [1, bn]
    else:  # words [g·w/32, bn] per plane
      words = [r[pl.ds(st + blk * pb, pb), cols] for r, st, pb in zip(
          code_refs, starts, per_block, strict=False)]
      w = lookup(_unpack(words, bits, g, False), table, bits).astype(x.dtype)  # [g, bn]
      part = jnp.dot(x, w, precision=_HIGHEST, preferred_element_type=jnp.float32)
      scale = scale_ref[pl.ds(blk, 1), cols].astype(jnp.float32)  # [1, bn]
    return acc + part * scale  # [bm, bn]

  acc = jax.lax.fori_loop(first, last, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _slab_kernel(x_ref, code_ref, scale_ref, o_ref, *, bits, g, bm, bn, first, last, table,
                 transposed, lut=None):
  """The decode loop over blocks first..last-1, one [bm, R] x [R, bn] product per field slab;
  x_ref holds x in `_slab_order`."""
  i, j = pl.program_id(1), pl.program_id(2)
  rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)
  per, r = 32 // bits, g * bits // 32

  def body(blk, acc):
    if transposed:
      v = code_ref[cols, pl.ds(blk * r, r)]  # [bn, r]
    else:
      v = code_ref[pl.ds(blk * r, r), cols]  # [r, bn]
    part = None
    if lut is not None:  # bf16 slabs by byte permutes (`prmt_lut`); jnp model in interpret mode
      slabs = (prmt_lut.decode_fields_reference if lut == "reference" else prmt_lut.decode_pairs)(
          v, table)
    for s in range(per):
      xs = x_ref[rows, pl.ds(blk * g + s * r, r)]  # [bm, r]
      if lut is not None:
        w = slabs[s]
      else:
        w = lookup_field(v, s * bits, table, bits).astype(xs.dtype)
      if transposed:
        d = jax.lax.dot_general(xs, w, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                preferred_element_type=jnp.float32)
      else:
        d = jnp.dot(xs, w, precision=_HIGHEST, preferred_element_type=jnp.float32)
      part = d if part is None else part + d
    if transposed:
      scale = scale_ref[cols, pl.ds(blk, 1)].astype(jnp.float32).T
    else:
      scale = scale_ref[pl.ds(blk, 1), cols].astype(jnp.float32)
    return acc + part * scale

  acc = jax.lax.fori_loop(first, last, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _use_slabs(bits: int, g: int, rotated: bool) -> bool:
  """Whether the field-slab path takes this configuration (module docstring)."""
  return bits in (1, 2, 4, 8) and g * bits // 32 >= 16 and not rotated


def _slab_order(x: jax.Array, g: int, bits: int) -> jax.Array:
  """x [M, K] with each block's inputs reordered as the slabs read them: slab s of a block holds
  the inputs whose code is field s of a word (K index r·per + s moves to s·R + r)."""
  m, k = x.shape
  per = 32 // bits
  return x.reshape(m, k // g, g // per, per).swapaxes(-1, -2).reshape(m, k)


# static arguments of `codebook_matmul` and of its reference (the same signature)
_STATIC = ("table", "bits", "block", "transposed", "block_m", "block_n", "split_k", "interpret",
           "out_dtype", "num_warps", "num_stages", "poison")


def _largest_pow2_divisor(n: int, cap: int) -> int:
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def plan(m: int, k: int, n: int, block: int, block_m=None, block_n=None, split_k=None):
  """(bm, bn, split_k) for a problem; NotImplementedError when N has no power-of-two tile >= 16.

  Decode (M <= 16): bm = 16, bn <= 64 and split-K until there are >= 256 programs. Prefill:
  bm = 64, bn <= 128, no split.
  """
  decode = m <= 16
  bm = block_m or (16 if decode else 64)
  bn = block_n or _largest_pow2_divisor(n, 64 if decode else 128)
  if bn < 16 or n % bn or bn & (bn - 1):
    raise NotImplementedError(f"N={n} has no power-of-two column tile >= 16 (got {bn})")
  if bm < 16 or bm & (bm - 1):
    raise ValueError(f"block_m={bm} must be a power of two >= 16")
  n_blocks = k // block
  if split_k is None:
    split_k = 1
    if decode:
      while split_k * 2 <= n_blocks and (n // bn) * split_k < 256:
        split_k *= 2
  return bm, bn, max(1, min(split_k, n_blocks))


@functools.partial(jax.jit, static_argnames=_STATIC)
def codebook_matmul(x, codes, scales, table, rotation=None, *, bits: int, block: int,
                    transposed: bool = False, block_m=None, block_n=None, split_k=None,
                    interpret: bool = False, out_dtype=None, num_warps: int = 4,
                    num_stages: int = 2, poison: bool = False):
  """y = x @ W (x @ Wᵀ-stored when transposed) for packed codebook weights. See module doc.

  Args:
    x: [M, K] float32 or bfloat16. codes, scales, table, rotation: see the module docstring.
    bits, block: code width and scale block g. block_m / block_n / split_k: tiles (None: `plan`).
    poison: fill the output buffer with NaN before the kernel runs (tests: every element must be
      written).
  Returns:
    [M, N] in out_dtype (default x.dtype).
  Raises:
    NotImplementedError for shapes the kernel does not take (N without a power-of-two tile).
  """
  table = tuple(float(t) for t in table)
  m, k, n = _check(x, codes, scales, table, bits, block, transposed, rotation)
  bm, bn, split = plan(m, k, n, block, block_m, block_n, split_k)
  mp = -(-m // bm) * bm
  xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
  slabs = _use_slabs(bits, block, rotation is not None)
  lut = None
  if slabs and PRMT_DECODE and bits == 4 and x.dtype == jnp.bfloat16 and (
      prmt_lut.antisymmetric4(table)):
    lut = "reference" if interpret else "asm"
  if slabs:
    xp = _slab_order(xp, block, bits)
  n_blocks = k // block
  per_split = -(-n_blocks // split)
  kernel = functools.partial(
      _kernel, bits=bits, g=block, bm=bm, bn=bn, blocks_per_split=per_split, n_blocks=n_blocks,
      k=k, table=table, transposed=transposed, rotated=rotation is not None, slabs=slabs, lut=lut)
  operands = [xp] + [codes] * len(planes(bits)) + [scales]
  operands += [rotation.astype(jnp.float32)] if rotation is not None else []
  out_shape = jax.ShapeDtypeStruct((split, mp, n), jnp.float32)
  extra = {}
  if poison:
    operands.append(jnp.full(out_shape.shape, jnp.nan, jnp.float32))
    extra["input_output_aliases"] = {len(operands) - 1: 0}
    kernel = _ignore_last_input(kernel)
  parts = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(split, mp // bm, n // bn),
      in_specs=[pl.no_block_spec] * len(operands),
      out_specs=pl.BlockSpec((None, bm, bn), lambda s, i, j: (s, i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=f"codebook_matmul_{bits}b", **extra)(*operands)
  y = parts[0] if split == 1 else jnp.sum(parts, axis=0)
  return y[:m].astype(out_dtype or x.dtype)


def _ignore_last_input(kernel):
  """Kernel wrapper for an aliased (poisoned) output buffer passed as the last input."""
  def wrapped(*refs):
    return kernel(*refs[:-2], refs[-1])
  return wrapped


def unpack_reference(codes: jax.Array, bits: int, k: int, transposed: bool = False):
  """int32 codes [K, N] (transposed: [N, K]) from packed words, in plain jnp."""
  v = codes.T if transposed else codes  # [K·b/32, N]
  out, start, shift = jnp.zeros((k, v.shape[1]), jnp.int32), 0, 0
  for w in planes(bits):
    per = 32 // w
    words = v[start:start + k // per]  # [K/per, N]
    c = (words[:, None, :] >> (jnp.arange(per, dtype=jnp.uint32) * w)[None, :, None]) & (
        (1 << w) - 1)
    out = out | (c.reshape(k, -1).astype(jnp.int32) << shift)
    start, shift = start + k // per, shift + w
  return out.T if transposed else out


@functools.partial(jax.jit, static_argnames=_STATIC)
def codebook_matmul_reference(x, codes, scales, table, rotation=None, *, bits: int, block: int,
                              transposed: bool = False, block_m=None, block_n=None, split_k=None,
                              interpret: bool = False, out_dtype=None, num_warps: int = 4,
                              num_stages: int = 2, poison: bool = False):
  """`codebook_matmul` in plain jnp (tile, interpret and poison arguments are ignored)."""
  del block_m, block_n, split_k, interpret, num_warps, num_stages, poison
  table = tuple(float(t) for t in table)
  m, k, n = _check(x, codes, scales, table, bits, block, transposed, rotation)
  code = unpack_reference(codes, bits, k, transposed)
  code = code.T if transposed else code  # [K, N]
  sc = (scales.T if transposed else scales).astype(jnp.float32)  # [K/g, N]
  if rotation is not None:  # Π x per block
    xb = jnp.einsum("mbj,ij->mbi", x.reshape(m, k // block, block).astype(jnp.float32),
                    rotation.astype(jnp.float32), precision=_HIGHEST)
    x = xb.reshape(m, k).astype(x.dtype)
  # dequantize-then-dot: W = table[code] ⊙ scale in x's dtype, float32 accumulation
  w = jnp.asarray(table, jnp.float32)[code].reshape(k // block, block, n) * sc[:, None, :]
  y = jnp.dot(x, w.reshape(k, n).astype(x.dtype), precision=_HIGHEST,
              preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


def bytes_read(m: int, k: int, n: int, bits: int, block: int, x_itemsize: int = 2,
               scale_itemsize: int = 2) -> int:
  """HBM bytes one call must read: codes, scales and activations (outputs not counted)."""
  return k * n * bits // 8 + (k // block) * n * scale_itemsize + m * k * x_itemsize

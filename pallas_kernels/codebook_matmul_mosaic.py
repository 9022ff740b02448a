"""4-bit codebook decode matmul as a Pallas Mosaic GPU kernel (Hopper, sm_90a: wgmma).

The same product as `codebook_matmul.codebook_matmul` (y = x @ W, W = scale ⊙ table[code]) and the
same signature, for the case the decode step needs most: 4-bit codes in the standard (column-major
words) layout, bf16/f16 activations, M <= 64 rows. Everything else raises NotImplementedError, so
`registry.call` falls through to the Triton kernel (and from there to XLA). Its reference is
`codebook_matmul.codebook_matmul_reference`.

Formulation ("swap AB", the decode shape): the kernel computes yᵀ = Wᵀ xᵀ on the tensor cores, so
the tiny M becomes the wgmma N (16, 32 or 64) instead of being padded to the 64 rows of a
warpgroup tile, and the weight tile is the wgmma A operand:
  * one CTA (one warpgroup) per (K split, 64-column tile); `plgpu.emit_pipeline` streams the
    K blocks of g inputs through shared memory with TMA (codes [g/8, 64] uint32, scales [1, 64],
    activations), `num_stages` blocks in flight;
  * codes are read transposed out of shared memory (layout WGMMA_TRANSPOSED, then relaid out to
    WGMMA), each of the 8 nibbles of a word gives a [64, g/8] tile of Wᵀ: shifts and masks, then
    `codebook_lookup.lookup` (affine / odd polynomial / select tree: no gather);
  * 4-bit code j of word r is input r·8 + j of the block, so the activations are permuted once
    per call in XLA (xt[b·8 + j, r, m] = x[m, b·g + r·8 + j]) and nibble plane j multiplies the
    contiguous slice xt[b·8 + j] ([g/8, Mp] bf16 in shared memory): 8 wgmmas of K = g/8 per block;
  * the dequantized tiles are staged through shared memory (wgmma A from SMEM) rather than fed
    from registers: Mosaic GPU's interpret mode only takes shared-memory operands for wgmma, and
    this keeps the interpreted kernel and the compiled one the same program;
  * the per-(block, column) scale multiplies the block's f32 partial product (a [64] vector
    broadcast along the rows of the [64, Mp] accumulator), as the Triton kernel does;
  * split-K partials [split, N, Mp] are added (and transposed back) by one XLA reduction.

Hopper only: wgmma exists on sm_90a alone (Blackwell's tensor cores take tcgen05.mma), so the
registry picks this kernel for compute capability 9.x and keeps the Triton kernel elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.codebook_lookup import lookup
from pallas_kernels.codebook_matmul import _STATIC, _check

BN = 64  # output columns per CTA: the 64 rows of one warpgroup's wgmma tile (yᵀ)
MAX_M = 64  # rows of x the decode kernel takes (wgmma N = Mp); prefill stays on Triton
_LANE = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def _smem_transforms(cols: int, dtype) -> tuple:
  """Tiling + swizzle of the shared-memory wgmma operands (both must use the same swizzle): the
  largest that divides a row of `cols` elements."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(cols * bits)
  return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _padded_rows(m: int) -> int:
  """wgmma N for M rows: 16, 32 or 64 (a power of two keeps the swizzle at 32/64/128 bytes)."""
  mp = 16
  while mp < m:
    mp *= 2
  return mp


def plan(m: int, k: int, n: int, block: int, block_n=None, split_k=None) -> tuple[int, int]:
  """(bn, split_k) for a 4-bit call; NotImplementedError for shapes this kernel does not take.

  split_k divides the K/g blocks evenly (the pipeline's trip count is static); by default the
  smallest divisor that gives >= 2 CTAs per H100 SM (264), else one block per CTA.
  """
  if m > MAX_M:
    raise NotImplementedError(f"M={m} > {MAX_M}: the Mosaic kernel is the decode tiling")
  if block % 128:
    raise NotImplementedError(f"block={block}: needs g/8 a multiple of 16 (wgmma K)")
  bn = block_n or BN
  if bn != BN or n % bn:
    raise NotImplementedError(f"N={n} (block_n={bn}): needs {BN}-column tiles")
  n_blocks = k // block
  if split_k is None:
    divisors = [d for d in range(1, n_blocks + 1) if n_blocks % d == 0]
    split_k = next((d for d in divisors if (n // bn) * d >= 264), n_blocks)
  if n_blocks % split_k:
    raise NotImplementedError(f"split_k={split_k} does not divide the {n_blocks} K blocks")
  return bn, split_k


def _kernel(x_gmem, c_gmem, s_gmem, o_gmem, w_smem, *, table, rows, mp, per_split, stages,
            dtype):
  s, j = jax.lax.axis_index("s"), jax.lax.axis_index("j")

  def step(_, x_smem, c_smem, s_smem, total):
    # codes [rows, BN] uint32 read as Wᵀ words [BN, rows]
    words = plgpu.load(c_smem.T, layout=plgpu.Layout.WGMMA_TRANSPOSED, optimized=False)

    def block_product(acc):
      for p in range(8):  # nibble p of every word: inputs r·8 + p, r < rows
        code = ((words >> (4 * p)) & 15).astype(jnp.int32)
        w_smem[p] = plgpu.layout_cast(lookup(code, table, 4).astype(dtype), plgpu.Layout.WGMMA)
      plgpu.commit_smem()
      for p in range(8):
        plgpu.wgmma(acc, w_smem.at[p], x_smem.at[p])  # [BN, rows] @ [rows, Mp]
      return acc[...]  # waits for the wgmmas: w_smem may be overwritten by the next block

    part = pl.run_scoped(block_product, plgpu.ACC((BN, mp), jnp.float32))
    scale = plgpu.load(s_smem.at[0], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
    return total + part * jax.lax.broadcast_in_dim(scale.astype(jnp.float32), (BN, mp), (0,))

  first = s * per_split
  total = plgpu.layout_cast(jnp.zeros((BN, mp), jnp.float32), plgpu.Layout.WGMMA)
  total = plgpu.emit_pipeline(
      step, grid=(per_split,), in_specs=[
          plgpu.BlockSpec((8, rows, mp), lambda b: (first + b, 0, 0),
                          transforms=_smem_transforms(min(rows, mp), dtype)),
          plgpu.BlockSpec((rows, BN), lambda b: (first + b, j)),
          plgpu.BlockSpec((1, BN), lambda b: (first + b, j)),
      ], init_carry=total, max_concurrent_steps=stages)(x_gmem, c_gmem, s_gmem)
  o_gmem[s, pl.ds(j * BN, BN), :] = total


@functools.partial(jax.jit, static_argnames=_STATIC)
def codebook_matmul(x, codes, scales, table, rotation=None, *, bits: int, block: int,
                    transposed: bool = False, block_m=None, block_n=None, split_k=None,
                    interpret: bool = False, out_dtype=None, num_warps: int = 4,
                    num_stages: int = 2, poison: bool = False):
  """y = x @ W for 4-bit packed codebook weights on Hopper. Signature of the Triton wrapper.

  Args: as `codebook_matmul.codebook_matmul`. interpret: run under Mosaic GPU's interpret mode
    (CPU; shared memory, TMA and wgmma simulated; unwritten memory reads as NaN). num_stages:
    K blocks in flight in the pipeline. block_m, num_warps: unused (one warpgroup per CTA).
    poison: unused; every CTA writes its whole output tile (interpret mode fills NaN anyway).
  Raises:
    NotImplementedError for anything but bits=4, transposed=False, no rotation, bf16/f16 x,
    M <= 64, N a multiple of 64 and g a multiple of 128 (dispatch then falls through).
  """
  del block_m, num_warps, poison
  table = tuple(float(t) for t in table)
  m, k, n = _check(x, codes, scales, table, bits, block, transposed, rotation)
  if bits != 4 or transposed or rotation is not None:
    raise NotImplementedError(
        f"Mosaic kernel: 4-bit, column-major words, no rotation only (bits={bits}, "
        f"transposed={transposed}, rotation={rotation is not None})")
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"Mosaic kernel: x must be bf16/f16 for wgmma, got {x.dtype}")
  bn, split = plan(m, k, n, block, block_n, split_k)
  rows, n_blocks, mp = block // 8, k // block, _padded_rows(m)
  # xt[b·8 + j, r, m] = x[m, b·g + r·8 + j]: nibble plane j of block b is a contiguous
  # [rows, Mp] slice (3-D so that the tiled TMA copy stays within 5 strided dimensions)
  xt = jnp.pad(x, ((0, mp - m), (0, 0))).reshape(mp, n_blocks, rows, 8).transpose(1, 3, 2, 0)
  xt = xt.reshape(n_blocks * 8, rows, mp)
  per_split = n_blocks // split
  kernel = functools.partial(
      _kernel, table=table, rows=rows, mp=mp, per_split=per_split,
      stages=max(1, min(num_stages, per_split)), dtype=x.dtype)
  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((split, n, mp), jnp.float32),
      grid=(split, n // bn), grid_names=("s", "j"), compiler_params=_LANE,
      scratch_types=[plgpu.SMEM((8, BN, rows), x.dtype,
                                transforms=_smem_transforms(min(rows, mp), x.dtype))],
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name=f"codebook_matmul_mosaic_{bits}b")
  parts = call(xt, codes, scales)  # [split, N, Mp]: yᵀ per split
  y = parts[0] if split == 1 else jnp.sum(parts, axis=0)
  return y.T[:m].astype(out_dtype or x.dtype)

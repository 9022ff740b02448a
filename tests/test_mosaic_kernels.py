"""The Pallas Mosaic GPU port of the 4-bit decode codebook matmul (`codebook_matmul_mosaic`).

What runs without a GPU, with the pinned jax 0.11.2:
  * CUDA lowering under an abstract H100 (`export_cuda`): Mosaic GPU lowers a kernel in Python
    (Pallas -> Mosaic GPU dialect, register layouts, TMA and shared-memory transfer plans, wgmma
    operand checks; the arch is taken as sm_90 when no device is attached) and emits it as the
    `mosaic_gpu_v2` custom call. Only the custom call's own compile (MLIR -> LLVM -> PTX ->
    ptxas, done by the CUDA plugin on a GPU) and the run itself need a GPU.
  * numerics in Mosaic GPU's interpret mode (`plgpu.InterpretGPUParams`; the wrapper's
    interpret=True): shared memory, TMA copies, pipeline barriers and wgmma are simulated on the
    CPU, against `codebook_matmul_reference` at 4 bits (bf16 and f16 activations; f32 activations
    are not taken by the wgmma kernel and fall through to Triton, tested below). Interpret mode
    does not check register layouts or bank conflicts: that is what the lowering test is for.

GEMMA_KERNEL_TEST_IMPL=pallas (scripts/gpu_check.sh) runs the numerics compiled on a Hopper GPU
and skips them on other cards.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.quant import packing
from pallas_kernels import codebook_lookup as cl
from pallas_kernels import codebook_matmul as cm
from pallas_kernels import codebook_matmul_mosaic as cmm
from pallas_kernels import registry
from pallas_kernels.export_check import MOSAIC_CALL, TRITON_CALL, export_cuda

INTERPRET = os.environ.get("GEMMA_KERNEL_TEST_IMPL", "interpret") != "pallas"
RNG = np.random.default_rng()  # fresh inputs every run; failures print the case
TOL = {jnp.bfloat16: 1.5e-2, jnp.float16: 4e-3}  # table values rounded to x's dtype per weight
needs_hopper = pytest.mark.skipif(
    not INTERPRET and not registry.mosaic_device(), reason="compiled Mosaic kernel: Hopper only")


def _case(m, k, n, block, dtype, table=None):
  """Random 4-bit weight and activations: (x, codes, scales, table, exact f64 product)."""
  codes = RNG.integers(0, 16, (k, n))
  if table is None:
    table = tuple(np.sort(RNG.standard_normal(16)).tolist())
  scales = jnp.asarray(RNG.uniform(0.5, 1.5, (k // block, n)), jnp.float16)
  x = jnp.asarray(RNG.standard_normal((m, k)), dtype)
  w = np.asarray(table)[codes] * np.repeat(np.asarray(scales, np.float64), block, axis=0)
  return x, packing.pack(jnp.asarray(codes), 4, axis=0), scales, table, np.asarray(
      x, np.float64) @ w


def _rel_err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# --------------------------------------------------------------------------- numerics
@needs_hopper
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("m,k,n,block", [(1, 384, 64, 128), (5, 512, 128, 128),
                                         (16, 512, 64, 256), (40, 256, 64, 128)])
def test_mosaic_matches_reference(m, k, n, block, dtype):
  x, codes, scales, table, exact = _case(m, k, n, block, dtype)
  got = cmm.codebook_matmul(x, codes, scales, table, bits=4, block=block, interpret=INTERPRET)
  ref = cm.codebook_matmul_reference(x, codes, scales, table, bits=4, block=block)
  assert got.shape == (m, n) and got.dtype == dtype
  assert np.all(np.isfinite(np.asarray(got, np.float32))), "unwritten outputs (NaN)"
  assert _rel_err(ref, exact) < TOL[dtype]
  assert _rel_err(got, exact) < TOL[dtype], (m, k, n, block)
  assert _rel_err(got, np.asarray(ref, np.float64)) < TOL[dtype]


@needs_hopper
def test_mosaic_split_k_and_tables():
  """Split-K choices give the same sums; int (affine) and 'poly' tables take their FMA paths."""
  k, n, block = 768, 64, 128  # 6 K blocks: splits 1, 2, 3, 6
  int_table = tuple(float(v) for v in np.arange(16) - 7)
  u = np.arange(16) - 7.5
  poly_table = tuple(float(v) for v in 0.1 * u + 0.001 * u ** 3)
  assert cl._affine(int_table) is not None and cl._odd_poly(poly_table) is not None
  for table in (None, int_table, poly_table):
    x, codes, scales, table, exact = _case(3, k, n, block, jnp.bfloat16, table)
    for split in (1, 3, 6):
      got = cmm.codebook_matmul(x, codes, scales, table, bits=4, block=block, split_k=split,
                                interpret=INTERPRET, num_stages=3, out_dtype=jnp.float32)
      assert got.dtype == jnp.float32
      assert _rel_err(got, exact) < TOL[jnp.bfloat16], (table, split)


def test_unsupported_calls_raise_not_implemented():
  x, codes, scales, table, _ = _case(1, 256, 64, 128, jnp.bfloat16)
  kw = dict(bits=4, block=128, interpret=True)
  with pytest.raises(NotImplementedError, match="bf16/f16"):
    cmm.codebook_matmul(x.astype(jnp.float32), codes, scales, table, **kw)
  with pytest.raises(NotImplementedError, match="4-bit"):
    cmm.codebook_matmul(x, codes.T, scales.T, table, transposed=True, **kw)
  with pytest.raises(NotImplementedError, match="4-bit"):
    cmm.codebook_matmul(x, codes, scales, table, rotation=jnp.eye(128), **kw)
  x2, codes2, scales2, table2, _ = _case(1, 256, 64, 128, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="4-bit"):  # 2-bit codes of the same K
    cmm.codebook_matmul(x2, codes2[:16], scales2, table2[:4], bits=2, block=128,
                        interpret=True)
  with pytest.raises(NotImplementedError, match="M=65"):
    cmm.codebook_matmul(jnp.zeros((65, 256), jnp.bfloat16), codes, scales, table, **kw)
  with pytest.raises(NotImplementedError, match="N=32"):
    cmm.codebook_matmul(x, codes[:, :32], scales[:, :32], table, **kw)
  with pytest.raises(NotImplementedError, match="block=64"):
    cmm.codebook_matmul(x, codes, jnp.ones((4, 64), jnp.float16), table, bits=4, block=64,
                        interpret=True)
  with pytest.raises(NotImplementedError, match="split_k=3"):
    cmm.codebook_matmul(x, codes, scales, table, split_k=3, **kw)
  with pytest.raises(ValueError, match="words do not hold"):  # the shared input checks
    cmm.codebook_matmul(x, codes[:-1], scales, table, **kw)
  assert cmm.plan(1, 5376, 512, 128) == (64, 42)  # 8 column tiles x 42 splits = 336 CTAs
  assert cmm.plan(16, 1536, 2048, 128) == (64, 12)
  assert cmm.plan(1, 4096, 32768, 128) == (64, 1)


def test_registry_tries_mosaic_first_on_hopper(monkeypatch):
  """On a 9.x GPU the registry runs the Mosaic kernel, falling through to Triton, then XLA."""
  assert jax.default_backend() == "gpu" or not registry.mosaic_device()
  monkeypatch.setattr(registry, "mosaic_device", lambda: True)
  x, codes, scales, table, exact = _case(2, 256, 64, 128, jnp.bfloat16)
  y = registry.call("codebook_matmul", x, codes, scales, table, bits=4, block=128,
                    impl="interpret")
  assert _rel_err(y, exact) < TOL[jnp.bfloat16]
  assert ("codebook_matmul", "mosaic-interpret") in registry.choices()
  y = registry.call("codebook_matmul", x.astype(jnp.float32), codes, scales, table, bits=4,
                    block=128, impl="interpret")  # f32: Triton kernel (interpret)
  assert _rel_err(y, exact) < TOL[jnp.bfloat16]
  assert ("codebook_matmul", "interpret") in registry.choices()
  x, codes, scales, table, exact = _case(1, 256, 40, 128, jnp.bfloat16)  # N=40: XLA
  y = registry.call("codebook_matmul", x, codes, scales, table, bits=4, block=128,
                    impl="interpret")
  assert _rel_err(y, exact) < TOL[jnp.bfloat16]
  assert ("codebook_matmul", "xla") in registry.choices()
  monkeypatch.undo()
  monkeypatch.delenv("GEMMA_KERNEL_MOSAIC", raising=False)
  assert not registry.mosaic_device()  # opt-in, and only on a GPU
  monkeypatch.setenv("GEMMA_KERNEL_MOSAIC", "0")
  assert not registry.mosaic_device()


# --------------------------------------------------------------------------- CUDA lowering
@pytest.mark.parametrize("m,k,n,block,table", [
    (1, 5376, 512, 128, "tree"),  # Gemma 4 31B width: 42 K blocks, 336 CTAs
    (16, 1536, 2048, 128, "int"),  # E2B q projection, 16 rows
    (64, 2048, 256, 256, "poly"),  # widest M (wgmma N = 64, 128-byte swizzle), g = 256
])
def test_mosaic_kernel_lowers_for_cuda(m, k, n, block, table):
  """The Mosaic kernel lowers for CUDA (abstract H100) into Mosaic GPU's custom call, not
  Triton's; the Triton kernel of the same call still lowers beside it."""
  u = np.arange(16) - 7.5
  tables = {"tree": tuple(np.linspace(-1, 1, 16) ** 3), "int": tuple(np.arange(16.0) - 8),
            "poly": tuple(0.1 * u + 0.001 * u ** 3)}
  args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
          jax.ShapeDtypeStruct((k // 8, n), jnp.uint32),
          jax.ShapeDtypeStruct((k // block, n), jnp.float16))
  kw = dict(table=tables[table], bits=4, block=block)
  text = export_cuda(functools.partial(cmm.codebook_matmul, **kw), *args).mlir_module()
  assert MOSAIC_CALL in text and TRITON_CALL not in text
  assert text.count(MOSAIC_CALL) == 1 and "codebook_matmul_mosaic_4b" in text
  text = export_cuda(functools.partial(cm.codebook_matmul, **kw), *args).mlir_module()
  assert TRITON_CALL in text and MOSAIC_CALL not in text

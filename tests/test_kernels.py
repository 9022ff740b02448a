"""Pallas kernels against their plain-jnp references (interpret mode on CPU), CUDA lowering
under an abstract H100, the registry's dispatch, and the model through the kernel.

GEMMA_KERNEL_TEST_IMPL=pallas runs the same comparisons compiled for a GPU (scripts/gpu_check.sh).
"""

import functools
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.quant import packing
from pallas_kernels import codebook_matmul as cm
from pallas_kernels import registry
from pallas_kernels.export_check import export_cuda

INTERPRET = os.environ.get("GEMMA_KERNEL_TEST_IMPL", "interpret") != "pallas"
RNG = np.random.default_rng()  # fresh inputs every run; failures print the case


def _case(m, k, n, bits, block, dtype, transposed=False, table=None, seed=None):
  """Random packed weight and activations: (x, codes, scales, table, exact f64 product)."""
  rng = np.random.default_rng(seed) if seed is not None else RNG
  codes = rng.integers(0, 2 ** bits, (k, n))
  if table is None:
    table = tuple(np.sort(rng.standard_normal(2 ** bits)).tolist())
  scales = jnp.asarray(rng.uniform(0.5, 1.5, (k // block, n)), jnp.float16)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  words = packing.pack(jnp.asarray(codes), bits, axis=0)
  w = np.asarray(table)[codes] * np.repeat(np.asarray(scales, np.float64), block, axis=0)
  exact = np.asarray(x, np.float64) @ w
  if transposed:
    words, scales = words.T, scales.T
  return x, words, scales, table, exact


def _rel_err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# f32: accumulation-order differences only. bf16: the kernel rounds table values to bf16 and
# scales in f32, the reference rounds table·scale: each is within ~2^-8 per weight.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}
SHAPES = {"e2b_reduced": (384, 256, 128), "ragged": (448, 48, 64)}  # (K, N, block)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_codebook_matmul_matches_reference(shape, m, bits, dtype):
  k, n, block = SHAPES[shape]
  x, codes, scales, table, exact = _case(m, k, n, bits, block, dtype)
  f = functools.partial(cm.codebook_matmul, table=table, bits=bits, block=block)
  got = f(x, codes, scales, interpret=INTERPRET, poison=True)
  ref = cm.codebook_matmul_reference(x, codes, scales, table, bits=bits, block=block)
  assert got.shape == (m, n) and got.dtype == dtype
  assert np.all(np.isfinite(np.asarray(got, np.float32))), "unwritten (poisoned) outputs"
  assert _rel_err(ref, exact) < TOL[dtype]
  assert _rel_err(got, exact) < TOL[dtype], (shape, m, bits)


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_transposed_rotated_and_affine_tables(m, bits):
  """Row-major tables (the tied LM head), a fused block rotation and an int (affine) table."""
  k, n, block = 256, 64, 128
  x, codes, scales, table, exact = _case(m, k, n, bits, block, jnp.float32, transposed=True)
  got = cm.codebook_matmul(x, codes, scales, table, bits=bits, block=block, transposed=True,
                           interpret=INTERPRET, poison=True)
  assert _rel_err(got, exact) < 2e-5
  int_table = tuple(float(v) for v in np.arange(2 ** bits) - (2 ** (bits - 1) - 1))
  assert cm._affine(int_table) is not None and cm._affine(table) is None
  x, codes, scales, _, exact = _case(m, k, n, bits, block, jnp.float32, table=int_table)
  got = cm.codebook_matmul(x, codes, scales, int_table, bits=bits, block=block,
                           interpret=INTERPRET, poison=True)
  assert _rel_err(got, exact) < 2e-5
  rot = jnp.asarray(np.linalg.qr(RNG.standard_normal((block, block)))[0], jnp.float32)
  xr = jnp.einsum("mbj,ij->mbi", x.reshape(m, -1, block), rot,
                  precision=jax.lax.Precision.HIGHEST).reshape(m, k)
  want = cm.codebook_matmul_reference(xr, codes, scales, int_table, bits=bits, block=block)
  for fn in (functools.partial(cm.codebook_matmul, interpret=INTERPRET),
             cm.codebook_matmul_reference):
    got = fn(x, codes, scales, int_table, rotation=rot, bits=bits, block=block)
    assert _rel_err(got, np.asarray(want, np.float64)) < 2e-5


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_unpack_reference_reads_gemma_packing(bits):
  codes = RNG.integers(0, 2 ** bits, (256, 8))
  words = packing.pack(jnp.asarray(codes), bits, axis=0)
  assert np.array_equal(cm.unpack_reference(words, bits, 256), codes)
  assert np.array_equal(cm.unpack_reference(words.T, bits, 256, transposed=True), codes.T)


def test_split_k_and_tiles_are_free_choices():
  x, codes, scales, table, exact = _case(2, 1024, 128, 4, 64, jnp.float32)
  for split, bn in ((1, 128), (3, 32), (16, 16)):
    got = cm.codebook_matmul(x, codes, scales, table, bits=4, block=64, split_k=split,
                             block_n=bn, interpret=INTERPRET, poison=True)
    assert _rel_err(got, exact) < 2e-5, (split, bn)
  assert cm.plan(1, 5376, 8192, 128) == (16, 64, 2)  # 128 column tiles x 2 = 256 programs
  assert cm.plan(256, 5376, 8192, 128) == (64, 128, 1)


def test_bad_input_errors():
  x, codes, scales, table, _ = _case(1, 256, 64, 4, 128, jnp.float32)
  kw = dict(bits=4, block=128, interpret=True)
  with pytest.raises(ValueError, match="words do not hold"):
    cm.codebook_matmul(x, codes[:-1], scales, table, **kw)
  with pytest.raises(ValueError, match="scales shape"):
    cm.codebook_matmul(x, codes, scales[:1], table, **kw)
  with pytest.raises(ValueError, match="entries"):
    cm.codebook_matmul(x, codes, scales, table[:8], **kw)
  with pytest.raises(ValueError, match="uint32"):
    cm.codebook_matmul(x, codes.astype(jnp.int32), scales, table, **kw)
  with pytest.raises(ValueError, match="block"):
    cm.codebook_matmul(x, codes, scales, table, bits=4, block=96, interpret=True)


def test_registry_dispatch_falls_through_and_logs_once(caplog):
  x, codes, scales, table, exact = _case(1, 256, 40, 4, 128, jnp.float32)  # N=40: no tile
  with pytest.raises(NotImplementedError, match="N=40"):
    cm.codebook_matmul(x, codes, scales, table, bits=4, block=128, interpret=True)
  with caplog.at_level(logging.INFO, logger="pallas_kernels"):
    for _ in range(2):
      y = registry.call("codebook_matmul", x, codes, scales, table, bits=4, block=128,
                        impl="interpret")
  assert _rel_err(y, exact) < 2e-5
  assert ("codebook_matmul", "xla") in registry.choices()
  assert sum("fell through" in r.message for r in caplog.records) <= 1
  with pytest.raises(ValueError, match="unknown kernel impl"):
    registry.call("codebook_matmul", x, codes, scales, table, bits=4, block=128, impl="cuda")
  with pytest.raises(ValueError, match="unknown kernel op"):
    registry.call("fp8_matmul", x)
  assert jax.default_backend() != "gpu" or registry.default_impl() is None


@pytest.mark.slow
def test_model_logits_through_the_kernel():
  """A quantized model gives the same logits with the kernel (interpret) and with XLA."""
  from gemma.model import params
  from gemma.model import transformer as model
  from gemma.quant.recipes import quantize_params
  from tests.conftest import tiny

  cfg = tiny("gemma4-e2b")
  p = quantize_params(params.init(jax.random.PRNGKey(0), cfg, jnp.float32, std=0.5), "tq3")
  tokens = jnp.array([[2, 17, 5, 9, 33, 101, 7]])
  logits = {}
  for impl in ("xla", "interpret"):
    registry.set_default_impl(impl)
    try:
      fwd = jax.jit(functools.partial(model.forward, cfg=cfg))
      logits[impl] = np.asarray(fwd(p, tokens, jnp.arange(tokens.shape[1])[None])[0])
    finally:
      registry.set_default_impl(None)
  assert ("codebook_matmul", "interpret") in registry.choices()
  scale = np.max(np.abs(logits["xla"]))
  assert np.max(np.abs(logits["interpret"] - logits["xla"])) < 1e-4 * scale


# --------------------------------------------------------------------------- CUDA lowering
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("variant", ["decode", "prefill", "lm_head", "rotated"])
def test_kernels_lower_for_cuda(bits, variant):
  """Every kernel configuration the registry can pick lowers through Pallas Triton for CUDA."""
  k, n, block = 5376, 512, 128  # Gemma 4 31B model width; K/g = 42 blocks (not a power of 2)
  m = 256 if variant == "prefill" else 1
  transposed = variant == "lm_head"
  words = (n, k * bits // 32) if transposed else (k * bits // 32, n)
  sc = (n, k // block) if transposed else (k // block, n)
  args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct(words, jnp.uint32),
          jax.ShapeDtypeStruct(sc, jnp.float16)]
  table = tuple(np.linspace(-1, 1, 2 ** bits) ** 3)
  kw = dict(table=table, bits=bits, block=block, transposed=transposed)
  if variant == "rotated":
    args.append(jax.ShapeDtypeStruct((block, block), jnp.float32))
    fn = lambda x, c, s, r: cm.codebook_matmul(x, c, s, rotation=r, **kw)  # noqa: E731
  else:
    fn = functools.partial(cm.codebook_matmul, **kw)
  exported = export_cuda(fn, *args)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()


# --------------------------------------------------------------------------- scripts
def _run_script(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()


@pytest.mark.slow
def test_bench_kernels_check_json():
  line = json.loads(_run_script(["scripts/bench_kernels.py", "--check"])[-1])
  assert line["cases"] == 36
  assert line["max_rel_err_f32"] < 2e-5 and line["max_rel_err_bf16"] < 1.5e-2


@pytest.mark.slow
def test_bench_decode_json_and_bytes():
  r = json.loads(_run_script([
      "scripts/bench_decode.py", "--preset", "gemma4-e2b", "--quant", "tq4", "--layers", "6",
      "--embed-dim", "128", "--context", "8", "--new-tokens", "3", "--json"])[-1])
  for key in ("decode_ms_per_token", "tokens_per_s", "bytes_per_token", "bound_tokens_per_s",
              "read_bandwidth_gb_s", "pct_of_bound"):
    assert r[key] > 0, key
  assert r["quant"] == "tq4" and r["context"] == 8 and r["batch"] == 1


@pytest.mark.parametrize("m,bits", [(1, 4), (16, 2)])
def test_full_width_gemma4_e2b_attention_shape(m, bits):
  """Gemma 4 E2B's q projection at full size: K = 1536 (12 blocks), N = 8 heads x 256."""
  x, codes, scales, table, exact = _case(m, 1536, 2048, bits, 128, jnp.bfloat16)
  got = cm.codebook_matmul(x, codes, scales, table, bits=bits, block=128, interpret=INTERPRET,
                           poison=True)
  assert _rel_err(got, exact) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_polynomial_codebooks_take_the_fma_path(bits):
  """'poly' TurboQuant codebooks are evaluated as polynomials (no select tree) and still match."""
  from gemma.quant import codebook
  table = tuple(float(v) for v in codebook.sphere_codebook(bits, 128, "poly")[0])
  assert cm._odd_poly(table) is not None and cm._affine(table) is None
  if bits >= 3:  # exact Lloyd-Max tables are not low-degree odd polynomials
    assert cm._odd_poly(tuple(codebook.sphere_codebook(bits, 128, "beta")[0])) is None
  lloyd, poly = codebook.lloyd_max(bits, 128).mse, codebook.poly_codebook(bits, 128).mse
  assert lloyd * (1 - 1e-12) <= poly < 1.003 * lloyd  # +0.2% MSE at 3 and 4 bits, exact at 2
  x, codes, scales, _, exact = _case(4, 256, 64, bits, 128, jnp.float32, table=table)
  got = cm.codebook_matmul(x, codes, scales, table, bits=bits, block=128, interpret=INTERPRET,
                           poison=True)
  assert _rel_err(got, exact) < 2e-5
  fn = functools.partial(cm.codebook_matmul, table=table, bits=bits, block=128)
  export_cuda(fn, jax.ShapeDtypeStruct((1, 256), jnp.bfloat16),
              jax.ShapeDtypeStruct((256 * bits // 32, 64), jnp.uint32),
              jax.ShapeDtypeStruct((2, 64), jnp.float16))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lookup_field_reads_codes_in_place_bit_identically(bits):
  """The decode path's in-place field lookup equals `lookup` of the unpacked code, bit for bit, for
  every table kind (affine, poly, antisymmetric and general select trees)."""
  from gemma.quant import codebook
  from pallas_kernels import codebook_lookup as cl
  words = jnp.asarray(RNG.integers(0, 2 ** 32, (64,), dtype=np.uint64), jnp.uint32)
  tables = [tuple(float(v) for v in np.arange(2 ** bits) - 3.0),
            tuple(np.sort(RNG.standard_normal(2 ** bits)).tolist())]
  if bits <= 4:
    tables += [tuple(float(v) for v in codebook.sphere_codebook(bits, 128, law)[0])
               for law in ("beta", "poly")]
  for table in tables:
    for offset in range(0, 32, bits):
      code = ((words >> offset) & (2 ** bits - 1)).astype(jnp.int32)
      want = np.asarray(cl.lookup(code, table, bits))
      got = np.asarray(cl.lookup_field(words, offset, table, bits))
      assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (table[:2], offset)


@pytest.mark.parametrize("bits,block", [(4, 128), (2, 256), (8, 64)])
@pytest.mark.parametrize("transposed", [False, True])
def test_field_slab_path_with_lloyd_max_tables(bits, block, transposed):
  """Configurations on the field-slab decode path (R = block·bits/32 >= 16 words per block), with
  antisymmetric (Lloyd-Max) tables on the halved select tree, in bf16 and f32."""
  from gemma.quant import codebook
  assert cm._use_slabs(bits, block, False)
  law = "beta" if bits <= 4 else None
  table = (tuple(float(v) for v in codebook.sphere_codebook(bits, 128, law)[0]) if law else
           tuple(float(v) for v in np.linspace(-1, 1, 2 ** bits) ** 3))
  for dtype in (jnp.float32, jnp.bfloat16):
    x, codes, scales, _, exact = _case(3, 2 * block, 64, bits, block, dtype, transposed, table)
    got = cm.codebook_matmul(x, codes, scales, table, bits=bits, block=block,
                             transposed=transposed, interpret=INTERPRET, poison=True)
    assert _rel_err(got, exact) < TOL[dtype], dtype


def test_prmt_lut_model_decodes_every_4bit_turboquant_codebook():
  """The byte-permute decode's jnp model (the interpret-mode path; same operations as its PTX)
  gives bf16(table[field]) for every field, for the Lloyd-Max, Gauss and poly 4-bit codebooks."""
  from gemma.quant import codebook
  from pallas_kernels import prmt_lut
  v = jnp.asarray(RNG.integers(0, 2 ** 32, (16, 8), dtype=np.uint64), jnp.uint32)
  assert not prmt_lut.antisymmetric4(tuple(np.sort(RNG.standard_normal(16))))
  for law in ("beta", "gauss", "poly"):
    table = tuple(float(t) for t in codebook.sphere_codebook(4, 128, law)[0])
    assert prmt_lut.antisymmetric4(table)
    got = prmt_lut.decode_fields_reference(v, table)
    for s in range(8):
      want = jnp.asarray(np.asarray(table, np.float32)[np.asarray((v >> (4 * s)) & 15)],
                         jnp.bfloat16)
      assert np.array_equal(np.asarray(got[s]).view(np.uint16), np.asarray(want).view(np.uint16))
  # PTX ISA: nibbles 0-2 copy bytes 0, 4, 7; nibble 3 (bit 3 set) replicates byte 3's sign
  assert int(prmt_lut.prmt(0x83020100, 0x07060504, 0xB740)) == 0xFF070400

"""Decode-attention kernels over a TurboQuant KV cache: interpret mode against the plain-jnp
references and a dequantize-then-attend reference, lane-major packing, dispatch, CUDA lowering.

GEMMA_KERNEL_TEST_IMPL=pallas runs the same comparisons compiled for a GPU (scripts/gpu_check.sh).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import registry
from pallas_kernels import tq_attention as T
from pallas_kernels.export_check import export_cuda

INTERPRET = os.environ.get("GEMMA_KERNEL_TEST_IMPL", "interpret") != "pallas"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [32, 128, 512])
def test_lane_packing_round_trips(bits, n):
  codes = np.random.default_rng(bits * n).integers(0, 2 ** bits, (3, 2, n))
  words = T.pack_lanes(jnp.asarray(codes), bits)
  assert words.shape == (3, 2, n * bits // 32) and words.dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(T.unpack_lanes(words, bits, n)), codes)
  if n < 128:
    return
  # lane l of base word i holds channel l·m0 + i (the kernels read q.reshape(L, m0))
  one = np.zeros(n, int)
  one[T.lane_count(bits) // 2 * (n // T.lane_count(bits)) + 1] = 1
  w = np.asarray(T.pack_lanes(jnp.asarray(one), bits))
  assert w[1] == 1 << (T.lane_count(bits) // 2 * (bits if bits != 3 else 2))


def _case(seed, b, s, k, g, n, bits, qjl=True):
  rng = np.random.default_rng(seed)
  table = tuple(np.sort(rng.standard_normal(2 ** bits) * 0.1).tolist())
  codes = T.pack_lanes(jnp.asarray(rng.integers(0, 2 ** bits, (b, s, k, n))), bits)
  signs = T.pack_lanes(jnp.asarray(rng.integers(0, 2, (b, s, k, n))), 1) if qjl else None
  norm = jnp.asarray(rng.random((b, s, k)) * 30, jnp.float16)
  gamma = jnp.asarray(rng.random((b, s, k)) * 0.3, jnp.float16) if qjl else None
  q = jnp.asarray(rng.standard_normal((b, k, g, n)), jnp.float32)
  qp = jnp.asarray(rng.standard_normal((b, k, g, n)), jnp.float32) if qjl else None
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, k, g, s)) * 3, jnp.float32), -1)
  return table, codes, signs, norm, gamma, q, qp, probs


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n,g,s", [(128, 1, 64), (512, 8, 48)])
def test_scores_and_mix_match_reference(bits, n, g, s):
  table, codes, signs, norm, gamma, q, qp, probs = _case(bits + n, 2, s, 2, g, n, bits)
  kw = dict(bits=bits, table=table, interpret=INTERPRET)
  for with_qjl in (True, False):
    args = (q, qp if with_qjl else None, codes, signs if with_qjl else None, norm,
            gamma if with_qjl else None)
    got = T.tq_scores(*args, block_s=32, **kw)
    assert _rel(got, T.tq_scores_reference(*args, **kw)) < 1e-5
  mix = T.tq_mix(probs, codes, norm, block_s=16, splits=2, **kw)
  assert mix.shape == (2, 2, g, n)
  assert _rel(mix, T.tq_mix_reference(probs, codes, norm, **kw)) < 1e-5


def test_kernels_equal_dequantize_then_attend():
  """scores -> softmax -> mix on codes == plain attention over the rebuilt (rotated) vectors."""
  bits, n = 3, 256
  table, codes, signs, norm, gamma, q, qp, _ = _case(7, 1, 64, 2, 4, n, bits)
  s = T.tq_scores(q, qp, codes, signs, norm, gamma, bits=bits, table=table,
                  interpret=INTERPRET)
  out = T.tq_mix(jax.nn.softmax(s, -1), codes, norm, bits=bits, table=table,
                 interpret=INTERPRET)
  # dequantized keys in the rotated basis: ‖k‖ (c[code] + √(π/2)/n γ sign); q̃ = S q̂ is given,
  # so the sign term enters as its own dot product
  c = jnp.asarray(table, jnp.float32)[T.unpack_lanes(codes, bits, n)]
  sgn = T.unpack_lanes(signs, 1, n).astype(jnp.float32) * 2 - 1
  nf, gf = norm.astype(jnp.float32), gamma.astype(jnp.float32)
  ref_s = jnp.einsum("bkgc,bskc->bkgs", q, c * nf[..., None], precision="highest")
  ref_s += T.qjl_scale(n) * jnp.einsum("bkgc,bskc->bkgs", qp, sgn * (nf * gf)[..., None],
                                        precision="highest")
  p = jax.nn.softmax(ref_s, -1)
  ref = jnp.einsum("bkgs,bskc->bkgc", p, c * nf[..., None], precision="highest")
  assert _rel(s, ref_s) < 1e-5 and _rel(out, ref) < 1e-5


def test_shapes_the_kernels_do_not_take_fall_through():
  table, codes, signs, norm, gamma, q, qp, _ = _case(1, 1, 40, 1, 3, 128, 2)
  with pytest.raises(NotImplementedError, match="G=3"):
    T.tq_scores(q, qp, codes, signs, norm, gamma, bits=2, table=table, interpret=True)
  got = registry.call("tq_scores", q, qp, codes, signs, norm, gamma, bits=2, table=table,
                      impl="interpret")
  want = T.tq_scores_reference(q, qp, codes, signs, norm, gamma, bits=2, table=table)
  assert _rel(got, want) < 1e-6
  with pytest.raises(ValueError, match="table has 3 entries"):
    T.tq_mix(q[..., :40], codes, norm, bits=2, table=(0.0, 1.0, 2.0), interpret=True)
  with pytest.raises(ValueError, match="multiple of 32"):
    T.pack_lanes(jnp.zeros((48,), jnp.int32), 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n,g", [(256, 2), (512, 8)])
def test_kernels_lower_for_cuda(bits, n, g):
  """Gemma 4 head sizes (256 sliding, 512 global) and GQA groups lower through Pallas Triton."""
  sd = jax.ShapeDtypeStruct
  b, s, k = 1, 4096, 4
  table = tuple(np.linspace(-0.2, 0.2, 2 ** bits).tolist())
  scores = export_cuda(functools.partial(T.tq_scores, bits=bits, table=table),
                       sd((b, k, g, n), jnp.float32), sd((b, k, g, n), jnp.float32),
                       sd((b, s, k, n * bits // 32), jnp.uint32),
                       sd((b, s, k, n // 32), jnp.uint32), sd((b, s, k), jnp.float16),
                       sd((b, s, k), jnp.float16))
  mix = export_cuda(functools.partial(T.tq_mix, bits=bits, table=table),
                    sd((b, k, g, s), jnp.float32), sd((b, s, k, n * bits // 32), jnp.uint32),
                    sd((b, s, k), jnp.float16))
  for exported in (scores, mix):
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()

"""Memory-efficient attention: the Pallas kernel (interpret mode) and the jnp blockwise path equal
the dense attention (forward and gradients) with windows, soft-capping, GQA, padding and keys in
ring order; both lower for CUDA at the real head sizes; the model with blockwise attention equals
the dense model on every family (one-shot, chunked prefill over caches, TurboQuant caches, LoRA
training gradients)."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.inference.decode import generate, left_pad
from gemma.io.checkpoint import load
from gemma.kv.view import FloatView
from gemma.model.attention import attend
from gemma.model.params import init
from gemma.model.transformer import forward
from gemma.training import lora
from pallas_kernels import flash_attention as F
from pallas_kernels import registry
from pallas_kernels.export_check import export_cuda
from tests.conftest import FAMILIES, fixture_dir, tiny
from tests.test_chunked_prefill import PROMPT, _prefill_logits, _rel

CASES = [(None, None), (8, None), (None, 5.0), (8, 5.0)]  # (window, soft-cap)
# GEMMA_KERNEL_TEST_IMPL=pallas runs the kernel compiled for a GPU (scripts/gpu_check.sh)
INTERPRET = os.environ.get("GEMMA_KERNEL_TEST_IMPL", "interpret") != "pallas"


def _inputs(b=2, t=37, s=None, kh=2, g=2, h=16, dtype=jnp.float32, ring=False, seed=0):
  """Random q/k/v; row 1 left-padded by 5; with `ring`, the keys are a rotated copy (as in a
  ring buffer) with a few empty slots."""
  rng = np.random.default_rng(seed)
  s = s or t
  q = jnp.asarray(rng.normal(size=(b, t, kh, g, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  q_pos = np.tile(np.arange(s - t, s), (b, 1))
  q_pos[1, :5] = -1
  k_pos = np.tile(np.arange(s), (b, 1))
  k_pos[1, :5] = -1
  if ring:
    k_pos = np.roll(k_pos, 11, axis=1)
    k_pos[:, 3] = -1
    k, v = jnp.roll(k, 11, axis=1), jnp.roll(v, 11, axis=1)
  return q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32)


def _dense(q, k, v, q_pos, k_pos, window, cap, scale=0.3):
  b, t, kh, g, h = q.shape
  out = attend(q.reshape(b, t, kh * g, h), FloatView(k, v, k_pos), q_pos, window=window,
               scale=scale, cap=cap)
  return out.reshape(q.shape).astype(jnp.float32)


IMPLS = {
    "reference": functools.partial(F.flash_attention_reference, block_q=8, block_k=16),
    "kernel": functools.partial(F.flash_attention, block_rows=16, block_keys=16,
                                interpret=INTERPRET),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("window,cap", CASES)
@pytest.mark.parametrize("ring", [False, True])
def test_equals_dense_attention(impl, window, cap, ring):
  q, k, v, q_pos, k_pos = _inputs(s=45, ring=ring)
  got = IMPLS[impl](q, k, v, q_pos, k_pos, scale=0.3, window=window, cap=cap)
  want = _dense(q, k, v, q_pos, k_pos, window, cap)
  valid = np.asarray(q_pos >= 0)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)
  assert not np.asarray(got)[~valid].any()  # padding queries see nothing and get 0


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("window,cap", [(None, None), (8, 5.0)])
def test_gradients_equal_dense(impl, window, cap):
  q, k, v, q_pos, k_pos = _inputs(ring=True, seed=1)
  valid = (q_pos >= 0)[..., None, None, None]
  weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))

  def loss(fn, q, k, v):
    return jnp.sum(jnp.where(valid, fn(q, k, v), 0.0) * weights)

  fn = functools.partial(IMPLS[impl], q_pos=q_pos, k_pos=k_pos, scale=0.3, window=window,
                         cap=cap)
  dense = functools.partial(_dense, q_pos=q_pos, k_pos=k_pos, window=window, cap=cap)
  got = jax.grad(functools.partial(loss, fn), (0, 1, 2))(q, k, v)
  want = jax.grad(functools.partial(loss, dense), (0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", got, want, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=f"d{name}")


def test_bfloat16_inputs_within_rounding():
  q, k, v, q_pos, k_pos = _inputs(dtype=jnp.bfloat16)
  want = _dense(q, k, v, q_pos, k_pos, 8, None)
  valid = np.asarray(q_pos >= 0)
  for impl in IMPLS.values():
    got = impl(q, k, v, q_pos, k_pos, scale=0.3, window=8, cap=None)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-2)


def test_bad_shapes_and_tiles():
  q, k, v, q_pos, k_pos = _inputs()
  with pytest.raises(ValueError, match="positions"):
    F.flash_attention_reference(q, k, v, q_pos[:, 1:], k_pos, scale=1.0)
  with pytest.raises(ValueError, match="disagree"):
    F.flash_attention_reference(q, k[..., :8], v[..., :8], q_pos, k_pos, scale=1.0)
  with pytest.raises(NotImplementedError, match="head size"):
    F.flash_attention(q[..., :12], k[..., :12], v[..., :12], q_pos, k_pos, scale=1.0,
                      interpret=True)
  # dispatch falls through to XLA for what the kernel cannot take
  got = registry.call("flash_attention", q[..., :12], k[..., :12], v[..., :12], q_pos, k_pos,
                      scale=1.0, impl="interpret")
  want = F.flash_attention_reference(q[..., :12], k[..., :12], v[..., :12], q_pos, k_pos,
                                     scale=1.0)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("h,g,window,cap", [(256, 4, 512, None), (512, 8, None, None),
                                            (256, 2, 1024, 50.0)])
def test_kernel_lowers_for_cuda(h, g, window, cap):
  """The kernel (and its gradient's XLA backward) lowers to Triton for an H100 at Gemma 4's head
  sizes (256 local, 512 global)."""
  sd = jax.ShapeDtypeStruct
  b, t, kh, s = 1, 1024, 2, 2048
  args = (sd((b, t, kh, g, h), jnp.bfloat16), sd((b, s, kh, h), jnp.bfloat16),
          sd((b, s, kh, h), jnp.bfloat16), sd((b, t), jnp.int32), sd((b, s), jnp.int32))
  fn = functools.partial(F.flash_attention, scale=1.0, window=window, cap=cap)
  assert "__gpu$xla.gpu.triton" in export_cuda(fn, *args).mlir_module()
  grad = jax.grad(lambda q, k, v, qp, kp: jnp.sum(fn(q, k, v, qp, kp)), (0, 1, 2))
  assert "__gpu$xla.gpu.triton" in export_cuda(grad, *args).mlir_module()


# ----------------------------------------------------------------------------- in the model
def _blockwise(cfg, block=4):
  return dataclasses.replace(cfg, attention_impl="blockwise", attention_block=block)


def test_auto_picks_blockwise_for_large_calls_only():
  cfg = dataclasses.replace(tiny("gemma4-31b"), attention_block=512)
  assert not cfg.attends_blockwise(1, 1 << 20)  # decode
  assert not cfg.attends_blockwise(1024, 1024)
  assert cfg.attends_blockwise(2048, 2048) and cfg.attends_blockwise(512, 32768)
  assert dataclasses.replace(cfg, attention_impl="blockwise").attends_blockwise(2, 2)
  assert not dataclasses.replace(cfg, attention_impl="dense").attends_blockwise(4096, 4096)
  with pytest.raises(ValueError, match="attention_impl"):
    dataclasses.replace(cfg, attention_impl="flash")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_model_blockwise_equals_dense(family):
  """Bar: the parity bar (max|d logits| / max|logits| <= 1e-4 in float32; the dense path itself
  moves by ~2e-5 on these random-weight fixtures when the batch changes) and identical greedy
  tokens; one-shot (no cache) and chunked prefill over caches whose views mix ring slots and
  the call's own keys."""
  cfg, params = load(fixture_dir(family), jnp.float32)
  prompts = [PROMPT, PROMPT[:23]]
  tokens, positions = left_pad(prompts, cfg.pad_id)
  valid = np.asarray(positions >= 0)
  dense = np.asarray(forward(params, tokens, positions, cfg)[0])[valid]
  blocks = np.asarray(forward(params, tokens, positions, _blockwise(cfg))[0])[valid]
  assert _rel(blocks, dense) <= 1e-4
  assert _rel(_prefill_logits(params, _blockwise(cfg), prompts, 8),
              _prefill_logits(params, cfg, prompts, 8)) <= 1e-4
  assert (generate(params, _blockwise(cfg), prompts, 8, prefill_chunk=8).tokens
          == generate(params, cfg, prompts, 8).tokens)


@pytest.mark.parametrize("kv", ["tq4", "tq3.5"])
def test_quantized_cache_in_query_blocks(kv):
  cfg = tiny("gemma4-e2b", head_dim=64, global_head_dim=128)
  params = init(jax.random.PRNGKey(0), cfg, jnp.float32, std=0.3)
  got = _prefill_logits(params, _blockwise(cfg, 1), [PROMPT], 16, kv)
  assert _rel(got, _prefill_logits(params, cfg, [PROMPT], 16, kv)) <= 1e-5


def test_lora_gradients_blockwise_equal_dense():
  """Fine-tuning through blockwise attention (its custom backward) gives the dense gradients."""
  cfg = tiny("gemma4-31b")
  params = init(jax.random.PRNGKey(1), cfg, jnp.float32, std=0.3)
  adapters = lora.init_adapters(jax.random.PRNGKey(2), params, 2)
  # B != 0, so that A's gradients flow too
  adapters = {n: dataclasses.replace(p, b=jnp.full_like(p.b, 0.05)) for n, p in adapters.items()}
  tokens = jnp.asarray([PROMPT[:24], PROMPT[8:32]], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)

  def loss(adapters, cfg):
    logits, _ = forward(lora.with_adapters(params, adapters, 1.0), tokens, positions, cfg)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(tokens, -1, 1)[..., None], -1)[..., 0])

  want = jax.grad(loss)(adapters, cfg)
  got = jax.grad(loss)(adapters, _blockwise(cfg))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert _rel(np.asarray(a), np.asarray(b)) <= 1e-4

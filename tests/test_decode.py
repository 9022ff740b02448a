"""KV-cache consistency: prefill + decode steps == one forward pass over the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.inference.decode import bucket_length, decode_step, generate, left_pad, prefill
from gemma.inference.sampling import Sampler
from gemma.io.checkpoint import load_hf
from gemma.kv.cache import init_cache
from gemma.model import params as P
from gemma.model.transformer import forward
from tests.conftest import FAMILIES, TINY_PRESETS, fixture_dir, tiny

TOL = dict(rtol=2e-4, atol=2e-4)


def _model(preset, dtype=jnp.float32, seed=0, std=0.3):
  cfg = tiny(preset)
  return cfg, P.init(jax.random.key(seed), cfg, dtype, std=std)


_forward = jax.jit(forward, static_argnames="cfg")


def _full_logits(params, cfg, tokens):
  tokens = jnp.asarray(tokens, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(_forward(params, tokens, positions, cfg)[0])


def _cached_logits(params, cfg, tokens, chunks, max_length):
  """Logits of every position after the first chunk, via prefill chunks then decode steps."""
  tokens = np.asarray(tokens, np.int32)
  b, t = tokens.shape
  cache = init_cache(cfg, b, max_length, params.embed.dtype)
  out, start = [], 0
  for size in chunks:
    chunk = tokens[:, start:start + size]
    positions = np.broadcast_to(np.arange(start, start + size), chunk.shape).astype(np.int32)
    logits, cache = prefill(params, cfg, chunk, positions, cache)
    start += size
  out.append(np.asarray(logits))
  for i in range(start, t):
    _, logits, cache = decode_step(params, jnp.asarray(tokens[:, i]), cache, jax.random.key(0),
                                   cfg, Sampler())
    out.append(np.asarray(logits))
  return np.stack(out, axis=1), cache


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("chunks", [(5,), (3, 6)])
def test_prefill_then_decode_equals_full_forward(preset, chunks):
  cfg, params = _model(preset)
  tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 26))
  full = _full_logits(params, cfg, tokens)
  cached, cache = _cached_logits(params, cfg, tokens, chunks, max_length=32)
  # position sum(chunks)-1 onwards, every position; 26 tokens wrap the window-4 rings 5+ times
  np.testing.assert_allclose(cached, full[:, sum(chunks) - 1:], **TOL)
  assert int(cache.length) == 26 and list(np.asarray(cache.next_pos)) == [26, 26]
  ring = next(c for c, s in zip(cache.layers, cfg.layers, strict=True)
              if c is not None and s.window)
  assert ring.pos.shape[1] == cfg.sliding_window
  assert sorted(np.asarray(ring.pos[0])) == list(range(26 - cfg.sliding_window, 26))


@pytest.mark.slow
def test_long_prefill_wraps_ring_inside_one_chunk():
  cfg, params = _model("gemma4-e2b")
  tokens = np.random.default_rng(2).integers(3, cfg.vocab_size, (1, 21))
  full = _full_logits(params, cfg, tokens)
  cached, _ = _cached_logits(params, cfg, tokens, (19,), max_length=24)
  np.testing.assert_allclose(cached, full[:, 18:], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_left_padded_batch_equals_single_runs(preset):
  cfg, params = _model(preset)
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (3, 11, 7)]
  batch = generate(params, cfg, prompts, 12, eos_ids=())
  for prompt, got in zip(prompts, batch.tokens, strict=True):
    alone = generate(params, cfg, [prompt], 12, eos_ids=())
    assert got == alone.tokens[0]
  # and the padded prefill logits equal the unpadded ones
  tokens, positions = left_pad(prompts, cfg.pad_id)
  logits, _ = prefill(params, cfg, tokens, positions, init_cache(cfg, 3, 16))
  for row, prompt in enumerate(prompts):
    np.testing.assert_allclose(logits[row], _full_logits(params, cfg, [prompt])[0, -1], **TOL)


def test_bucket_lengths_bound_recompiles():
  assert [bucket_length(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]


@pytest.mark.slow
def test_bf16_cache_path_equals_bf16_forward():
  # closeness of bf16 to the reference is tested in test_parity.py
  cfg, params = _model("gemma4-e2b", std=0.02)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = np.random.default_rng(4).integers(3, cfg.vocab_size, (1, 12))
  full = _full_logits(params, cfg, tokens)
  cached, cache = _cached_logits(params, cfg, tokens, (6,), max_length=12)
  assert cache.layers[0].k.dtype == jnp.bfloat16 and np.isfinite(cached).all()
  np.testing.assert_allclose(cached, full[:, 5:], rtol=0.02, atol=0.02)


def test_too_long_is_an_error_before_compute():
  cfg, params = _model("gemma4-31b")
  with pytest.raises(ValueError, match="exceeds the cache length 12"):
    generate(params, cfg, [[2, 5, 6, 7]], 10, max_length=12)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    generate(params, cfg, [[2, 5]], 0)
  with pytest.raises(ValueError, match="at least one token"):
    generate(params, cfg, [[]], 3)


def test_generation_stops_at_eos():
  cfg, params = _model("gemma4-31b")
  free = generate(params, cfg, [[2, 9, 8, 7]], 6, eos_ids=())
  first = free.tokens[0][2]
  stopped = generate(params, cfg, [[2, 9, 8, 7]], 6, eos_ids=(first,))
  assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(first) + 1]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_cache_path_matches_reference_fixture(name):
  ref = np.load(f"{fixture_dir(name)}/reference.npz")
  cfg, params = load_hf(fixture_dir(name), jnp.float32)
  sequence = np.concatenate([ref["prompt_ids"], ref["greedy_ids"]])[None]
  t = len(ref["prompt_ids"])
  cached, _ = _cached_logits(params, cfg, sequence, (t,), max_length=sequence.shape[1])
  expected = ref["full_logits"][t - 1:]
  err = np.abs(cached[0] - expected).max() / np.abs(expected).max()
  assert err <= 1e-4, err

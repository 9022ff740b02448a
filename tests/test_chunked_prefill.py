"""Chunked prefill: a prompt prefilled in chunks against the cache equals one-shot prefill
(float caches: logits <= 1e-5 relative, identical greedy tokens) for every family, across
sliding windows, with left-padded batches; TurboQuant caches fix their statistics on the first
chunk and stay as close to the float cache as one-shot prefill does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma
from gemma.inference.decode import generate, left_pad, prefill
from gemma.io.checkpoint import load
from gemma.kv.cache import init_cache
from gemma.model.params import init
from tests.conftest import FAMILIES, fixture_dir, tiny

PROMPT = [2] + [(7 * i) % 500 + 3 for i in range(39)]  # 40 tokens; the fixtures' window is 8


def _prefill_logits(params, cfg, prompts, chunk, kv_quant=None):
  tokens, positions = left_pad(prompts, cfg.pad_id)
  cache = init_cache(cfg, len(prompts), tokens.shape[1] + 4, params.embed.dtype, kv_quant)
  for i in range(0, tokens.shape[1], chunk):
    logits, cache = prefill(params, cfg, tokens[:, i:i + chunk], positions[:, i:i + chunk],
                            cache)
  return np.asarray(logits)


def _rel(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_shot(family):
  cfg, params = load(fixture_dir(family), jnp.float32)
  prompts = [PROMPT, PROMPT[:23]]  # the second row left-padded: its first chunks are padding
  one = _prefill_logits(params, cfg, prompts, 64)
  for chunk in (8, 5, 13):
    assert _rel(_prefill_logits(params, cfg, prompts, chunk), one) <= 1e-5, chunk
  want = generate(params, cfg, prompts, 8).tokens
  for chunk in (8, 5):
    assert generate(params, cfg, prompts, 8, prefill_chunk=chunk).tokens == want


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["tq4", "tq3.5"])
def test_quantized_cache_statistics_from_the_first_chunk(kv):
  cfg = tiny("gemma4-e2b", head_dim=64, global_head_dim=128)  # TurboQuant needs H % 64 == 0
  params = init(jax.random.PRNGKey(0), cfg, jnp.float32, std=0.3)
  ref = _prefill_logits(params, cfg, [PROMPT], 64)
  one_shot = _rel(_prefill_logits(params, cfg, [PROMPT], 64, kv), ref)
  chunked = _rel(_prefill_logits(params, cfg, [PROMPT], 16, kv), ref)
  assert one_shot > 0 and chunked <= 2 * one_shot, (one_shot, chunked)


def test_model_and_cli_take_the_chunk_size(e_style_ckpt, capsys):
  m = gemma.load(e_style_ckpt, prefill_chunk=4)
  text = "a prompt of a good many tokens, several chunks of four " * 2
  assert m.generate(text, max_new_tokens=6).token_ids == gemma.load(e_style_ckpt).generate(
      text, max_new_tokens=6).token_ids
  chat = m.chat()
  assert chat.send("hello there", max_new_tokens=3).token_ids is not None
  with pytest.raises(ValueError, match="prefill_chunk"):
    gemma.load(e_style_ckpt, prefill_chunk=0)

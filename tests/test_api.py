"""The Python API: gemma.load, Model.generate (text, ids, batches, streaming), chat sessions that
keep their cache, logits / evaluate / quantize / save."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma
from gemma.inference import session as session_lib
from gemma.inference.decode import generate
from gemma.inference.text import Detokenizer
from gemma.io import checkpoint
from gemma.io.checkpoint import CheckpointError
from gemma.model.transformer import forward
from gemma.quant import QArray
from tests.conftest import FIXTURES, fixture_dir
from tests.test_chat import GEMMA3_SPECIALS, _sentencepiece


@pytest.fixture(scope="module")
def model(e_style_ckpt):
  return gemma.load(e_style_ckpt)


def test_load_resolves_everything_once(model):
  tok = model.tokenizer
  assert model.cfg.name and model.dtype == jnp.float32  # CPU default
  # config / generation_config EOS, the tokenizer's <eos>, and the chat end-of-turn marker
  assert set(model.stop_ids) == {1, tok.eos_id, tok.piece_to_id("<turn|>")}


def test_generation_config_eos_reaches_the_functional_path_too(tmp_path):
  for f in ("config.json", "model.safetensors"):
    shutil.copy(f"{FIXTURES}/e_style/{f}", tmp_path / f)
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 7]}')
  cfg, _ = checkpoint.load(tmp_path, jnp.float32)
  assert set(cfg.eos_ids) == {1, 7}  # load + decode.generate stop where gemma.load's model does
  assert set(gemma.load(tmp_path).stop_ids) == {1, 7}


def test_generate_text_matches_the_functional_loop(model):
  out = model.generate("hello world", max_new_tokens=6)
  ids = model.tokenizer.encode("hello world")
  ref = generate(model.params, model.cfg, [ids], 6, eos_ids=model.stop_ids).tokens[0]
  assert out.token_ids == ref and out.prompt_ids == ids
  assert isinstance(out.text, str) and out.text == model.tokenizer.decode(
      ref[:-1] if ref[-1] in model.stop_ids else ref)
  assert out.prefill_tokens_per_s > 0 and out.kv_cache_bytes > 0


@pytest.mark.slow
def test_generate_batches_of_text_and_ids(model):
  prompts = ["hello", "a longer prompt than the first one"]
  out = model.generate(prompts, max_new_tokens=4)
  assert isinstance(out.text, list) and len(out.token_ids) == 2
  for p, row in zip(prompts, out.token_ids, strict=True):
    assert model.generate(p, max_new_tokens=4).token_ids == row  # a padded row = alone
  ids = model.generate([[2, 17, 5], [2, 9]], max_new_tokens=3)
  assert len(ids.token_ids) == 2 and all(isinstance(i, int) for i in ids.token_ids[0])


def test_stream_arrives_in_pieces_that_join_to_the_text(model):
  s = model.generate("tell me a story", max_new_tokens=12, stream=True)
  pieces = list(s)
  assert s.completion is not None and "".join(pieces) == s.completion.text
  assert len(pieces) >= 2 and all(pieces)
  assert s.completion.token_ids == model.generate("tell me a story",
                                                  max_new_tokens=12).token_ids


class _Bytes:
  """A tokenizer whose ids are UTF-8 bytes (characters split across ids)."""

  def decode(self, ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_splits_a_character():
  text = "héllo wörld 😀!"
  d = Detokenizer(_Bytes())
  pieces = [d.push(b) for b in text.encode()] + [d.flush()]
  assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
  assert "" in pieces  # the emoji's first bytes waited


def test_bad_prompts_and_sampling_are_named(model):
  with pytest.raises(ValueError, match="out of range"):
    model.generate([2, 10**6], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    model.generate("x", max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="one prompt"):
    model.generate(["a", "b"], max_new_tokens=2, stream=True)
  with pytest.raises(CheckpointError, match="does not exist"):
    gemma.load("/nonexistent/checkpoint")


def test_model_without_tokenizer_takes_ids():
  m = gemma.load(fixture_dir("moe"))
  assert m.tokenizer is None and m.generate([2, 5, 7], max_new_tokens=3).text is None
  with pytest.raises(ValueError, match="has no tokenizer"):
    m.generate("text", max_new_tokens=2)


def _fresh(model, prompt, max_new_tokens):
  return generate(model.params, model.cfg, [prompt], max_new_tokens,
                  eos_ids=model.stop_ids).tokens[0]


# 8: the cache grows turn after turn
@pytest.mark.parametrize("capacity", [pytest.param(256, marks=pytest.mark.slow), 8])
def test_chat_session_keeps_its_cache(model, monkeypatch, capacity):
  monkeypatch.setattr(session_lib, "MIN_CAPACITY", capacity)
  chat = model.chat(system="Be brief.")
  turns = ["Hi there", "What is a ring buffer, in a long sentence?", "ok", "and again"]
  for i, text in enumerate(turns):
    before = len(chat.token_ids)
    out = chat.send(text, max_new_tokens=6)
    # the prompt was the whole transcript; a fresh generation from it gives the same reply
    assert out.prompt_ids[:before] == chat.token_ids[:before]
    assert out.token_ids == _fresh(model, out.prompt_ids, 6), f"turn {i}"
    assert chat.token_ids == out.prompt_ids + out.token_ids
    # the kept cache holds the transcript but the reply's last token (sliding window 8 wraps)
    assert int(chat._cache.length) == len(chat.token_ids) - 1
  assert [m.role for m in chat.messages] == ["system"] + ["user", "model"] * len(turns)


@pytest.mark.slow
def test_chat_stream_and_context_limit(model):
  chat = model.chat(max_length=64)
  s = chat.send("Hello", max_new_tokens=4, stream=True)
  assert "".join(s) == s.completion.text
  with pytest.raises(ValueError, match="max_length 64"):
    chat.send("a much longer message " * 4, max_new_tokens=20)
  out = chat.send("ok", max_new_tokens=3)  # a refused turn changes nothing
  assert out.token_ids == _fresh(model, out.prompt_ids, 3)
  chat.reset()
  assert chat.token_ids == [] and chat.messages == []


@pytest.mark.slow
def test_gemma3_chat_session(tmp_path):
  for f in ("config.json", "generation_config.json", "model.safetensors"):
    shutil.copy(f"{FIXTURES}/gemma3/{f}", tmp_path / f)
  (tmp_path / "tokenizer.model").write_bytes(_sentencepiece(GEMMA3_SPECIALS))
  m = gemma.load(tmp_path)
  chat = m.chat(system="sys")
  for text in ("one", "two"):
    out = chat.send(text, max_new_tokens=4)
    assert out.token_ids == _fresh(m, out.prompt_ids, 4)
  with pytest.raises(ValueError, match="thinking"):
    m.chat(thinking=True).send("x", max_new_tokens=2)


@pytest.mark.slow
def test_logits_evaluate_quantize_save(model, tmp_path):
  ids = [2, 17, 5, 9, 33]
  logits = model.logits(ids)
  t = jnp.asarray([ids], jnp.int32)
  positions = jnp.arange(5, dtype=jnp.int32)[None]
  ref, _ = jax.jit(forward, static_argnames="cfg")(model.params, t, positions, model.cfg)
  np.testing.assert_array_equal(logits, np.asarray(ref[0]))
  text = "the quick brown fox jumps over the lazy dog " * 6
  ev = model.evaluate(text, context=32, show_progress=False)
  assert np.isfinite(ev.perplexity) and ev.mean_kl == 0 and ev.top1_agreement == 1
  q = model.quantize("tq4")
  assert q.recipe.name == "tq4" and model.recipe is None
  assert isinstance(q.params.layers[0].attn.qkv, QArray)  # fused, as gemma.load serves
  ev_q = q.evaluate(text, context=32, reference=model, show_progress=False)
  assert ev_q.mean_kl > 0 and ev_q.reference_perplexity == pytest.approx(ev.perplexity)
  with pytest.raises(ValueError, match="already quantized"):
    q.quantize("tq4")
  back = gemma.load(q.save(tmp_path / "q"))
  assert back.recipe.name == "tq4" and back.tokenizer is not None
  assert back.generate("hello", max_new_tokens=4).token_ids == q.generate(
      "hello", max_new_tokens=4).token_ids

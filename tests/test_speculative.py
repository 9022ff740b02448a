"""Speculative decoding: greedy output identical to plain greedy decoding (every family, float
and quantized weights, float and TurboQuant caches, ring buffers, batches, stop ids, chat), the
sampling acceptance rule keeps the target distribution (chi-square at a threshold fixed in
advance), prompt lookup, the cache rollback, and errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.inference import mtp, speculative
from gemma.inference.decode import bucket_inputs, generate, left_pad, prefill_step
from gemma.inference.lookup import lookup
from gemma.inference.sampling import Sampler, probabilities
from gemma.io.checkpoint import load
from gemma.kv.cache import init_cache, rollback
from gemma.kv.view import FloatKV, update_float
from gemma.model import config as C
from gemma.model.params import init
from gemma.quant.recipes import quantize_params
from tests.conftest import FAMILIES, fixture_dir, tiny

PROMPT = [2] + [(7 * i) % 500 + 3 for i in range(20)] * 2  # 41 tokens, repeats (lookup hits)
SHORT = PROMPT[:17]


@dataclasses.dataclass(frozen=True)
class Oracle:
  """A test drafter: the plain greedy continuation (columns of the left-padded batch), with
  every `wrong`-th column replaced, so rounds keep some drafts and reject the rest."""

  columns: tuple[tuple[int, ...], ...]  # [B][C] token per cache column of the plain run
  tokens: int = 3
  wrong: int = 3
  rounds: int = 2
  params: object = dataclasses.field(default=None, compare=False)
  name = "oracle"
  needs_hidden = False
  always_drafts = True

  def propose(self, draft_params, params, state, cfg):
    ref = jnp.asarray(self.columns, jnp.int32)
    # [K] columns the drafts would occupy
    cols = state.cache.length + 1 + jnp.arange(self.tokens)
    drafts = jnp.take(ref, jnp.minimum(cols, ref.shape[1] - 1), axis=1)
    drafts = jnp.where(cols % self.wrong == 0, (drafts + 1) % cfg.vocab_size, drafts)
    return drafts, jnp.ones(ref.shape[0], bool)


def _oracle(prompts, generated, cfg, **kw) -> Oracle:
  padded, _ = left_pad(prompts, cfg.pad_id)
  cols = [list(row) + list(gen) for row, gen in zip(padded, generated, strict=True)]
  return Oracle(tuple(tuple(int(t) for t in c) for c in cols), **kw)


def _check_identical(params, cfg, prompts, n=16, kv_quant=None, drafts=(2, 4), **kw):
  want = generate(params, cfg, prompts, n, eos_ids=(), kv_quant=kv_quant, **kw)
  checked = []
  for k in drafts:
    for draft in (speculative.Ngram(tokens=k, min_ngram=1),
                  _oracle(prompts, want.tokens, cfg, tokens=k)):
      got = generate(params, cfg, prompts, n, eos_ids=(), kv_quant=kv_quant, draft=draft, **kw)
      assert got.tokens == want.tokens, (draft, got.tokens, want.tokens)
      checked.append(got)
  # the oracle's rounds keep some drafts and reject others
  oracle = checked[1]
  assert 0 < oracle.accepted < oracle.drafted, (oracle.accepted, oracle.drafted)
  return want, checked


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_identical_every_family(family):
  cfg, params = load(fixture_dir(family), jnp.float32)
  # a left-padded batch; the fixtures' sliding window (8) wraps many times
  _check_identical(params, cfg, [PROMPT, SHORT], n=20, drafts=(3,))


def test_greedy_identical_e_style_one_row():
  cfg, params = load(fixture_dir("e_style"), jnp.float32)
  want, got = _check_identical(params, cfg, [PROMPT], n=12, drafts=(3,))
  assert got[0].draft == "ngram" and got[0].draft_tokens == 3
  assert got[0].decode_steps == 11 and got[0].target_steps < 11


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["tq4", "tq3.5+r4"])
def test_greedy_identical_quantized_weights_and_cache(kv):
  cfg = tiny("gemma4-e2b", head_dim=64, global_head_dim=128)  # TurboQuant needs H % 64 == 0
  params = quantize_params(init(jax.random.PRNGKey(1), cfg, jnp.float32, std=0.3), "tq4")
  prompt = [2] + [(5 * i) % 90 + 3 for i in range(12)] * 3
  prompts = [prompt, prompt[:20]]
  want, _ = _check_identical(params, cfg, prompts, n=16, kv_quant=kv, drafts=(3,))
  got = generate(params, cfg, prompts, 16, eos_ids=(), kv_quant=kv, draft=_fitting_drafter(cfg))
  assert got.tokens == want.tokens and got.draft == "mtp"  # the MTP drafter reads the codes


def test_stop_id_ends_acceptance():
  cfg, params = load(fixture_dir("dense_keqv"), jnp.float32)
  plain = generate(params, cfg, [PROMPT], 12, eos_ids=()).tokens[0]
  stop = plain[4]  # a token the run emits mid-way
  want = generate(params, cfg, [PROMPT], 12, eos_ids=(stop,)).tokens
  draft = _oracle([PROMPT], [plain], cfg, tokens=4, wrong=100)  # every draft right
  got = generate(params, cfg, [PROMPT], 12, eos_ids=(stop,), draft=draft)
  assert got.tokens == want and got.tokens[0][-1] == stop


def test_rollback_and_stale_columns():
  """Rollback moves the write pointer only; a multi-token call attending over a copy of the
  old buffer drops the rolled-back entries it rewrites (no key twice)."""
  cfg = tiny("gemma4-31b")
  cache = init_cache(cfg, 2, 16, slack=3)
  # every buffer has its slack
  assert all(c.pos.shape[1] in (16 + 3, cfg.sliding_window + 3)
             for c in cache.layers if c is not None)
  cut = rollback(cache, jnp.asarray(3, jnp.int32), jnp.asarray([3, 2], jnp.int32))
  assert int(cut.length) == 3 and np.asarray(cut.next_pos).tolist() == [3, 2]
  ring = FloatKV(k=jnp.zeros((1, 6, 1, 2)), v=jnp.zeros((1, 6, 1, 2)),
                 pos=jnp.asarray([[0, 1, 2, 3, 4, -1]], jnp.int32))  # 3, 4 rolled back
  k = jnp.ones((1, 2, 1, 2))
  view, new = update_float(ring, k, k, jnp.asarray([[3, 4]]), jnp.asarray(3), jnp.asarray(2))
  assert np.asarray(view.pos).tolist() == [[0, 1, 2, -1, -1, -1, 3, 4]]
  assert np.asarray(new.pos).tolist() == [[0, 1, 2, 3, 4, -1]]


def test_prompt_lookup():
  hist = jnp.asarray([[5, 6, 7, 8, 9, 5, 6, 7, -1, -1],
                      [-1, -1, 1, 2, 3, 4, 1, 2, -1, -1],
                      [-1, 4, 4, 4, 4, 4, 4, 4, -1, -1],
                      [1, 2, 3, 4, 5, 6, 7, 8, -1, -1]], jnp.int32)
  drafts, found = lookup(hist, jnp.asarray(7, jnp.int32), 4, max_ngram=3, min_ngram=1)
  assert np.asarray(found).tolist() == [True, True, True, False]
  d = np.asarray(drafts)
  assert d[0].tolist() == [8, 9, 5, 6]  # the 3-gram 5 6 7 recurs: continue after it
  assert d[1].tolist() == [3, 4, 1, 2]  # 2-gram 1 2, then periodic with period 4
  assert d[2].tolist() == [4, 4, 4, 4]  # the latest match (period 1)
  assert d[3].tolist() == [8, 8, 8, 8]  # no match: the last token


# Critical values of chi-square at alpha = 0.001, fixed before running (standard tables).
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52}


def _chi2(counts, probs) -> float:
  expected = probs * counts.sum()
  keep = expected > 0
  assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
  return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("sampler", [Sampler(1.0), Sampler(0.7, top_k=4), Sampler(1.3, top_p=0.9)])
def test_sampling_rule_keeps_target_distribution(sampler):
  """20,000 rows of one round with fixed logits: the first emitted token is distributed as
  p_0, and the second, given that the first was the (kept) draft, as p_1."""
  rows, vocab = 20_000, 6
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, (3, vocab)), jnp.float32)
  logits = jnp.broadcast_to(logits, (rows, 3, vocab))
  p = np.asarray(probabilities(logits[0], sampler), np.float64)
  drafts = jnp.broadcast_to(jnp.asarray([int(np.argsort(p[0])[-2]), 1]), (rows, 2))
  out, kept = speculative.accept(logits, drafts, jax.random.key(7), sampler)
  out, kept = np.asarray(out), np.asarray(kept)
  first = np.bincount(out[:, 0], minlength=vocab)
  assert _chi2(first, p[0]) < CHI2_999[int((p[0] > 0).sum()) - 1]
  second = np.bincount(out[kept >= 1, 1], minlength=vocab)
  assert (out[kept >= 1, 0] == drafts[0, 0]).all()
  assert _chi2(second, p[1]) < CHI2_999[int((p[1] > 0).sum()) - 1]


@pytest.mark.slow
def test_sampled_generation_matches_the_model_distribution():
  """End to end on a 4-token vocabulary: 600 seeds of 2 sampled tokens with lookup drafts vs
  the model's exact joint probabilities of the 16 continuations."""
  cfg = dataclasses.replace(tiny("gemma4-31b"), vocab_size=4, eos_ids=(), pad_id=0)
  params = init(jax.random.PRNGKey(3), cfg, jnp.float32, std=0.5)
  prompt = [1, 2, 3, 1, 2, 3, 1, 2]
  sampler = Sampler(1.0)
  # exact P(x1, x2) from two forwards
  from gemma.model.transformer import forward
  pos = lambda n: jnp.arange(n)[None]  # noqa: E731
  p1 = np.asarray(jax.nn.softmax(forward(params, jnp.asarray([prompt]), pos(8), cfg)[0][0, -1]))
  joint = np.zeros((4, 4))
  for a in range(4):
    lg = forward(params, jnp.asarray([prompt + [a]]), pos(9), cfg)[0][0, -1]
    joint[a] = p1[a] * np.asarray(jax.nn.softmax(lg))
  counts = np.zeros((4, 4))
  draft = speculative.Ngram(tokens=3, min_ngram=1, rounds=1)
  for seed in range(600):
    t = generate(params, cfg, [prompt], 2, sampler=sampler, seed=seed, draft=draft).tokens[0]
    counts[t[0], t[1]] += 1
  stat = _chi2(counts.ravel(), joint.ravel())
  assert stat < 37.70, stat  # chi-square, 15 degrees of freedom, alpha = 0.001


def test_chat_session_with_drafts(e_style_ckpt):
  import gemma
  model = gemma.load(e_style_ckpt)
  plain = model.chat()
  spec = model.chat(draft=speculative.Ngram(tokens=3, min_ngram=1))
  for text in ("hello there", "and again hello there"):
    a = plain.send(text, max_new_tokens=8)
    b = spec.send(text, max_new_tokens=8)
    assert a.token_ids == b.token_ids
  assert spec.token_ids == plain.token_ids


def test_bad_drafts_are_refused():
  with pytest.raises(ValueError, match="draft tokens"):
    speculative.Ngram(tokens=0)
  with pytest.raises(ValueError, match="n-gram"):
    speculative.Ngram(min_ngram=3, max_ngram=2)
  cfg, params = load(fixture_dir("e_style"), jnp.float32)
  with pytest.raises(ValueError, match="ple-on-host"):
    generate(params, cfg, [PROMPT], 4, ple_on_host=True, draft=speculative.Ngram())


DRAFTERS = ("drafter_e_style", "drafter_e_style_ordered", "drafter_dense_keqv",
            "drafter_dense_keqv_ordered")


@pytest.mark.parametrize("name", DRAFTERS)
def test_mtp_drafter_matches_reference(name):
  """Round by round against the reference's own assisted generation: every drafter call's
  logits <= 1e-4 relative and its token, each round's accepted count and tokens, including
  rounds after partial and full acceptances and the shorter rounds at the end of the budget."""
  ref = np.load(fixture_dir(name) + "/reference.npz")
  cfg, params = load(fixture_dir(str(ref["target"])), jnp.float32)
  k = int(ref["num_assistant_tokens"])
  draft = mtp.load_drafter(fixture_dir(name), tokens=k, rounds=1)
  assert draft.config.ordered == (str(ref["head"]) == "ordered")
  prompt = ref["prompt_ids"].astype(np.int32)[None]
  total = int(ref["max_new_tokens"])
  cache = init_cache(cfg, 1, prompt.shape[1] + total, slack=k)
  logits, hidden, cache = prefill_step(params, *bucket_inputs(cfg, prompt, np.arange(
      prompt.shape[1], dtype=np.int32)[None]), cache, cfg, hidden=True)
  first = np.asarray(jnp.argmax(logits, -1), np.int32)
  state = speculative.SpecState(
      cache=cache, last=jnp.asarray(first), hidden=hidden, done=jnp.zeros(1, bool),
      bad=jnp.zeros(1, bool), history=jnp.asarray(speculative.initial_history(
          prompt, np.zeros_like(prompt), first, cache.max_length + k + 2)))
  out = [int(first[0])]
  stop = jnp.zeros((0,), jnp.int32)
  for r in range(len(ref["round_position"])):
    assert int(state.cache.next_pos[0]) == int(ref["round_position"][r])
    calls = np.flatnonzero(ref["call_round"] == r)
    drafts, dlogits = draft.draft(draft.params, params, state, cfg)
    want = ref["call_logits"][calls]
    got = np.asarray(dlogits[0, :len(calls)])
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4, r
    assert np.asarray(drafts[0, :len(calls)]).tolist() == ref["call_token"][calls].tolist()
    state, buf, count, stats = speculative.rounds_step(
        params, draft.params, state, jax.random.key(0), stop,
        jnp.asarray(total - len(out), jnp.int32), cfg=cfg, sampler=Sampler(), draft=draft)
    assert int(count) == int(ref["round_appended"][r]), r
    assert int(stats.accepted) == int(ref["round_accepted"][r]), r
    out += np.asarray(buf[0, :int(count)]).tolist()
  want = ref["output_ids"][prompt.shape[1]:].tolist()
  assert len(out) >= total - 1 and out == want[:len(out)]  # the last step may be a plain one
  got = generate(params, cfg, [prompt[0].tolist()], total, eos_ids=(), draft=draft)
  assert got.tokens[0] == ref["output_ids"][prompt.shape[1]:].tolist()
  assert got.acceptance_rate > 0.1


def _fitting_drafter(cfg, seed=0, ordered=False, tokens=3):
  """A random drafter shaped for `cfg` (hidden 24, 2 layers: sliding and full)."""
  kinds = (C.AttentionType.LOCAL, C.AttentionType.GLOBAL)
  mcfg = mtp.assistant_config(cfg, hidden=24, ffn=32, heads=4, ordered=ordered,
                              num_centroids=16, centroid_top_k=4, layer_types=kinds)
  return mtp.random_drafter(mcfg, jax.random.key(seed), tokens=tokens, rounds=2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["e_style", "dense_keqv", "moe"])
def test_mtp_greedy_identical_every_family(family):
  cfg, params = load(fixture_dir(family), jnp.float32)
  want = generate(params, cfg, [PROMPT, SHORT], 16, eos_ids=())
  draft = _fitting_drafter(cfg, ordered=family == "e_style")
  got = generate(params, cfg, [PROMPT, SHORT], 16, eos_ids=(), draft=draft)
  assert got.tokens == want.tokens and got.draft == "mtp"


def test_drafter_of_another_target_is_refused():
  cfg, params = load(fixture_dir("e_style"), jnp.float32)
  other = load(fixture_dir("dense_keqv"), jnp.float32)[0]
  with pytest.raises(ValueError, match="another model size|head size"):
    generate(params, cfg, [PROMPT], 4, draft=_fitting_drafter(other))
  small_vocab = dataclasses.replace(cfg, vocab_size=256)
  with pytest.raises(ValueError, match="vocabulary 256"):
    generate(params, cfg, [PROMPT], 4, draft=_fitting_drafter(small_vocab))
  with pytest.raises(ValueError, match="no assistant preset"):
    mtp.assistant_preset("gemma3-270m")
  for name in ("gemma4-e2b", "gemma4-e4b", "gemma4-26b-a4b", "gemma4-31b"):
    mtp.check_target(mtp.assistant_preset(name), C.get_preset(name))


def test_cli_draft_flags_and_json(tmp_path, capsys):
  from gemma.cli import app as cli
  base = ["generate", "--checkpoint", fixture_dir("e_style"), "--prompt-ids",
          ",".join(map(str, PROMPT)), "--max-new-tokens", "10", "--json"]
  assert cli.main(base) == 0
  plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert plain["draft"] is None and plain["draft_tokens"] == 0
  for extra in (["--draft", "ngram", "--draft-tokens", "3"],
                ["--draft", fixture_dir("drafter_e_style")]):
    assert cli.main([*base, *extra]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == plain["token_ids"]
    assert out["draft"] in ("ngram", "mtp") and out["draft_tokens"] in (3, 2)
    assert 0 <= out["acceptance_rate"] <= 1 and out["mean_accepted_per_step"] >= 0
    assert out["decode_tokens_per_s"] > 0
  for bad, msg in ((["--draft-tokens", "3"], "needs --draft"),
                   (["--draft", str(tmp_path / "none")], "neither 'ngram'"),
                   (["--draft", "ngram", "--draft-tokens", "0"], ">= 1"),
                   (["--draft", fixture_dir("drafter_dense_keqv")], "does not fit the target")):
    assert cli.main([*base, *bad]) == 2
    assert msg in capsys.readouterr().err


def test_streaming_with_drafts(e_style_ckpt):
  import gemma
  model = gemma.load(e_style_ckpt, draft="ngram", draft_tokens=3)
  plain = gemma.load(e_style_ckpt).generate("hello hello hello", max_new_tokens=12)
  pieces = model.generate("hello hello hello", max_new_tokens=12, stream=True)
  text = "".join(pieces)
  assert text == pieces.completion.text == plain.text
  assert pieces.completion.token_ids == plain.token_ids and pieces.completion.draft == "ngram"

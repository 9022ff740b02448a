"""Strided (HF-style sliding-window) perplexity: `make_windows(stride=)`, `evaluate(stride=)`,
`gemma4 eval --stride`."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.cli import app as cli
from gemma.inference.evaluate import evaluate, log_probs, make_windows, scored_mask, window_sums
from gemma.model.params import init
from gemma.model.transformer import forward
from tests.conftest import tiny

CONTEXT = 8


@pytest.fixture(scope="module")
def model():
  cfg = tiny("gemma4-31b")  # sliding_window 4 < CONTEXT: local layers are exercised too
  params = init(jax.random.PRNGKey(0), cfg, std=0.3)
  reference = init(jax.random.PRNGKey(1), cfg, std=0.3)
  ids = [int(i) for i in np.random.default_rng(0).integers(3, cfg.vocab_size, 19)]
  return cfg, params, reference, ids


def _scored_text_indices(scored, stride):
  """Text index of every scored token, window by window (slot j of window w = text w*stride+j-1)."""
  return [[w * stride + j - 1 for j in np.flatnonzero(row)] for w, row in enumerate(scored)]


def _results(result):
  """An EvalResult without its timing."""
  return (result.perplexity, result.reference_perplexity, result.mean_kl, result.top1_agreement,
          result.tokens, result.windows)


@pytest.mark.parametrize("n,context,stride", [(11, 5, 2), (10, 5, 2), (3, 5, 1), (17, 8, 3),
                                              (17, 8, 7), (30, 6, 1), (9, 4, 2)])
def test_windows_score_every_token_once(n, context, stride):
  ids = list(range(100, 100 + n))
  tokens, positions = make_windows(ids, context, bos_id=2, stride=stride)
  scored = scored_mask(positions, stride)
  span = context - 1
  assert tokens.shape == positions.shape == scored.shape
  assert len(tokens) == 1 + max(0, math.ceil((n - span) / stride))
  for w, (t, p) in enumerate(zip(tokens, positions, strict=True)):
    chunk = ids[w * stride:w * stride + span]  # windows start every `stride` text tokens
    assert t[0] == 2 and list(t[1:1 + len(chunk)]) == chunk and not t[1 + len(chunk):].any()
    assert list(p) == list(range(1 + len(chunk))) + [-1] * (span - len(chunk))
    if w:  # overlaps the previous window by span - stride text tokens
      assert list(t[1:1 + span - stride]) == list(tokens[w - 1, 1 + stride:])
  per_window = _scored_text_indices(scored, stride)
  flat = [i for idx in per_window for i in idx]
  assert flat == list(range(n))  # every text token exactly once, in order
  assert not scored[:, 0].any() and not scored[positions < 0].any()
  assert list(scored[0, 1:]) == list(positions[0, 1:] >= 1)  # the first window scores all
  for w, idx in enumerate(per_window[1:], 1):
    assert 1 <= len(idx) <= stride  # the last `stride` slots (fewer in the padded last window)
    assert min(idx) - w * stride >= span - stride  # history >= context - 1 - stride
  if n > span and (n - span) % stride:
    assert (positions[-1] < 0).any()  # the last window is padded


def test_explicit_example():
  tokens, positions = make_windows(list(range(10, 21)), context=5, bos_id=2, stride=2)
  np.testing.assert_array_equal(tokens, [[2, 10, 11, 12, 13], [2, 12, 13, 14, 15],
                                         [2, 14, 15, 16, 17], [2, 16, 17, 18, 19],
                                         [2, 18, 19, 20, 0]])
  np.testing.assert_array_equal(scored_mask(positions, 2), [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1],
                                                            [0, 0, 0, 1, 1], [0, 0, 0, 1, 1],
                                                            [0, 0, 0, 1, 0]])


def test_full_stride_is_the_old_behaviour(model):
  cfg, params, reference, ids = model
  tokens, positions = make_windows(list(range(10, 17)), context=4, bos_id=2, stride=3)
  np.testing.assert_array_equal(tokens, [[2, 10, 11, 12], [2, 13, 14, 15], [2, 16, 0, 0]])
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, -1, -1]])
  tokens, positions = make_windows(ids, CONTEXT, cfg.bos_id, stride=CONTEXT - 1)
  default = make_windows(ids, CONTEXT, cfg.bos_id)
  np.testing.assert_array_equal(tokens, default[0])
  np.testing.assert_array_equal(positions, default[1])
  np.testing.assert_array_equal(scored_mask(positions, CONTEXT - 1), positions >= 1)
  np.testing.assert_array_equal(scored_mask(positions), positions >= 1)
  # The old evaluation loop: window_sums without a `scored` mask, over the same windows.
  old = np.zeros(5, np.float64)
  for t, p in zip(tokens, positions, strict=True):
    t, p = jnp.asarray(t[None]), jnp.asarray(p[None])
    lq, lp = log_probs(params, t, p, cfg), log_probs(reference, t, p, cfg)
    old += np.asarray(window_sums(lq, lp, t, p), np.float64)
  kw = dict(reference=reference, show_progress=False)
  full = evaluate(params, cfg, ids, CONTEXT, stride=CONTEXT - 1, **kw)
  none = evaluate(params, cfg, ids, CONTEXT, **kw)
  assert _results(full) == _results(none)
  assert full.tokens == old[0] == len(ids) and full.windows == len(tokens)
  np.testing.assert_allclose(full.perplexity, math.exp(old[1] / old[0]), rtol=1e-6)
  np.testing.assert_allclose(full.mean_kl, old[3] / old[0], rtol=1e-5)
  assert full.top1_agreement == old[4] / old[0]


def test_strided_matches_brute_force(model):
  """Each scored token against its own sequence: BOS + exactly the history it should see + it.

  One batched forward, a row per token; rows are filled up to CONTEXT with more text (causal
  attention: what follows the target cannot change its prediction), so one shape is compiled.
  """
  cfg, params, reference, ids = model
  stride, span = 3, CONTEXT - 1
  got = evaluate(params, cfg, ids, CONTEXT, reference=reference, stride=stride,
                 show_progress=False)
  rows, history = [], []
  for i in range(len(ids)):
    start = 0 if i < span else ((i - span) // stride + 1) * stride  # the window scoring ids[i]
    window = [cfg.bos_id, *ids[start:i + 1]]
    assert len(window) <= CONTEXT
    rows.append(window + [5] * (CONTEXT - len(window)))
    history.append(i - start)
  tokens = jnp.asarray(rows, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(CONTEXT), tokens.shape)
  at = np.asarray(history)  # the slot predicting ids[i] (the last of BOS + its history)
  lq, lp = (np.asarray(jax.nn.log_softmax(forward(m, tokens, positions, cfg)[0], -1),
                       np.float64)[np.arange(len(ids)), at] for m in (params, reference))
  nll = -lq[np.arange(len(ids)), ids]
  kl = np.sum(np.exp(lp) * (lp - lq), -1)
  agree = lp.argmax(-1) == lq.argmax(-1)
  assert min(history[span:]) == span - stride and max(history) == span - 1
  assert got.tokens == len(ids) and got.windows == 1 + math.ceil((len(ids) - span) / stride)
  np.testing.assert_allclose(got.perplexity, math.exp(np.mean(nll)), rtol=1e-5)
  np.testing.assert_allclose(got.mean_kl, np.mean(kl), rtol=1e-4)
  assert got.top1_agreement == pytest.approx(np.mean(agree))
  plain = evaluate(params, cfg, ids, CONTEXT, reference=reference, show_progress=False)
  assert abs(plain.perplexity / got.perplexity - 1) > 1e-3  # the history actually matters


@pytest.mark.parametrize("stride", [0, -1, CONTEXT, CONTEXT + 5, 2.5, True])
def test_bad_stride(model, stride):
  cfg, params, _, ids = model
  with pytest.raises(ValueError, match="stride must be"):
    make_windows(ids, CONTEXT, 2, stride=stride)
  with pytest.raises(ValueError, match="stride must be"):
    evaluate(params, cfg, ids, CONTEXT, stride=stride, show_progress=False)
  with pytest.raises(ValueError, match="context must be >= 2"):
    make_windows(ids, 1, 2, stride=1)


def test_eval_cli_stride(e_style_ckpt, tmp_path, capsys):
  text = tmp_path / "text.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 10, encoding="utf-8")
  base = ["eval", "--checkpoint", str(e_style_ckpt), "--text", str(text), "--context", "16",
          "--max-tokens", "40", "--json"]
  assert cli.main(base) == 0
  plain = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert cli.main([*base, "--stride", "5"]) == 0
  strided = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert plain["stride"] == 15 and strided["stride"] == 5
  assert set(strided) >= {"perplexity", "mean_kl", "top1_agreement", "bits_per_weight",
                          "reference_perplexity", "tokens", "windows", "context", "recipe",
                          "kv_quant", "model", "bytes", "seconds"}
  assert strided["tokens"] == plain["tokens"] == 40 and strided["context"] == 16
  assert plain["windows"] == 3 and strided["windows"] == 1 + math.ceil((40 - 15) / 5)
  assert strided["perplexity"] > 1 and strided["mean_kl"] == 0
  for bad in ("0", "16"):
    assert cli.main([*base, "--stride", bad]) == 2
    assert "stride must be in [1, context - 1]" in capsys.readouterr().err

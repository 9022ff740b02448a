"""Quantize on load, `gemma4 quantize` checkpoints, `--quant`, and `gemma4 eval`."""

import contextlib
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.cli import app as cli
from gemma.inference.evaluate import evaluate, make_windows
from gemma.io.checkpoint import CheckpointError, load
from gemma.io.formats.converted import save_converted
from gemma.model.params import leaf_names
from gemma.model.transformer import forward
from gemma.quant import QArray, quantize_params
from gemma.quant.footprint import size_report
from tests.conftest import fixture_dir

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _leaves(tree):
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray))


def _assert_same_params(a, b, check_dtype=True):
  assert leaf_names(a) == leaf_names(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.shape == y.shape and (x.dtype == y.dtype or not check_dtype)
    np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    assert type(x) is type(y)
    if isinstance(x, QArray):
      assert (x.spec, x.layout, x.shape) == (y.spec, y.layout, y.shape)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "text.txt"
  path.write_text(TEXT, encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def quantized_dir(e_style_ckpt, tmp_path_factory):
  out = tmp_path_factory.mktemp("q") / "tq4"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    assert cli.main(["quantize", "--checkpoint", str(e_style_ckpt), "--recipe", "tq4",
                     "--out", str(out)]) == 0
  (out / "stdout.txt").write_text(stdout.getvalue())
  return out


def test_quantize_on_load_equals_quantize_params():
  """The per-tensor hook gives exactly quantize_params of the float model."""
  _, ref = load(fixture_dir("moe"), jnp.float32)
  _, streamed = load(fixture_dir("moe"), jnp.float32, quant="tq3")
  _assert_same_params(streamed, quantize_params(ref, "tq3"))
  assert any(isinstance(x, QArray) and x.layout.batch_ndim == 1 for x in _leaves(streamed))


@pytest.mark.slow
def test_quantize_writes_loadable_checkpoint(e_style_ckpt, quantized_dir, capsys):
  out = (quantized_dir / "stdout.txt").read_text()
  assert "bytes/parameter (norms and scales included)" in out and "bits/weight" in out
  assert (quantized_dir / "tokenizer.model").is_file()
  cfg, params = load(quantized_dir, jnp.float32)
  _, expect = load(e_style_ckpt, jnp.float32, quant="tq4", float_dtype=jnp.bfloat16)
  _assert_same_params(params, expect, check_dtype=False)  # float leaves stored as bfloat16
  report = size_report(params)
  assert 4.1 < report["quantized_bits_per_weight"] < 5.5  # tiny rows pad blocks of 64
  # the same recipe is a no-op on a quantized checkpoint; another one is an error
  _assert_same_params(load(quantized_dir, jnp.float32, quant="tq4")[1], params)
  with pytest.raises(CheckpointError, match="already quantized with recipe 'tq4'"):
    load(quantized_dir, jnp.float32, quant="tq3")
  assert cli.main(["generate", "--checkpoint", str(quantized_dir), "--prompt", "hello",
                   "--max-new-tokens", "3", "--json"]) == 0
  assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"]) >= 1
  # refuses to overwrite without --force
  assert cli.main(["quantize", "--checkpoint", str(e_style_ckpt), "--recipe", "tq4",
                   "--out", str(quantized_dir)]) == 2
  assert "--force" in capsys.readouterr().err


def test_quantized_converted_source_streams_by_group(tmp_path):
  """A float converted checkpoint quantizes group by group on load, equal to quantize_params."""
  cfg, ref = load(fixture_dir("dense_keqv"), jnp.float32)
  save_converted(tmp_path / "c", cfg, ref)
  _, streamed = load(tmp_path / "c", jnp.float32, quant="nf4")
  _assert_same_params(streamed, quantize_params(ref, "nf4"))


def test_logits_quant_flag(tmp_path):
  ids = [2, 17, 5, 9]
  assert cli.main(["logits", "--checkpoint", fixture_dir("e_style"), "--prompt-ids",
                   ",".join(map(str, ids)), "--out", str(tmp_path / "q.npy"),
                   "--quant", "int8"]) == 0
  cfg, ref = load(fixture_dir("e_style"), jnp.float32)
  tokens = jnp.asarray([ids], jnp.int32)
  positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
  want = jax.jit(forward, static_argnames="cfg")(quantize_params(ref, "int8"), tokens,
                                                 positions, cfg)[0][0]
  got = np.load(tmp_path / "q.npy")
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=1e-5)
  base = jax.jit(forward, static_argnames="cfg")(ref, tokens, positions, cfg)[0][0]
  assert np.abs(got - np.asarray(base)).max() > 0  # quantization did change something


def test_make_windows():
  tokens, positions = make_windows(list(range(10, 17)), context=4, bos_id=2)
  np.testing.assert_array_equal(tokens, [[2, 10, 11, 12], [2, 13, 14, 15], [2, 16, 0, 0]])
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, -1, -1]])
  with pytest.raises(ValueError, match="context must be >= 2"):
    make_windows([5], context=1, bos_id=2)
  with pytest.raises(ValueError, match="no tokens"):
    make_windows([], context=8, bos_id=2)


@pytest.mark.slow
def test_evaluate_matches_direct_computation():
  """Perplexity / KL / agreement against a plain numpy computation over the same windows."""
  cfg, ref = load(fixture_dir("dense_keqv"), jnp.float32)
  params = quantize_params(ref, "tq2")
  ids = [int(i) for i in np.random.default_rng(0).integers(3, cfg.vocab_size, 29)]
  got = evaluate(params, cfg, ids, context=8, reference=ref, show_progress=False)
  tokens, positions = make_windows(ids, 8, cfg.bos_id)
  nll, kl, agree = [], [], []
  for t, p in zip(tokens, positions, strict=True):
    n = int((p >= 0).sum())
    args = (jnp.asarray(t[None, :n]), jnp.asarray(p[None, :n]), cfg)
    lq = np.asarray(jax.nn.log_softmax(forward(params, *args)[0][0], -1), np.float64)
    lp = np.asarray(jax.nn.log_softmax(forward(ref, *args)[0][0], -1), np.float64)
    for i in range(n - 1):
      nll.append(-lq[i, t[i + 1]])
      kl.append(np.sum(np.exp(lp[i]) * (lp[i] - lq[i])))
      agree.append(lp[i].argmax() == lq[i].argmax())
  assert got.tokens == len(ids) == len(nll) and got.windows == 5
  np.testing.assert_allclose(got.perplexity, math.exp(np.mean(nll)), rtol=1e-4)
  np.testing.assert_allclose(got.mean_kl, np.mean(kl), rtol=1e-3, atol=1e-6)
  assert got.top1_agreement == pytest.approx(np.mean(agree))
  assert got.mean_kl > 0
  same = evaluate(ref, cfg, ids, context=8, show_progress=False)
  assert same.mean_kl == 0 and same.top1_agreement == 1
  assert same.perplexity == pytest.approx(got.reference_perplexity, rel=1e-5)


def test_eval_cli_json(e_style_ckpt, text_file, capsys):
  assert cli.main(["eval", "--checkpoint", str(e_style_ckpt), "--text", str(text_file),
                   "--context", "32", "--json"]) == 0
  base = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert base["mean_kl"] == 0 and base["top1_agreement"] == 1 and base["bits_per_weight"] == 32
  assert base["perplexity"] > 1 and base["tokens"] > 50
  assert cli.main(["eval", "--checkpoint", str(e_style_ckpt), "--text", str(text_file),
                   "--context", "32", "--quant", "tq4", "--json"]) == 0
  q = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert set(q) >= {"perplexity", "mean_kl", "top1_agreement", "bits_per_weight"}
  assert q["mean_kl"] > 0 and 0 < q["top1_agreement"] <= 1 and 4 < q["bits_per_weight"] < 5.5
  assert q["reference_perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
  assert q["tokens"] == base["tokens"]


def test_eval_cli_errors(e_style_ckpt, quantized_dir, text_file, capsys):
  assert cli.main(["eval", "--checkpoint", str(e_style_ckpt), "--text", str(text_file),
                   "--context", "1"]) == 2
  assert "context must be >= 2" in capsys.readouterr().err
  assert cli.main(["eval", "--checkpoint", str(e_style_ckpt), "--text", str(text_file),
                   "--context", "100000"]) == 2
  assert "exceeds the model" in capsys.readouterr().err
  assert cli.main(["eval", "--checkpoint", str(quantized_dir), "--text", str(text_file),
                   "--quant", "tq3"]) == 2
  assert "already quantized" in capsys.readouterr().err
  assert cli.main(["eval", "--checkpoint", str(e_style_ckpt), "--text",
                   str(text_file.parent / "missing.txt")]) == 2
  with pytest.raises(SystemExit):
    cli.main(["eval", "--checkpoint", str(e_style_ckpt), "--text", str(text_file),
              "--quant", "tq7"])

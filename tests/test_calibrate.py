"""Calibrated quantization: GPTQ/LDLQ and importance-weighted scales on every grid, sequential
statistics, bit allocation, calibrated checkpoints through every path, `eval --reference`."""

import contextlib
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.cli import app as cli
from gemma.io.checkpoint import load
from gemma.io.formats.converted import read_recipe, save_converted
from gemma.model import transformer as M
from gemma.model.layers import einsum, ragged_dot, rms_norm
from gemma.model.params import init
from gemma.quant import QArray, allocate, calibrate, gptq, probe, recipes
from gemma.quant.footprint import size_report
from gemma.quant.qarray import QuantSpec
from gemma.training import lora
from pallas_kernels import registry
from tests.conftest import tiny

GRIDS = {
    "tq2": QuantSpec("tq", 2), "tq3": QuantSpec("tq", 3), "tq4": QuantSpec("tq", 4),
    "tq4-g32": QuantSpec("tq", 4, block=32),
    "tq4-hadamard": QuantSpec("tq", 4, rotation="hadamard"),
    "int4-g32": QuantSpec("int", 4, block=32, rotation="none"),
    "int8": QuantSpec("int", 8, rotation="none"), "nf4": QuantSpec("nf4", 4, rotation="none"),
    "nf4-g32": QuantSpec("nf4", 4, block=32, rotation="none"),
}
TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of "
        "having nothing to do: once or twice she had peeped into the book her sister was "
        "reading, but it had no pictures or conversations in it. ") * 12


@functools.cache
def _layer():
  """A random [256, 48] weight and H of correlated inputs with uneven scales."""
  rng = np.random.default_rng(0)
  n_in = 256
  w = jnp.asarray(rng.standard_normal((n_in, 48)) * 0.05, jnp.float32)
  mix = rng.standard_normal((n_in, n_in)) * 0.3 + np.eye(n_in)
  x = rng.standard_normal((1024, n_in)) @ mix * np.exp(rng.standard_normal(n_in))
  return w, gptq.hessian_of(jnp.asarray(x, jnp.float32))


def _diag_error(w, q, h):
  """Σ diag(H)·err² (H damped) in the basis the codes live in: awq-scale's objective."""
  spec = q.spec
  d = jnp.diag(gptq.damped(gptq.rotate_hessian(h, spec))).reshape(-1, spec.block)  # [nb, g]
  err = (w - q.astype(jnp.float32)).T.reshape(w.shape[1], -1, spec.block)  # [R, nb, g]
  err = spec.rotation_of().apply(err) if spec.rotates else err
  return float(jnp.sum(d * err ** 2))


@pytest.mark.parametrize("grid", list(GRIDS))
def test_gptq_beats_round_to_nearest_and_equals_it_with_identity_h(grid):
  spec = GRIDS[grid]
  w, h = _layer()
  rtn = recipes.quantize(w, spec)
  base = gptq.weighted_error(w, rtn, h)
  plain = gptq.weighted_error(w, gptq.quantize_weight(w, h, spec, refit=False), h)
  refit = gptq.weighted_error(w, gptq.quantize_weight(w, h, spec), h)
  assert plain < 0.9 * base, (grid, plain / base)
  assert refit <= plain * (1 + 1e-6), (grid, refit / plain)
  awq = gptq.quantize_weight(w, h, spec, method="awq-scale")
  assert _diag_error(w, awq, h) <= _diag_error(w, rtn, h), grid
  # H = I: no error feedback and the data-free scales, i.e. round-to-nearest code for code
  same = gptq.quantize_weight(w, jnp.eye(w.shape[0]), spec, refit=False)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(rtn), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert same.spec == rtn.spec


def test_probe_statistics_follow_the_weight_input_order():
  """H of 'btnh,nhd->btd' flattens (n, h) like the weight; grouped matmuls give H per expert."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)

  @jax.jit
  def run(p):
    with probe.recording() as rec:
      y = einsum("btnh,nhd->btd", x, p)
    return y, rec.hessians

  y, hs = run(probe.Probe(w, name="o"))
  np.testing.assert_allclose(y, jnp.einsum("btnh,nhd->btd", x, w), rtol=1e-5)
  flat = np.asarray(x).reshape(10, 12)
  np.testing.assert_allclose(hs["o"], flat.T @ flat, rtol=1e-5)
  rows = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
  sizes = jnp.asarray([3, 0, 4])
  experts = jnp.asarray(rng.standard_normal((3, 4, 2)), jnp.float32)

  @jax.jit
  def grouped(p):
    with probe.recording() as rec:
      out = ragged_dot(rows, p, sizes)
    return out, rec.hessians

  out, hs = grouped(probe.Probe(experts, name="e"))
  np.testing.assert_allclose(out, jax.lax.ragged_dot(rows, experts, sizes), rtol=1e-5)
  r = np.asarray(rows)
  want = np.stack([r[:3].T @ r[:3], np.zeros((4, 4)), r[3:].T @ r[3:]])
  np.testing.assert_allclose(hs["e"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sequential_statistics_of_a_two_layer_model():
  """Layer 1's statistics come from the quantized layer 0; the LM head's from both."""
  cfg = tiny("gemma4-31b", num_layers=2, layer_types=("sliding", "full"))
  params = init(jax.random.PRNGKey(0), cfg, jnp.float32, std=0.3)
  windows = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)).astype(np.int32)
  recipe = recipes.get_recipe("tq3")
  seen, quantized = {}, {}

  def process(tree, prefix, stats, names):
    seen.update(stats)
    leaves = dict(zip((prefix + n for n in calibrate.leaf_names(tree)), jax.tree.leaves(tree),
                      strict=True))
    new = {n: recipes.quantize(leaves[n], recipe.spec_of(n), recipes.layout_of(n))
           for n in names}
    quantized.update(new)
    return new

  out = calibrate.walk(params, cfg, windows, lambda n: recipe.spec_of(n) is not None, process,
                       show_progress=False)
  norm = dict(eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  q_layers = out.layers
  want = {"layers.0.attn.q": 0, "layers.1.attn.q": 0, "embed": 0}
  float_q1 = 0
  for win in windows:
    tokens = jnp.asarray(win[None])
    pos = jnp.arange(tokens.shape[1])[None]
    h = M.embed(params, tokens, cfg, jnp.float32)
    kw = dict(ple=None, shared=None, cache=None, codec=None, start=jnp.zeros((), jnp.int32),
              num_columns=jnp.asarray(tokens.shape[1]))
    for i, spec in enumerate(cfg.layers):
      x = rms_norm(h, params.layers[i].attn_pre_norm, **norm)[0]
      want[f"layers.{i}.attn.q"] += x.T @ x
      if i == 1:
        hf = M.decoder_layer(params.layers[0], M.embed(params, tokens, cfg, jnp.float32), pos,
                             cfg.layers[0], cfg, **kw)[0]
        xf = rms_norm(hf, params.layers[1].attn_pre_norm, **norm)[0]
        float_q1 += xf.T @ xf
      h = M.decoder_layer(q_layers[i], h, pos, spec, cfg, **kw)[0]
    x = rms_norm(h, params.final_norm, **norm)[0]
    want["embed"] += x.T @ x
  for name, h in want.items():
    np.testing.assert_allclose(seen[name], h, rtol=2e-4, atol=1e-4 * float(jnp.max(h)))
  # the float path would have given other statistics for layer 1
  assert float(jnp.max(jnp.abs(float_q1 - want["layers.1.attn.q"]))) > 1e-3
  assert isinstance(out.embed, QArray) and isinstance(out.layers[1].mlp.down, QArray)


def test_solve_meets_the_budget_and_prefers_sensitive_tensors():
  bits = np.asarray([2.125, 3.125, 4.125, 8.125])
  sens = {"a": np.asarray([100.0, 10, 1, 0]), "b": np.asarray([1.0, 0.5, 0.2, 0])}
  sizes = {"a": 1000, "b": 1000}
  choice = allocate.solve(sens, {"a": bits, "b": bits}, sizes, 3.125)
  assert choice == {"a": 2, "b": 0}
  assert allocate.solve(sens, {"a": bits, "b": bits}, sizes, 9.0) == {"a": 3, "b": 3}
  with pytest.raises(ValueError, match="below"):
    allocate.solve(sens, {"a": bits, "b": bits}, sizes, 2.0)


# ----------------------------------------------------------------------------- command line
def _run(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(argv)
  return code, out.getvalue()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("calib") / "alice.txt"
  path.write_text(TEXT, encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def calibrated_dir(e_style_ckpt, text_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("calibrated") / "tq4"
  code, stdout = _run(["quantize", "--checkpoint", str(e_style_ckpt), "--recipe", "tq4",
                       "--calibrate", str(text_file), "--calib-tokens", "300",
                       "--calib-context", "64", "--dtype", "float32", "--out", str(out)])
  assert code == 0, stdout
  assert "gptq on alice.txt" in stdout
  return out


@pytest.mark.slow
def test_calibrated_checkpoint_loads_and_runs_every_path(calibrated_dir, e_style_ckpt):
  recipe = read_recipe(calibrated_dir)
  assert recipe.name == "tq4" and recipe.calibration.startswith("gptq on alice.txt")
  cfg, params = load(calibrated_dir, jnp.float32)
  cfg_rtn, rtn = load(e_style_ckpt, jnp.float32, quant="tq4")
  assert [type(x) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))] == [
      type(x) for x in jax.tree.leaves(rtn, is_leaf=lambda x: isinstance(x, QArray))]
  assert not all(bool(jnp.all(a.codes == b.codes)) for a, b in zip(
      *(jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, QArray)) for p in (params, rtn)),
      strict=True) if isinstance(a, QArray))
  tokens = jnp.asarray([[2, 17, 5, 9, 33, 101, 7]])
  pos = jnp.arange(tokens.shape[1])[None]
  logits = {}
  for impl in ("xla", "interpret"):
    registry.set_default_impl(impl)
    try:
      fwd = jax.jit(functools.partial(M.forward, cfg=cfg))
      logits[impl] = np.asarray(fwd(params, tokens, pos)[0])
    finally:
      registry.set_default_impl(None)
  scale = np.max(np.abs(logits["xla"]))
  assert np.all(np.isfinite(logits["xla"]))
  assert np.max(np.abs(logits["interpret"] - logits["xla"])) < 1e-4 * scale
  # LoRA on top of the calibrated base (QLoRA): B = 0 leaves the logits unchanged
  adapters = lora.init_adapters(jax.random.PRNGKey(0), params, rank=2)
  with_lora = lora.with_adapters(params, adapters, 1.0)
  got = np.asarray(jax.jit(functools.partial(M.forward, cfg=cfg))(with_lora, tokens, pos)[0])
  np.testing.assert_allclose(got, logits["xla"], rtol=1e-5, atol=1e-5 * scale)
  code, stdout = _run(["generate", "--checkpoint", str(calibrated_dir), "--prompt", "Alice was",
                       "--max-new-tokens", "4", "--json"])
  assert code == 0 and len(json.loads(stdout.strip().splitlines()[-1])["token_ids"]) >= 1


def test_eval_reference_compares_any_two_checkpoints(calibrated_dir, e_style_ckpt, text_file):
  def run(*argv):
    code, stdout = _run(["eval", "--text", str(text_file), "--context", "64", "--json", *argv])
    assert code == 0, stdout
    return json.loads(stdout.strip().splitlines()[-1])

  vs = run("--checkpoint", str(calibrated_dir), "--reference", str(e_style_ckpt))
  alone = run("--checkpoint", str(calibrated_dir))
  ref = run("--checkpoint", str(e_style_ckpt))
  assert vs["reference"] == str(e_style_ckpt)
  assert vs["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
  assert vs["reference_perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
  assert vs["mean_kl"] > 0 and 0 < vs["top1_agreement"] < 1
  assert alone["mean_kl"] == 0 and alone["reference"] == "unquantized"


@pytest.mark.slow
def test_target_bpw_records_widths(e_style_ckpt, text_file, tmp_path):
  out = tmp_path / "bpw"
  code, stdout = _run(["quantize", "--checkpoint", str(e_style_ckpt), "--recipe", "tq4",
                       "--calibrate", str(text_file), "--calib-tokens", "200",
                       "--calib-context", "64", "--target-bpw", "3.5", "--out", str(out)])
  assert code == 0, stdout
  assert "widths chosen for 3.5 bits/weight" in stdout and "layers.0.attn.q:" in stdout
  recipe = read_recipe(out)
  assert recipe.name == "tq4-bpw3.5" and len(recipe.tensors) > 10
  assert len({spec.bits for _, spec in recipe.tensors}) > 1
  _, params = load(out, jnp.float32)
  assert size_report(params)["quantized_bits_per_weight"] <= 3.5 + 1e-9


@pytest.mark.parametrize("argv, match", [
    (["--calib-context", "2000"], "the calibration text has"),
    (["--calib-tokens", "100", "--calib-context", "200"], "calibration tokens (100) must fill"),
    (["--target-bpw", "1.5"], "below the smallest width"),
    (["--recipe", "nf4", "--target-bpw", "4"], "TurboQuant or int recipe"),
    (["--damp", "1.5"], "damping"),
])
def test_bad_calibration_inputs_are_named(e_style_ckpt, text_file, tmp_path, capsys, argv,
                                          match):
  base = ["quantize", "--checkpoint", str(e_style_ckpt), "--out", str(tmp_path / "x"),
          "--calibrate", str(text_file)]
  if "--recipe" not in argv:
    base += ["--recipe", "tq4"]
  assert cli.main(base + argv) == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_calibration_text_too_short_and_flags_without_text(e_style_ckpt, tmp_path, capsys):
  short = tmp_path / "short.txt"
  short.write_text("Alice.", encoding="utf-8")
  base = ["quantize", "--checkpoint", str(e_style_ckpt), "--recipe", "tq4", "--out",
          str(tmp_path / "x")]
  assert cli.main(base + ["--calibrate", str(short), "--calib-context", "64"]) == 2
  assert "the calibration text has" in capsys.readouterr().err
  assert cli.main(base + ["--method", "awq-scale"]) == 2
  assert "need --calibrate" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # argparse names the valid methods
    cli.main(base + ["--calibrate", str(short), "--method", "optimal"])
  assert "invalid choice: 'optimal'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_reference_errors(e_style_ckpt, text_file, tmp_path, capsys):
  base = ["eval", "--checkpoint", str(e_style_ckpt), "--text", str(text_file)]
  assert cli.main(base + ["--reference", str(tmp_path / "missing")]) == 2
  assert "does not exist" in capsys.readouterr().err
  # same tokenizer, other vocabulary
  cfg = tiny("gemma4-31b")
  other = tmp_path / "other"
  save_converted(other, cfg, init(jax.random.PRNGKey(0), cfg),
                 tokenizer_file=e_style_ckpt / "tokenizer.model")
  assert cli.main(base + ["--reference", str(other)]) == 2
  assert "vocabulary" in capsys.readouterr().err  # names the mismatch, whichever check sees it


@pytest.mark.slow
def test_moe_experts_calibrate_per_expert():
  """MoE layers: each expert is rounded with the H of the tokens routed to it."""
  cfg = tiny("gemma4-26b-a4b", num_layers=2, layer_types=("sliding", "full"))
  params = init(jax.random.PRNGKey(1), cfg, jnp.float32, std=0.3)
  windows = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 16)).astype(np.int32)
  report = calibrate.Report()
  got = calibrate.calibrate(params, cfg, "tq4", windows, calibrate.Calibration(
      tokens=30, context=16), show_progress=False, report=report)
  experts = got.layers[0].moe.gate
  assert isinstance(experts, QArray) and experts.shape == params.layers[0].moe.gate.shape
  assert report.methods["layers.0.moe.gate"] == "gptq" and not report.no_data
  rtn = recipes.quantize(params.layers[0].moe.gate, experts.spec, experts.layout)
  assert not bool(jnp.all(experts.codes == rtn.codes))
  tokens = jnp.asarray(windows[:1])
  logits = M.forward(got, tokens, jnp.arange(16)[None], cfg)[0]
  assert bool(jnp.all(jnp.isfinite(logits)))

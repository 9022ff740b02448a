"""Experiments as code (configs/ablations/*.py) and the ablation runner scripts/ablate.py."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from configs import ablations
from configs.experiment import (
  Distortion,
  EvalPoint,
  Experiment,
  Point,
  grid,
  load_config,
  paper_bounds,
)
from gemma.kv import quant as KV
from gemma.model import config as C
from gemma.model import params as P
from gemma.quant.footprint import footprint
from gemma.quant.qarray import QuantSpec
from gemma.quant.recipes import RECIPES, Recipe
from scripts import ablate
from tests.conftest import fixture_dir, tiny

CONFIGS = Path(ablations.__file__).parent
ABLATION_TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and "
                 "of having nothing to do: once or twice she had peeped into the book her sister "
                 "was reading, but it had no pictures or conversations in it. ") * 4


def test_named_ablations_still_importable():
  assert set(ablations.ABLATIONS) >= {"no_ple", "no_kv_sharing", "all_global"}
  cfg = ablations.ablate(C.get_preset("gemma4-e2b"), "no_ple")
  assert not cfg.use_ple and cfg.name == "gemma4-e2b+no_ple"
  assert {"quantizer", "bits", "rotation", "kv_width", "distortion", "no_ple",
          "no_kv_sharing"} <= set(ablations.EXPERIMENTS)


# what each named ablation must change in the model config (checked on the built config)
ABLATION_EFFECTS = {
    "no_kv_sharing": lambda c: c.num_kv_shared_layers == 0 and not any(
        s.shares_kv for s in c.layers),
    "no_ple": lambda c: not c.use_ple and c.ple_dim == 0,
    "all_global": lambda c: all(s.attention is C.AttentionType.GLOBAL for s in c.layers),
    "no_softcap": lambda c: c.final_softcap is None,
    "scaled_attention": lambda c: c.query_pre_attn_scalar == float(c.head_dim),
}


def test_every_named_ablation_has_its_effect():
  assert set(ABLATION_EFFECTS) == set(ablations.ABLATIONS)
  base = C.get_preset("gemma4-e2b")
  for name, effect in ABLATION_EFFECTS.items():
    assert not effect(base), name  # the preset does not already have it
    cfg = ablations.ablate(base, name)
    assert effect(cfg) and cfg.name == f"gemma4-e2b+{name}", name
    # nothing else changes
    changed = {f.name for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(base, f.name)}
    assert changed <= {"name", "num_kv_shared_layers", "double_wide_mlp", "ple_dim",
                       "ple_vocab_size", "layer_types", "final_softcap",
                       "query_pre_attn_scalar"}, (name, changed)


@pytest.mark.parametrize("name", ablations.EXPERIMENTS)
def test_every_experiment_builds(name):
  exp = load_config(CONFIGS / f"{name}.py")
  assert exp.name == name and exp.points
  small = tiny("gemma4-e2b")
  for point, setting in exp.resolved():
    assert isinstance(point.deltas, dict) and point.label
    if exp.kind == "eval":
      recipe = setting.weight_recipe(point.label)
      assert recipe is None or isinstance(recipe, Recipe)
      if recipe is not None:  # every spec is valid, and its footprint builds from shapes
        assert footprint(small, recipe)["quantized_bits_per_weight"] > 1
      assert setting.kv_quant is None or setting.kv_quant in KV.CHOICES
    elif exp.kind == "distortion":
      assert 1 <= setting.bits <= 8 and setting.rotation in ("haar", "hadamard")
    else:
      from gemma.training import FinetuneConfig, model_config

      assert isinstance(setting, FinetuneConfig)
      assert set(setting.ablations) <= set(ablations.ABLATIONS)
      cfg = model_config(setting)
      assert all(ABLATION_EFFECTS[a](cfg) for a in setting.ablations), point.label
      assert P.count(P.abstract(cfg)) > 0
  if exp.kind == "finetune":  # the ablation changes the model's structure
    models = [model_config(s) for _, s in exp.resolved()]
    assert len({P.count(P.abstract(m)) for m in models}) == len(models)


def test_quantizer_grid_matches_the_named_recipes():
  exp = load_config(CONFIGS / "quantizer.py")
  specs = {p.label: exp.resolve(p).weight_recipe(p.label) for p in exp.points}
  for name in ("tq2", "tq3", "tq4", "int4", "int8", "nf4"):
    assert specs[name] == RECIPES[name], name  # int4 = RTN, absmax per group of 128
  assert dict(specs["int4"].specs)["mlp"] == QuantSpec(method="int", bits=4, block=128,
                                                      rotation="none")
  rotation = load_config(CONFIGS / "rotation.py")
  kinds = {exp_point.weight_recipe().specs[0][1].rotation for _, exp_point in rotation.resolved()}
  assert kinds == {"haar", "hadamard", "none"}
  assert {s.bits for _, s in rotation.resolved()} == {4}


def test_grid_and_experiment_validation():
  pts = grid("{method}{bits}", method=("tq", "int"), bits=(3, 4))
  assert [p.label for p in pts] == ["tq3", "tq4", "int3", "int4"]
  assert pts[3].deltas == {"method": "int", "bits": 4}
  exp = Experiment("x", "eval", EvalPoint(), pts)
  assert exp.resolve(pts[3]) == EvalPoint(method="int", bits=4)
  assert EvalPoint(method=None).weight_recipe() is None
  assert EvalPoint(recipe="tq-mixed").weight_recipe() is RECIPES["tq-mixed"]
  with pytest.raises(ValueError, match="distinct point labels"):
    Experiment("x", "eval", EvalPoint(), pts + pts[:1])
  with pytest.raises(ValueError, match="kind"):
    Experiment("x", "train", EvalPoint(), pts)
  with pytest.raises(ValueError):
    Experiment("x", "eval", EvalPoint(), (Point("bad", {"method": "nope"}),)).resolved()[0][
        1].weight_recipe()
  lower, upper = paper_bounds(2)
  assert lower == 1 / 16 and upper == pytest.approx(2.72 / 16, rel=1e-3)


def _rows(out: Path) -> list[dict]:
  return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _assert_outputs(out: Path, pngs, labels):
  rows = _rows(out)
  assert [r["label"] for r in rows] == list(labels)
  md = (out / "results.md").read_text()
  assert md.startswith("# Ablation") and all(f"| {label} |" in md for label in labels)
  for png in pngs:
    data = (out / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
  return rows


@pytest.mark.slow
def test_ablate_eval_grid_end_to_end(e_style_ckpt, tmp_path, capsys):
  text = tmp_path / "text.txt"
  text.write_text(ABLATION_TEXT)
  out = tmp_path / "quantizer"
  labels = ("tq3", "tq4", "int4", "nf4")
  assert ablate.main(["--config", str(CONFIGS / "quantizer.py"), "--out", str(out),
                      "--checkpoint", str(e_style_ckpt), "--text", str(text),
                      "--max-tokens", "40", "--context", "16", "--only", *labels]) == 0
  rows = _assert_outputs(out, ("perplexity_vs_bits_per_weight.png",
                               "mean_kl_vs_bits_per_weight.png",
                               "top1_agreement_vs_bits_per_weight.png"), labels)
  for r in rows:
    assert r["bits_per_weight"] > 3 and r["tokens"] == 40 and r["windows"] == 3
    assert r["perplexity"] > 1 and r["mean_kl"] >= 0 and 0 <= r["top1_agreement"] <= 1
    assert r["delta_pct"] == pytest.approx(100 * (r["perplexity"] / r["reference_perplexity"] - 1))
    assert r["experiment"] == "quantizer" and r["setting"]["method"] == r["deltas"]["method"]
    assert r["seconds"] > 0 and r["kv_quant"] is None
  assert rows[0]["bits_per_weight"] < rows[1]["bits_per_weight"]
  assert "| tq4 |" in capsys.readouterr().out
  # appended to, unless --fresh
  assert ablate.main(["--config", str(CONFIGS / "quantizer.py"), "--out", str(out),
                      "--checkpoint", str(e_style_ckpt), "--text", str(text),
                      "--max-tokens", "20", "--context", "16", "--only", "tq3"]) == 0
  assert len(_rows(out)) == 5
  assert "| tq4 |" not in (out / "results.md").read_text()


def test_ablate_kv_grid_end_to_end(tmp_path):
  from tests.test_chat import GEMMA4_SPECIALS, _sentencepiece

  ckpt = tmp_path / "dense_keqv"  # head dims 32 and 64: every integer KV width packs
  shutil.copytree(fixture_dir("dense_keqv"), ckpt)
  (ckpt / "tokenizer.model").write_bytes(_sentencepiece(GEMMA4_SPECIALS))
  text = tmp_path / "text.txt"
  text.write_text(ABLATION_TEXT)
  out = tmp_path / "kv"
  assert ablate.main(["--config", str(CONFIGS / "kv_width.py"), "--out", str(out),
                      "--checkpoint", str(ckpt), "--text", str(text),
                      "--max-tokens", "30", "--context", "16", "--only", "bf16", "tq3"]) == 0
  bf16, tq3 = _assert_outputs(out, ("perplexity_vs_kv_bits_per_channel.png",), ("bf16", "tq3"))
  assert bf16["mean_kl"] == 0 and bf16["top1_agreement"] == 1 and bf16["kv_bits_per_channel"] == 16
  assert 3 < tq3["kv_bits_per_channel"] < 16 and tq3["mean_kl"] > 0


def test_ablate_distortion_end_to_end(tmp_path):
  out = tmp_path / "distortion"
  labels = ("haar-b1", "haar-b2", "hadamard-b2")
  assert ablate.main(["--config", str(CONFIGS / "distortion.py"), "--out", str(out),
                      "--set", "draws=2", "vectors=64", "--only", *labels]) == 0
  rows = _assert_outputs(out, ("d_mse_vs_bits.png",), labels)
  for r in rows:
    assert r["lower_bound"] < r["d_mse"] < r["upper_bound"]
    assert r["setting"]["vectors"] == 64
  assert rows[0]["d_mse"] == pytest.approx(0.3609, rel=0.05)


def test_ablate_rejects_bad_overrides(tmp_path, capsys):
  for extra in (["--only", "tq9"], ["--set", "nope=1"], ["--set", "bits"]):
    with pytest.raises(SystemExit):
      ablate.main(["--config", str(CONFIGS / "quantizer.py"), "--out", str(tmp_path), *extra])
  assert "unknown points" in capsys.readouterr().err


def test_distortion_base_is_the_montecarlo_setting():
  exp = load_config(CONFIGS / "distortion.py")
  assert isinstance(exp.base, Distortion) and exp.base.d == 128
  assert {s.rotation for _, s in exp.resolved()} == {"haar", "hadamard"}


@pytest.mark.slow
def test_ablate_finetune_grid_end_to_end(tmp_path):
  # one point (the ablated one) of the no_ple grid, 2 steps: the runner's finetune path
  out = tmp_path / "no_ple"
  assert ablate.main(["--config", str(CONFIGS / "no_ple.py"), "--out", str(out), "--set",
                      "steps=2", "warmup_steps=1", "batch_size=2", "--only", "no_ple"]) == 0
  (no_ple,) = _assert_outputs(out, ("loss_last.png",), ("no_ple",))
  assert no_ple["ablations"] == ["no_ple"]
  assert no_ple["steps"] == 2 and no_ple["loss_first"] > 0 and no_ple["loss_last"] > 0
  from configs.finetune_tiny import get_config
  from gemma.training import model_config

  full = P.count(P.abstract(model_config(get_config())))
  assert no_ple["trainable_params"] < full  # the PLE tables and projections are gone

"""Export to Hugging Face (`gemma.io.formats.hf_export`, `hf_config.to_hf_config`): the export
reloads through our HF loader to bit-identical params, every family of the parity fixtures;
transformers' side is checked by scripts/check_export_reference.py (docs/BENCHMARKS.md)."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma
from gemma.io import atomic
from gemma.io.checkpoint import load_hf
from gemma.io.formats import hf, hf_export
from gemma.io.formats.hf_config import from_hf_config, to_hf_config
from gemma.io.formats.hf_export import export_hf
from gemma.io.formats.inverse import named_arrays
from gemma.model.config import PRESETS, AttentionType, RopeConfig
from tests.conftest import FAMILIES, fixture_dir


def _hf_json(name):
  with open(f"{fixture_dir(name)}/config.json") as f:
    return json.load(f)


def _assert_same_params(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------ config.json
@pytest.mark.parametrize("name", FAMILIES)
def test_config_round_trip_fixtures(name):
  cfg = from_hf_config(_hf_json(name), name=name)
  assert from_hf_config(to_hf_config(cfg), name=name) == cfg


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trip_presets(preset):
  cfg = PRESETS[preset]
  out = to_hf_config(cfg)
  assert out["model_type"] == "gemma4_text" and out["architectures"] == ["Gemma4ForCausalLM"]
  assert from_hf_config(out, name=preset) == cfg


@pytest.mark.parametrize("name", FAMILIES)
def test_config_is_what_save_pretrained_writes(name):
  """The fixture configs were written by transformers' save_pretrained: same keys and values
  but for bookkeeping (dtype is added by the export) and an unused PLE vocabulary size."""
  ref = _hf_json(name)
  out = to_hf_config(from_hf_config(ref, name=name))
  ignore = {"dtype", "transformers_version", "_sliding_window_pattern"}
  if not ref.get("hidden_size_per_layer_input") and "vocab_size_per_layer_input" in ref:
    ignore.add("vocab_size_per_layer_input")
  assert {k: v for k, v in out.items() if k not in ignore} == {
      k: v for k, v in ref.items() if k not in ignore}


def test_config_not_expressible_names_the_field():
  g4 = PRESETS["gemma4-31b"]
  cases = [
      (dataclasses.replace(g4, query_pre_attn_scalar=256.0), "query_pre_attn_scalar"),
      (dataclasses.replace(g4, attn_softcap=50.0), "attn_softcap"),
      (dataclasses.replace(g4, layer_types=(*g4.layer_types[:-1], AttentionType.LOCAL)),
       "layer_types"),
      (dataclasses.replace(g4, rope_local=RopeConfig(kind="default", factor=2.0)), "rope_local"),
      (dataclasses.replace(g4, use_v_norm=False), "use_v_norm"),
  ]
  g3 = from_hf_config(_hf_json("gemma3"))
  cases += [(dataclasses.replace(g3, ple_dim=8, ple_vocab_size=512), "ple_dim"),
            (dataclasses.replace(g3, query_pre_attn_scalar=24.5), "query_pre_attn_scalar"),
            (dataclasses.replace(g3, global_head_dim=32), "global_head_dim")]
  for cfg, field in cases:
    with pytest.raises(ValueError, match=field):
      to_hf_config(cfg)


# ---------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", FAMILIES)
def test_export_reloads_bit_identical(name, tmp_path):
  cfg, params = load_hf(fixture_dir(name), jnp.float32)
  out, notes = export_hf(params, cfg, tmp_path / "out", dtype="float32")
  assert sorted(p.name for p in out.iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors"]
  assert any("tokenizer" in n for n in notes)  # none given
  cfg2, params2 = load_hf(out, jnp.float32)
  assert cfg2 == dataclasses.replace(cfg, name=out.name)
  _assert_same_params(params, params2)
  # the same tensors (names, dtypes, shapes) as the save_pretrained file
  _, ours = hf.read_header(out / "model.safetensors")
  _, ref = hf.read_header(hf.safetensors_files(Path(fixture_dir(name)))[0])
  assert {k: (v["dtype"], v["shape"]) for k, v in ours.items()} == {
      k: (v["dtype"], v["shape"]) for k, v in ref.items()}
  gen = json.loads((out / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 1, 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_of_a_fused_model(name, tmp_path):
  model = gemma.load(fixture_dir(name), dtype="float32")  # attn.qkv / mlp.gate_up
  out, _ = export_hf(model.params, model.cfg, tmp_path / "out", dtype="float32")
  _, params = load_hf(fixture_dir(name), jnp.float32)
  _assert_same_params(params, load_hf(out, jnp.float32)[1])


@pytest.mark.parametrize("name", ["e_style", "moe"])
def test_bf16_export_reloads_as_the_bf16_load(name, tmp_path):
  cfg, params = load_hf(fixture_dir(name), jnp.float32)
  out, notes = export_hf(params, cfg, tmp_path / "out")  # default bfloat16
  assert any("float32 -> bfloat16" in n for n in notes)
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  _, ours = hf.read_header(out / "model.safetensors")
  assert {v["dtype"] for v in ours.values()} == {"BF16"}
  _assert_same_params(load_hf(fixture_dir(name), jnp.bfloat16)[1],
                      load_hf(out, jnp.bfloat16)[1])


def test_sharded_export(tmp_path):
  cfg, params = load_hf(fixture_dir("e_style"), jnp.float32)
  limit = 40_000
  out, _ = export_hf(params, cfg, tmp_path / "out", dtype="float32", max_shard_bytes=limit)
  index = json.loads((out / hf_export.INDEX).read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and not (out / "model.safetensors").exists()
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  total = 0
  for f in shards:
    _, header = hf.read_header(out / f)
    sizes = [v["data_offsets"][1] - v["data_offsets"][0] for v in header.values()]
    assert sum(sizes) <= limit or len(sizes) == 1
    assert all(index["weight_map"][k] == f for k in header)
    total += sum(sizes)
  assert index["metadata"]["total_size"] == total
  _assert_same_params(params, load_hf(out, jnp.float32)[1])


def test_quantized_export_is_dequantized(tmp_path):
  model = gemma.load(fixture_dir("dense_keqv"), dtype="float32", quant="tq4")
  out, notes = export_hf(model.params, model.cfg, tmp_path / "out", dtype="float32")
  assert any("dequantized" in n for n in notes)
  want, _ = named_arrays(model.params, model.cfg, np.float32)
  cfg2, params2 = load_hf(out, jnp.float32)
  got, _ = named_arrays(params2, cfg2, np.float32)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)


# ---------------------------------------------------------------------- tokenizer, outputs
def test_tokenizer_files_are_copied(e_style_ckpt, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(e_style_ckpt, src)
  (src / "tokenizer_config.json").write_text("{}")
  cfg, params = load_hf(src, jnp.float32)
  out, notes = export_hf(params, cfg, tmp_path / "out", tokenizer_source=src)
  assert not any("tokenizer" in n for n in notes)
  for f in ("tokenizer.model", "tokenizer_config.json"):
    assert (out / f).read_bytes() == (src / f).read_bytes()
  assert gemma.load(out, dtype="float32").tokenizer is not None


def test_existing_output_is_refused_and_failures_leave_nothing(tmp_path, monkeypatch):
  cfg, params = load_hf(fixture_dir("gemma3"), jnp.float32)
  out, _ = export_hf(params, cfg, tmp_path / "out", dtype="float32")
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  with pytest.raises(atomic.OutputExists, match="--force"):
    export_hf(params, cfg, out)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  other = tmp_path / "notes"
  other.mkdir()
  (other / "a.txt").write_text("mine")
  with pytest.raises(atomic.OutputError, match="not a Hugging Face checkpoint"):
    export_hf(params, cfg, other, force=True)
  assert (other / "a.txt").read_text() == "mine"

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(hf_export, "write_safetensors", broken)
  with pytest.raises(OSError, match="disk full"):
    export_hf(params, cfg, tmp_path / "new")
  with pytest.raises(OSError, match="disk full"):
    export_hf(params, cfg, out, force=True)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old export intact
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "out"]  # no partial output
  monkeypatch.undo()
  export_hf(params, cfg, out, force=True)  # bfloat16 now
  assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_bad_requests_write_nothing(tmp_path):
  cfg, params = load_hf(fixture_dir("gemma3"), jnp.float32)
  with pytest.raises(ValueError, match="dtype"):
    export_hf(params, cfg, tmp_path / "a", dtype="int8")
  with pytest.raises(ValueError, match="query_pre_attn_scalar"):
    export_hf(params, dataclasses.replace(cfg, query_pre_attn_scalar=2.5), tmp_path / "a")
  assert not list(tmp_path.iterdir())


def test_multimodal_source_is_noted(tmp_path):
  cfg, params = load_hf(fixture_dir("gemma3"), jnp.float32)
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"model_type": "gemma3", "vision_config": {"a": 1},
                                               "text_config": _hf_json("gemma3")}))
  _, notes = export_hf(params, cfg, tmp_path / "out", tokenizer_source=src)
  assert any("vision tower" in n for n in notes)

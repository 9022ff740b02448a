"""Our converted format: bit-exact round trips, exact config round trips, clear errors."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.io.checkpoint import convert, load_hf
from gemma.io.formats import converted as CV
from gemma.io.formats.common import CheckpointError
from gemma.model import config as C
from tests.conftest import FAMILIES, fixture_dir, tiny


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_round_trip_is_bit_exact(tmp_path, family):
  cfg, params = load_hf(fixture_dir(family), jnp.float32)
  out = CV.save_converted(tmp_path / "conv", cfg, params)
  assert CV.is_converted(out)
  got_cfg, got = CV.load(out, jnp.float32)
  assert got_cfg == cfg
  assert _equal(got, params)
  _, bf16 = CV.load(out, jnp.bfloat16)  # cast while reading == jnp's cast
  assert _equal(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
  cfg, params = load_hf(fixture_dir("moe"), jnp.bfloat16)
  out = CV.save_converted(tmp_path / "conv", cfg, params)
  _, got = CV.load(out, jnp.bfloat16)
  assert _equal(got, params)


def _config_cases():
  cases = {name: C.get_preset(name) for name in C.PRESETS}
  cases.update({f"tiny-{p}": tiny(p) for p in ("gemma4-e2b", "gemma4-26b-a4b", "gemma4-31b")})
  cases["odd"] = dataclasses.replace(
      tiny("gemma4-31b"), final_softcap=None, attn_softcap=50.0, query_pre_attn_scalar=256.0,
      norm_plus_one=True, use_v_norm=False, use_layer_scalar=False, eos_ids=(1, 106, 7),
      rope_local=C.RopeConfig(theta=12345.5, kind="linear", factor=8.0),
      rope_global=C.RopeConfig(theta=1e6, kind="proportional", partial_rotary_factor=0.125))
  return cases


@pytest.mark.parametrize("name", list(_config_cases()))
def test_config_round_trip_is_exact(name):
  cfg = _config_cases()[name]
  text = json.dumps(CV.config_to_dict(cfg))
  back = CV.config_from_dict(json.loads(text))
  assert back == cfg
  assert [(f.name, type(getattr(back, f.name))) for f in dataclasses.fields(back)] == [
      (f.name, type(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)]
  assert back.layers == cfg.layers


def test_fixture_configs_round_trip():
  for family in FAMILIES:
    cfg = load_hf(fixture_dir(family), jnp.float32)[0]
    assert CV.config_from_dict(json.loads(json.dumps(CV.config_to_dict(cfg)))) == cfg


def test_config_errors_are_clear():
  good = CV.config_to_dict(tiny("gemma4-31b"))
  with pytest.raises(CheckpointError, match="version 99 is not supported"):
    CV.config_from_dict({**good, "version": 99})
  with pytest.raises(CheckpointError, match="not a gemma4-jax-converted config"):
    CV.config_from_dict({"config": good["config"]})
  with pytest.raises(CheckpointError, match=r"unknown fields \['wings'\]"):
    CV.config_from_dict({**good, "config": {**good["config"], "wings": 2}})
  bad_types = dict(good["config"], layer_types=["sliding_attention", "sideways"] * 3)
  with pytest.raises(CheckpointError, match="sideways"):
    CV.config_from_dict({**good, "config": bad_types})
  with pytest.raises(CheckpointError, match=r"config\.num_layers: expected int"):
    CV.config_from_dict({**good, "config": {**good["config"], "num_layers": "6"}})


def test_missing_field_takes_its_default():
  data = CV.config_to_dict(tiny("gemma4-31b"))
  del data["config"]["max_position_embeddings"]
  assert CV.config_from_dict(data).max_position_embeddings == 131_072


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg, params = load_hf(fixture_dir("e_style"), jnp.float32)
  return cfg, params, CV.save_converted(tmp_path_factory.mktemp("conv") / "c", cfg, params)


@pytest.mark.parametrize("change, kind", [
    (dict(ffn_dim=96), "mis-shaped: layers.0.mlp.gate: (64, 64) != (64, 96)"),
    (dict(use_layer_scalar=False), "unexpected: layers.0.scalar"),
    (dict(num_kv_shared_layers=2), "missing: layers.6.attn.k"),
])
def test_wrong_config_lists_leaves(saved, change, kind):
  cfg, _, path = saved
  with pytest.raises(CheckpointError, match="does not match config") as e:
    CV.load(path, jnp.float32, cfg=dataclasses.replace(cfg, **change))
  assert kind in str(e.value)


def _copy(saved, tmp_path):
  return shutil.copytree(saved[2], tmp_path / "copy")


def test_missing_and_corrupt_files(saved, tmp_path):
  path = _copy(saved, tmp_path)
  (path / CV.CONFIG_FILE).write_text("{")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    CV.load(path, jnp.float32)
  (path / CV.CONFIG_FILE).unlink()
  assert not CV.is_converted(path)
  with pytest.raises(CheckpointError, match="no gemma_config.json"):
    CV.load(path, jnp.float32)


def test_missing_params_dir(saved, tmp_path):
  path = _copy(saved, tmp_path)
  shutil.rmtree(path / CV.PARAMS_DIR)
  with pytest.raises(CheckpointError, match="cannot read Orbax metadata"):
    CV.load(path, jnp.float32)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop
def test_truncated_data_files(saved, tmp_path):
  path = _copy(saved, tmp_path)
  data = [f for f in (path / CV.PARAMS_DIR).glob("ocdbt.process_*/d/*") if f.is_file()]
  assert data
  for f in data:
    f.write_bytes(f.read_bytes()[:16])
  with pytest.raises(CheckpointError, match="cannot restore params"):
    CV.load(path, jnp.float32)


def test_save_refuses_to_overwrite_and_checks_shapes(saved, tmp_path):
  cfg, params, path = saved
  with pytest.raises(FileExistsError):
    CV.save_converted(path, cfg, params)
  with pytest.raises(ValueError, match="do not match config"):
    CV.save_converted(tmp_path / "x", dataclasses.replace(cfg, ffn_dim=96), params)


def test_convert_copies_tokenizer_and_generation_config(tmp_path, capsys):
  src = shutil.copytree(fixture_dir("e_style"), tmp_path / "src")
  (src / "tokenizer.model").write_bytes(b"not really a tokenizer")
  (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
  out = convert(src, tmp_path / "out", jnp.bfloat16)
  assert "wrote" in capsys.readouterr().err
  assert (out / "tokenizer.model").read_bytes() == b"not really a tokenizer"
  assert (out / "generation_config.json").exists()
  cfg, params = CV.load(out, jnp.bfloat16)
  assert 106 in cfg.eos_ids
  _, want = load_hf(src, jnp.bfloat16)
  assert _equal(params, want)

"""Official Gemma 4 Orbax checkpoints: both layouts, prefixes, dead K/V, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.io.checkpoint import load_hf
from gemma.io.formats import orbax_official as O
from gemma.io.formats.common import CheckpointError
from gemma.model import config as C
from gemma.model import params as P
from tests.conftest import FAMILIES, fixture_dir, tiny
from tests.orbax_synth import write_official


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _random(cfg, seed=0):
  """Random params with every leaf (norms and scalars too) distinct (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)),
                      P.abstract(cfg))


VARIANTS = {
    "nested": {},
    "policy_params": dict(policy_prefix=True, params_level=True),
    "flat": dict(flat=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_unstacked_round_trip(tmp_path, family, variant):
  cfg, params = load_hf(fixture_dir(family), jnp.float32)
  path = write_official(tmp_path / "ckpt", cfg, params, **VARIANTS[variant])
  assert O.is_official_orbax(path)
  got_cfg, got = O.load(path, jnp.float32, cfg=cfg)
  assert got_cfg is cfg
  assert _equal(got, params)


@pytest.mark.parametrize("variant", ["nested", "flat", "policy_params"])
def test_stacked_round_trip_moe_fixture(tmp_path, variant):
  cfg, params = load_hf(fixture_dir("moe"), jnp.float32)
  assert cfg.num_layers % 6 == 0
  path = write_official(tmp_path / "ckpt", cfg, params, stacked=True, **VARIANTS[variant])
  _, got = O.load(path, jnp.float32, cfg=cfg)
  assert _equal(got, params)


STACKED_CONFIGS = {
    # KV sharing starts at layer 8: stacks of attention types 2..5 mix own and dead K/V.
    "e4b_like": dict(preset="gemma4-e4b", num_layers=12, layer_types=C.pattern(12, 6),
                     num_kv_shared_layers=4),
    "31b_like": dict(preset="gemma4-31b", num_layers=12, layer_types=C.pattern(12, 6)),
    "moe_like": dict(preset="gemma4-26b-a4b", num_layers=12, layer_types=C.pattern(12, 6)),
    "mha_qkv": dict(preset="gemma4-31b", num_kv_heads=4, k_eq_v=False),  # qkv_einsum leaves
}


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("name", STACKED_CONFIGS)
def test_random_models_both_layouts(tmp_path, name, stacked):
  kw = dict(STACKED_CONFIGS[name])
  cfg = tiny(kw.pop("preset"), **kw)
  params = _random(cfg)
  path = write_official(tmp_path / "ckpt", cfg, params, stacked=stacked)
  _, got = O.load(path, jnp.float32, cfg=cfg)
  assert _equal(got, params)


def test_dead_kv_and_multimodal_leaves_are_skipped(tmp_path, capsys):
  cfg, params = load_hf(fixture_dir("e_style"), jnp.float32)

  def add_value_network(tree):
    tree["rlx_networks"]["value_network"] = {"head": {"w": np.ones(3, np.float32)}}
    return tree

  path = write_official(tmp_path / "ckpt", cfg, params, policy_prefix=True,
                        edit=add_value_network)
  O.load(path, jnp.float32, cfg=cfg)
  err = capsys.readouterr().err
  assert "skipped 1 networks other than rlx_networks/policy_network" in err
  shared = sum(s.shares_kv for s in cfg.layers)
  assert f"skipped {2 * shared} unused K/V of KV-shared layers" in err  # kv_einsum + key_norm
  assert "skipped 1 vision/audio encoder tensors" in err
  assert "skipped 1 vision/audio projections" in err


def test_bfloat16_checkpoint_casts_like_jnp(tmp_path):
  cfg, params = load_hf(fixture_dir("dense_keqv"), jnp.float32)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  path = write_official(tmp_path / "ckpt", cfg, bf16)
  _, got = O.load(path, jnp.float32, cfg=cfg)
  assert _equal(got, jax.tree.map(lambda x: x.astype(jnp.float32), bf16))
  _, same = O.load(path, jnp.bfloat16, cfg=cfg)
  assert _equal(same, bf16)
  path32 = write_official(tmp_path / "ckpt32", cfg, params)  # cast while reading == jnp's cast
  _, cast = O.load(path32, jnp.bfloat16, cfg=cfg)
  assert _equal(cast, bf16)


def _edit_layer(edit):
  def fn(tree):
    edit(tree["transformer"]["layer_1"])
    return tree
  return fn


def test_missing_leaf_is_named(tmp_path):
  cfg, params = load_hf(fixture_dir("dense_keqv"), jnp.float32)
  path = write_official(tmp_path / "ckpt", cfg, params,
                        edit=_edit_layer(lambda ly: ly["attn"].pop("q_einsum")))
  with pytest.raises(CheckpointError, match=r"missing: layers\.1\.attn\.q\b"):
    O.load(path, jnp.float32, cfg=cfg)


def test_wrong_shape_and_unknown_leaf_are_named(tmp_path):
  cfg, params = load_hf(fixture_dir("dense_keqv"), jnp.float32)

  def edit(ly):
    ly["attn"]["q_einsum"]["w"] = np.swapaxes(ly["attn"]["q_einsum"]["w"], 0, 1)  # [D, N, H]
    ly["mystery"] = {"w": np.zeros(3, np.float32)}

  path = write_official(tmp_path / "ckpt", cfg, params, edit=_edit_layer(edit))
  with pytest.raises(CheckpointError) as e:
    O.load(path, jnp.float32, cfg=cfg)
  msg = str(e.value)
  assert "mis-shaped: transformer/layer_1/attn/q_einsum/w" in msg
  assert "unexpected: transformer/layer_1/mystery/w" in msg


def test_wrong_config_is_a_clear_error(tmp_path):
  cfg, params = load_hf(fixture_dir("dense_keqv"), jnp.float32)
  path = write_official(tmp_path / "ckpt", cfg, params)
  with pytest.raises(CheckpointError, match="no preset has vocab 512, width 64 and 7 layers"):
    O.load(path, jnp.float32)
  with pytest.raises(ValueError, match="unknown preset"):
    O.load(path, jnp.float32, preset="gemma4-tiny")
  other = load_hf(fixture_dir("moe"), jnp.float32)[0]
  with pytest.raises(CheckpointError, match="does not match config"):
    O.load(path, jnp.float32, cfg=other)


def test_infer_preset_from_shapes():
  shapes = {"transformer/embedder/input_embedding": (262_144, 1536)}
  shapes.update({f"transformer/layer_{i}/skip_scale": (1,) for i in range(35)})
  assert O.infer_preset(shapes).name == "gemma4-e2b"
  stacked = {"transformer/embedder/input_embedding": (262_144, 5376),
             "transformer/stacked_layers/attention_type_0/skip_scale": (10, 1)}
  assert O.infer_preset(stacked).name == "gemma4-31b"


def test_is_official_orbax_rejects_other_paths(tmp_path):
  assert not O.is_official_orbax(fixture_dir("e_style"))
  assert not O.is_official_orbax(tmp_path / "absent")
  assert not O.is_official_orbax(tmp_path)
  import orbax.checkpoint as ocp

  ocp.PyTreeCheckpointer().save(tmp_path / "other", {"encoder": {"w": np.ones(2)}})
  assert not O.is_official_orbax(tmp_path / "other")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop
def test_corrupt_data_is_a_checkpoint_error(tmp_path):
  cfg, params = load_hf(fixture_dir("dense_keqv"), jnp.float32)
  path = write_official(tmp_path / "ckpt", cfg, params)
  data = [f for f in path.glob("ocdbt.process_*/d/*") if f.is_file()]
  assert data
  for f in data:
    f.write_bytes(f.read_bytes()[:10])
  with pytest.raises(CheckpointError, match="cannot restore"):
    O.load(path, jnp.float32, cfg=cfg)


def test_missing_metadata_is_a_checkpoint_error(tmp_path):
  cfg, params = load_hf(fixture_dir("dense_keqv"), jnp.float32)
  path = write_official(tmp_path / "ckpt", cfg, params)
  (path / "_METADATA").write_text("{not json")
  with pytest.raises(CheckpointError, match="metadata"):
    O.load(path, jnp.float32, cfg=cfg)

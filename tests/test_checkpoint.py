"""HF safetensors loading: prefixes, ignored tensors, and clear errors for bad checkpoints."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemma.cli.app import main
from gemma.io.checkpoint import CheckpointError, load, load_hf
from gemma.io.formats.common import Skip
from gemma.io.formats.hf import map_name
from gemma.model import params as P
from tests.conftest import fixture_dir

SRC = fixture_dir("e_style")


def _rewrite(tmp_path, edit):
  """Copies the e_style fixture with its tensors passed through edit(dict) -> dict."""
  out = tmp_path / "ckpt"
  out.mkdir()
  shutil.copy(f"{SRC}/config.json", out / "config.json")
  save_file(edit(load_file(f"{SRC}/model.safetensors")), str(out / "model.safetensors"))
  return out


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_every_leaf_filled_with_expected_shape():
  cfg, params = load_hf(SRC, jnp.float32)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), P.abstract(cfg, jnp.float32))
  assert got == want


def test_default_dtype_is_bfloat16():
  _, params = load_hf(SRC)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_conditional_generation_prefix_and_skipped_towers(tmp_path, capsys):
  def edit(t):
    out = {k.replace("model.", "model.language_model.", 1): v for k, v in t.items()}
    out["model.vision_tower.encoder.layers.0.weight"] = np.ones((4, 4), np.float32)
    out["model.embed_audio.embedding_projection.weight"] = np.ones((4, 4), np.float32)
    out["lm_head.weight"] = t["model.embed_tokens.weight"]
    return out

  path = _rewrite(tmp_path, edit)
  hf = json.load(open(path / "config.json"))
  (path / "config.json").write_text(json.dumps({"text_config": hf, "model_type": "gemma4"}))
  _, expected = load_hf(SRC, jnp.float32)
  _, params = load_hf(path, jnp.float32)
  assert _leaves_equal(params, expected)
  assert "skipped 2 vision/audio tensors" in capsys.readouterr().err


def test_dead_kv_of_shared_layers_is_ignored(tmp_path):
  cfg, expected = load_hf(SRC, jnp.float32)
  shared = [s for s in cfg.layers if s.shares_kv][0]
  src = cfg.layers[shared.kv_source].index

  def edit(t):
    for part in ("k_proj", "v_proj", "k_norm"):
      t[f"model.layers.{shared.index}.self_attn.{part}.weight"] = (
          t[f"model.layers.{src}.self_attn.{part}.weight"])
    return t

  _, params = load_hf(_rewrite(tmp_path, edit), jnp.float32)
  assert _leaves_equal(params, expected)


def test_missing_unexpected_and_misshaped_are_listed(tmp_path):
  def edit(t):
    del t["model.layers.2.mlp.up_proj.weight"]
    t["model.layers.4.self_attn.o_proj.weight"] = t["model.layers.4.self_attn.o_proj.weight"].T
    t["model.layers.1.self_attn.rotary.inv_freq"] = np.ones(3, np.float32)
    return t

  with pytest.raises(CheckpointError) as err:
    load_hf(_rewrite(tmp_path, edit), jnp.float32)
  msg = str(err.value)
  assert "missing: layers.2.mlp.up, layers.4.attn.o" in msg
  assert "unexpected: model.layers.1.self_attn.rotary.inv_freq" in msg
  assert "mis-shaped: model.layers.4.self_attn.o_proj.weight" in msg


def test_truncated_file_is_a_clear_error(tmp_path):
  path = _rewrite(tmp_path, lambda t: t)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_hf(path, jnp.float32)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="not a directory"):
    load_hf(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf(tmp_path)
  with pytest.raises(CheckpointError, match="does not exist"):
    load(tmp_path / "nope")


def test_map_name_table():
  assert map_name("model.layers.7.self_attn.q_proj.weight").targets == ("layers.7.attn.q",)
  assert map_name("model.language_model.layers.3.experts.gate_up_proj").targets == (
      "layers.3.moe.gate", "layers.3.moe.up")
  assert map_name("model.layers.3.post_feedforward_layernorm_1.weight").targets == (
      "layers.3.moe.dense_post_norm",)
  assert map_name("model.layers.3.self_attn.v_norm.weight") is None
  assert isinstance(map_name("model.vision_tower.x.weight"), Skip)


def test_cli_reports_bad_input(tmp_path, capsys):
  assert main(["logits", "--checkpoint", str(tmp_path / "x"), "--prompt-ids", "2,3",
               "--out", str(tmp_path / "o.npy")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert main(["logits", "--checkpoint", SRC, "--prompt-ids", "2,99999",
               "--out", str(tmp_path / "o.npy")]) == 2
  assert "out of range" in capsys.readouterr().err
  assert main(["generate", "--checkpoint", SRC, "--prompt", "hello",
               "--max-new-tokens", "3"]) == 2
  assert "tokenizer.model" in capsys.readouterr().err
  assert main(["generate", "--checkpoint", SRC, "--prompt-ids", "2,3", "--max-new-tokens", "2",
               "--top-p", "0"]) == 2
  assert "top_p" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["generate", "--checkpoint", SRC, "--prompt-ids", "2,x", "--max-new-tokens", "2"])

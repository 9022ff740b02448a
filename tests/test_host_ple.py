"""--ple-on-host: the per-layer-embedding table in host memory, rows gathered per step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.inference.decode import generate
from gemma.io.checkpoint import load
from gemma.model.transformer import forward
from gemma.parallel import host_ple
from gemma.quant.recipes import quantize_params
from tests.conftest import fixture_dir

_forward = jax.jit(forward, static_argnames="cfg")


@pytest.fixture(scope="module")
def e_style():
  path = fixture_dir("e_style")
  cfg, params = load(path, jnp.float32)
  ids = np.load(f"{path}/reference.npz")["prompt_ids"]
  return cfg, params, ids


@pytest.mark.parametrize("quant", [None, "tq4"])
def test_logits_equal_the_on_device_table(e_style, quant):
  cfg, params, ids = e_style
  if quant:  # the table is a QArray: the host dequantizes only the gathered rows
    params = quantize_params(params, quant)
  tokens = jnp.asarray(ids[None], jnp.int32)
  positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
  ref = np.asarray(_forward(params, tokens, positions, cfg)[0])
  light, table = host_ple.offload(params, cfg.ple_vocab_size)
  assert light.ple_embed is None
  assert table.nbytes == sum(x.nbytes for x in jax.tree.leaves(params.ple_embed))
  assert {d.platform for x in jax.tree.leaves(table.table) for d in x.devices()} == {"cpu"}
  got = np.asarray(_forward(table.attach(light, tokens), tokens, positions, cfg)[0])
  np.testing.assert_array_equal(got, ref)


def test_out_of_range_ids_read_row_zero_like_the_model(e_style):
  cfg, params, _ = e_style
  _, table = host_ple.offload(params, cfg.ple_vocab_size)
  rows = np.asarray(table.gather(np.asarray([[-1, cfg.ple_vocab_size + 3, 0]])))
  np.testing.assert_array_equal(rows[0, 0], np.asarray(params.ple_embed[0]))
  np.testing.assert_array_equal(rows[0, 1], rows[0, 2])


@pytest.mark.slow
def test_generate_with_the_table_on_host_gives_the_same_tokens(e_style):
  cfg, params, ids = e_style
  prompts = [list(ids), list(ids[:5])]  # left padding included
  ref = generate(params, cfg, prompts, 6, eos_ids=())
  got = generate(params, cfg, prompts, 6, eos_ids=(), ple_on_host=True)
  assert got.tokens == ref.tokens


def test_errors_name_the_problem(e_style):
  cfg, params, _ = e_style
  with pytest.raises(ValueError, match="no per-layer embedding"):
    host_ple.offload(params.__class__(**{**params.__dict__, "ple_embed": None}), 1)
  rows = host_ple.PLERows(jnp.zeros((1, 3, cfg.num_layers, cfg.ple_dim)))
  with pytest.raises(ValueError, match="gathered for tokens"):
    rows[jnp.zeros((1, 4), jnp.int32)]


def test_cli_logits_and_plan(tmp_path, capsys):
  from gemma.cli.app import main

  args = ["logits", "--checkpoint", fixture_dir("e_style"), "--prompt-ids", "2,17,5,9,33"]
  assert main([*args, "--out", str(tmp_path / "a.npy")]) == 0
  assert main([*args, "--out", str(tmp_path / "b.npy"), "--ple-on-host"]) == 0
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
  assert main([*args, "--out", str(tmp_path / "c.npy"), "--ple-on-host", "--mesh", "1x1"]) == 0
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))
  capsys.readouterr()
  plan = ["plan", "--preset", "gemma4-e4b", "--mesh", "1x1", "--context", "8192", "--json"]
  assert main(plan) == 0
  on_device = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert main([*plan, "--ple-on-host"]) == 0
  out = capsys.readouterr().out
  on_host = json.loads(out.strip().splitlines()[-1])
  assert "PLE table in host memory" in out
  moved = on_device["weight_bytes_per_device"] - on_host["weight_bytes_per_device"]
  assert moved == on_host["host_bytes"] > 0.35 * on_device["weight_bytes_per_device"]
  assert main(["plan", "--preset", "gemma4-31b", "--mesh", "1x1", "--context", "8",
               "--ple-on-host"]) == 2
  assert "no per-layer embedding table" in capsys.readouterr().err

"""Sharding over a device mesh: the logical-axis table, placement rules, per-device bytes, and
sharded logits == single-device logits on 8 host CPU devices (in a subprocess)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gemma.model import config as C
from gemma.model import params as Params
from gemma.parallel import sharding
from tests.conftest import FAMILIES

HERE = os.path.dirname(os.path.abspath(__file__))


def test_31b_placement_on_1x8():
  cfg = C.get_preset("gemma4-31b")
  specs = sharding.param_specs(Params.abstract(cfg), {"data": 1, "model": 8})
  local = next(s for s in cfg.layers if s.attention is C.AttentionType.LOCAL)
  glob = next(s for s in cfg.layers if s.attention is C.AttentionType.GLOBAL)
  assert specs.embed == P("model", None)  # vocabulary-parallel embedding / logits
  assert specs.layers[local.index].attn.q == P(None, "model", None)  # heads
  assert specs.layers[local.index].attn.o == P("model", None, None)
  assert specs.layers[local.index].mlp.down == P("model", None)  # FFN
  # 4 global KV heads do not split 8 ways: replicated, not padded
  assert glob.num_kv_heads % 8 != 0
  assert specs.layers[glob.index].attn.k == P(None, None, None)
  assert specs.final_norm == P(None)


def test_turboquant_cache_with_sink_and_window_splits_by_kv_heads():
  from gemma.kv.cache import init_cache

  cfg = C.get_preset("gemma4-31b")
  local = next(s for s in cfg.layers if s.attention is C.AttentionType.LOCAL)
  cache = jax.eval_shape(lambda: init_cache(cfg, 2, 2048, kv_quant="tq3.5+s1+r128"))
  specs = sharding.cache_specs(cache, {"data": 2, "model": 8})
  layer = specs.layers[local.index]  # 16 KV heads: 8-way
  assert layer.recent.k == layer.sink.v == P("data", None, "model", None)
  assert layer.recent.pos == layer.sink.pos == P("data", None)
  assert layer.k[0].codes == P("data", None, "model", None)


def test_fsdp_and_expert_axes():
  cfg = C.get_preset("gemma4-26b-a4b")
  specs = sharding.param_specs(Params.abstract(cfg), {"data": 2, "model": 4, "expert": 8})
  moe = specs.layers[0].moe
  assert moe.gate == P("expert", "data", "model")  # experts, FSDP over embed, expert FFN
  assert specs.layers[0].attn.q == P("data", "model", None)


def test_per_device_bytes_divide_by_the_mesh():
  cfg = C.get_preset("gemma4-31b")
  tree = Params.abstract(cfg, jax.numpy.bfloat16)
  one = sharding.per_device_bytes(tree, sharding.param_specs(tree, {}), {})
  sizes = {"data": 2, "model": 4}
  eight = sharding.per_device_bytes(tree, sharding.param_specs(tree, sizes), sizes)
  assert one == 2 * Params.count(tree)
  assert one / 8 <= eight < one / 7  # almost everything splits; norms stay whole


def test_quantized_weights_split_along_rotation_blocks():
  from gemma.quant.footprint import quantized_abstract

  cfg = C.get_preset("gemma4-31b")
  sizes = {"data": 2, "model": 4}
  for recipe in ("tq4", "tq3"):
    tree = quantized_abstract(cfg, recipe)
    specs = sharding.param_specs(tree, sizes)
    for q, s in ((tree.layers[0].attn.q, specs.layers[0].attn.q), (tree.embed, specs.embed)):
      # FSDP keeps rows whole: data goes to an output axis, the packed input axis stays whole
      assert s.codes == s.scales
      packed = -1 if q.layout.in_last else 0
      assert s.codes[packed] is None, (recipe, s.codes)
      assert {m for entry in s.codes for m in sharding._names(entry)} == {"data", "model"}
    down, s = tree.layers[0].mlp.down, specs.layers[0].mlp.down  # [F, D]
    if recipe == "tq4":  # tensor parallel splits F (the packed axis) in whole blocks
      assert s.codes == s.scales == P("model", "data")
      words, blocks = down.codes.shape[0] // 4, down.scales.shape[0] // 4
      assert words * 32 // down.spec.code_bits == blocks * down.spec.block
    else:  # 3-bit codes: two concatenated bit planes, so D takes both mesh axes
      assert s.codes == s.scales == P(None, ("data", "model"))
    quantized = sharding.per_device_bytes(tree, specs, sizes)
    whole = sharding.per_device_bytes(tree, sharding.param_specs(tree, {}), {})
    assert whole / 8 <= quantized < whole / 7, recipe


@pytest.mark.parametrize("text, bad", [("2x", True), ("0x8", True), ("axb", True),
                                       ("2x4", False), ("1x8x2", False)])
def test_parse_mesh(text, bad):
  if bad:
    with pytest.raises(ValueError, match="--mesh"):
      sharding.parse_mesh(text)
  else:
    assert sharding.parse_mesh(text)[:2] in ((2, 4), (1, 8))


@pytest.mark.slow
def test_sharded_logits_and_finetune_steps_equal_single_device():
  """Float, tq4 and GPTQ-calibrated tq4 weights; KV caches; fine-tuning steps."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  names = [n for n in FAMILIES if n != "gemma3"]
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_logits_check.py"), *names],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  # a fine-tuning step on a 2x4 mesh (FSDP + tensor parallel) equals the single-device step
  for mode, err in errors.pop("_finetune").items():
    assert err["loss_rel"] <= 1e-5 and err["params_rel_fro"] <= 1e-5, (mode, err)
  # a tq3 KV cache with float and tq4 weights; generate(mesh=)
  cache = errors.pop("_cache")
  assert len(cache) == 3, cache
  for kind, err in cache.items():
    if kind.startswith("generate"):
      assert err["same_tokens"], kind
      continue
    # prefill stores the same codes and signs; a float16 norm may land one rounding step
    # (2^-11 relative, half-ulp ties) away when the sharded sum differs in its last f32 bit
    assert err["words_differing"] == 0, (kind, err)
    assert err["norm_max_rel"] <= 2.0 ** -10, (kind, err)
    # attention over the same stored cache: sharded == one device
    assert err["decode_same_cache"]["rel_fro"] <= 1e-5, (kind, err)
    assert err["decode_same_cache"]["rel_max"] <= 3e-5, (kind, err)
    # prefill logits attend to what was stored, so one such rounding step shows up in them
    # (1.4e-5 measured on 1x8, docs/BENCHMARKS.md); bounded by the size of that step
    assert err["prefill"]["rel_fro"] <= 1e-5 or err["norm_max_rel"] > 0, (kind, err)
    assert err["prefill"]["rel_fro"] <= 2.0 ** -10, (kind, err)
  assert set(errors) == set(names)
  assert {"tq4@1x8", "tq4@2x4", "tq4@8x1", "tq4-gptq@2x4"} <= set(errors[names[0]])
  for name, per_mesh in errors.items():
    assert {"f32@1x8", "f32@2x4", "f32@8x1"} <= set(per_mesh), per_mesh
    for mesh, err in per_mesh.items():
      # relative (Frobenius) error; the element-wise max is ~1e-5 of the largest logit, the
      # size of float32's own error against float64 on these fixtures (tests/fixtures/README.md)
      assert err["rel_fro"] <= 1e-5, (name, mesh, err)
      assert err["rel_max"] <= 3e-5, (name, mesh, err)


def test_plan_cli_fits_and_refuses(capsys):
  from gemma.cli.app import main

  assert main(["plan", "--preset", "gemma4-31b", "--mesh", "1x8", "--context", "131072",
               "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["fits"] and out["devices"] == 8
  assert out["weight_bytes_per_device"] < 2 * Params.count(Params.abstract(
      C.get_preset("gemma4-31b"))) / 7
  assert main(["plan", "--preset", "gemma4-31b", "--mesh", "1x1", "--context", "131072",
               "--batch", "8"]) == 3
  assert "does NOT fit in 80 GiB" in capsys.readouterr().out


def test_logits_cli_with_a_mesh_matches(tmp_path):
  from gemma.cli.app import main
  from tests.conftest import fixture_dir

  args = ["logits", "--checkpoint", fixture_dir("e_style"), "--prompt-ids", "2,17,5,9,33"]
  assert main([*args, "--out", str(tmp_path / "a.npy")]) == 0
  assert main([*args, "--out", str(tmp_path / "b.npy"), "--mesh", "1x1"]) == 0
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
  assert main([*args, "--out", str(tmp_path / "c.npy"), "--mesh", "2x4"]) == 2  # 1 device


def test_generate_refuses_a_run_that_cannot_fit(monkeypatch):
  from gemma.inference import decode, steps
  from tests.conftest import tiny

  cfg = tiny("gemma4-31b")
  p = Params.init(jax.random.key(0), cfg)
  monkeypatch.setattr(steps, "device_memory_limit", lambda: 10_000)
  with pytest.raises(ValueError, match="does not fit the device.*gemma4 plan"):
    decode.generate(p, cfg, [[2, 5, 7]], 4)
  monkeypatch.setattr(steps, "device_memory_limit", lambda: 1 << 30)
  assert len(decode.generate(p, cfg, [[2, 5, 7]], 4).tokens[0]) == 4


@pytest.mark.slow
def test_check_fits_refuses_as_generate_does(monkeypatch):
  """memory.check_fits raises decode.check_memory's message; plan() and `gemma4 plan` agree."""
  from gemma.cli.scale import plan
  from gemma.inference import decode, steps
  from gemma.parallel import memory
  from tests.conftest import tiny

  cfg = tiny("gemma4-e2b", head_dim=64, global_head_dim=128)
  p = Params.init(jax.random.key(0), cfg)
  mesh = sharding.make_mesh("1x1")
  for m in (None, mesh):
    for kv in (None, "bf16", "tq3"):
      monkeypatch.setattr(steps, "device_memory_limit", lambda: 10_000)
      with pytest.raises(ValueError) as want:
        decode.check_memory(p, cfg, 2, 64, kv, m)
      with pytest.raises(ValueError) as got:
        memory.check_fits(p, cfg, 2, 64, kv, m, 10_000, decode.DEFAULT_PREFILL_CHUNK)
      assert str(got.value) == str(want.value) and "gemma4 plan" in str(got.value)
  assert memory.check_fits(p, cfg, 2, 64, None, None, None) is None
  fits = memory.check_fits(p, cfg, 2, 64, None, mesh, 1 << 30)
  assert fits.total_bytes == fits.weight_bytes + fits.cache_bytes > 0
  out = plan("gemma4-e4b", "1x8", 8192, ple_on_host=True)
  cfg = C.get_preset("gemma4-e4b")
  p = memory.plan(Params.abstract(cfg, jax.numpy.bfloat16), cfg, 1, 8192, "bf16",
                  {"data": 1, "model": 8}, ple_on_host=True)
  assert (out["weight_bytes_per_device"], out["cache_bytes_per_device"], out["host_bytes"]) == (
      p.weight_bytes, p.cache_bytes, p.host_bytes)

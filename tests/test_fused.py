"""Fused q/k/v and gate/up projections (`gemma.model.fused`): exact round trips, the same logits,
fewer matmuls per decode step, and every path that needs the separate weights (save, quantize,
NNX and LoRA, sharding) still working on a model `gemma.load` fused."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma
from gemma import nnx as gnnx
from gemma.inference import steps
from gemma.io import checkpoint
from gemma.kv.cache import init_cache
from gemma.model import fused
from gemma.model import params as P
from gemma.model.transformer import forward
from gemma.parallel import sharding
from gemma.quant.qarray import QArray
from gemma.quant.recipes import quantize_params
from tests.conftest import TINY_PRESETS, fixture_dir, tiny

IDS = np.array([[2, 17, 33, 5, 71, 9, 40, 12]], np.int32)


def _logits(params, cfg):
  positions = jnp.broadcast_to(jnp.arange(IDS.shape[1], dtype=jnp.int32), IDS.shape)
  return np.asarray(jax.jit(forward, static_argnames="cfg")(params, jnp.asarray(IDS), positions,
                                                          cfg)[0])


def _close(got, want):
  """Equal up to float summation order: 1e-5 of the largest logit."""
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _same_tree(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _params(preset, quant):
  cfg = tiny(preset)
  params = P.init(jax.random.key(0), cfg)
  return cfg, quantize_params(params, quant) if quant else params


@pytest.mark.parametrize("quant", [None, "tq4", "tq3"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_fuse_is_exact_and_unfuse_inverts_it(preset, quant):
  cfg, params = _params(preset, quant)
  f = fused.fuse(params)
  assert fused.is_fused(f) and not fused.is_fused(params)
  for ly, spec in zip(f.layers, cfg.layers, strict=True):
    # KV-shared layers own no k/v: their q stays alone
    assert (ly.attn.qkv is None) == spec.shares_kv and ly.mlp.gate_up is not None
    assert ly.mlp.gate is None and ly.mlp.up is None
    if quant:
      assert isinstance(ly.mlp.gate_up, QArray)
  _same_tree(fused.unfuse(f, cfg), params)
  want = _logits(params, cfg)
  # same codes and scales; only the float summation order of the wider matmul may differ
  _close(_logits(f, cfg), want)


def test_k_eq_v_layers_fuse_q_and_k_only():
  cfg, params = _params("gemma4-31b", None)
  keqv = [i for i, s in enumerate(cfg.layers) if s.k_eq_v]
  assert keqv
  f = fused.fuse(params)
  for i in keqv:
    spec = cfg.layers[i]
    width = (cfg.num_heads + spec.num_kv_heads) * spec.head_dim
    assert f.layers[i].attn.qkv.shape == (cfg.embed_dim, width)


def test_weights_that_differ_stay_separate():
  cfg, params = _params("gemma4-31b", None)
  ly = params.layers[0]
  mixed = quantize_params(params, "tq4").layers[0].mlp.gate
  layer = dataclasses.replace(ly, mlp=dataclasses.replace(ly.mlp, gate=mixed))
  params = dataclasses.replace(params, layers=(layer, *params.layers[1:]))
  f = fused.fuse(params)
  assert f.layers[0].mlp.gate_up is None and f.layers[0].mlp.gate is mixed
  assert f.layers[1].mlp.gate_up is not None
  _close(_logits(f, cfg), _logits(params, cfg))


def test_consume_frees_the_separate_weights():
  _, params = _params("gemma4-e2b", None)
  q = params.layers[0].attn.q
  f = fused.fuse(params, consume=True)
  assert q.is_deleted() and not f.layers[0].attn.qkv.is_deleted()


def _dots(params, cfg) -> int:
  cache = init_cache(cfg, 1, 16, jnp.float32)
  tok = jnp.zeros((1,), jnp.int32)
  text = steps.decode_step.lower(params, tok, cache, jax.random.key(0), cfg=cfg,
                                 sampler=steps.GREEDY).compile().as_text()
  entry = text[text.index("ENTRY"):]
  return len(re.findall(r"= \S+ dot\(", entry))


@pytest.mark.parametrize("preset", ["gemma4-31b", "gemma4-e2b"])
def test_decode_step_runs_fewer_matmuls(preset):
  """The compiled decode step's dot count falls by what fusion merges: per layer, gate/up saves
  one, q/k/v two (q/k on k_eq_v layers: one; KV-shared layers: none)."""
  cfg, params = _params(preset, None)
  saved = sum(1 + (0 if s.shares_kv else 1 if s.k_eq_v else 2) for s in cfg.layers)
  assert _dots(fused.fuse(params), cfg) == _dots(params, cfg) - saved


@pytest.fixture(scope="module")
def loaded():
  return gemma.load(fixture_dir("e_style"), dtype="float32")


def test_load_fuses_by_default_with_the_reference_logits(loaded):
  assert fused.is_fused(loaded.params)
  plain = gemma.load(fixture_dir("e_style"), dtype="float32", fuse=False)
  assert not fused.is_fused(plain.params)
  ref = np.load(f"{fixture_dir('e_style')}/reference.npz")
  got = loaded.logits(ref["prompt_ids"])
  err = np.abs(got - ref["logits"]).max() / np.abs(ref["logits"]).max()
  assert err <= 1e-4, err
  _close(got, plain.logits(ref["prompt_ids"]))


def test_save_writes_the_separate_weights(loaded, tmp_path):
  out = loaded.save(tmp_path / "ckpt")
  cfg, params = checkpoint.load(out, jnp.float32)
  assert not fused.is_fused(params)
  _same_tree(params, fused.unfuse(loaded.params, loaded.cfg))
  again = gemma.load(out, dtype="float32")
  ids = [2, 5, 9, 14]
  np.testing.assert_array_equal(again.logits(ids), loaded.logits(ids))


def test_quantize_a_fused_model(loaded):
  q = loaded.quantize("tq4")
  assert fused.is_fused(q.params)
  plain = gemma.load(fixture_dir("e_style"), dtype="float32", fuse=False).quantize("tq4")
  _same_tree(fused.unfuse(q.params, q.cfg), plain.params)
  ids = [2, 5, 9, 14]
  _close(q.logits(ids), plain.logits(ids))


def test_nnx_and_lora_see_the_separate_weights(loaded):
  module = gnnx.from_model(loaded)
  assert not fused.is_fused(module.to_params())
  module.add_lora(2, 4.0, ("q", "v", "up"), key=jax.random.key(1))
  assert any(".attn.q" in name for name in module.adapters())
  ids = jnp.asarray([[2, 5, 9, 14]], jnp.int32)
  # fresh adapters (B = 0) leave the logits as they were
  _close(np.asarray(module(ids)[0][0]), loaded.logits([2, 5, 9, 14]))


def test_sharding_a_fused_model(loaded):
  mesh = sharding.make_mesh("1x1")
  params = sharding.shard_params(loaded.params, mesh)
  ids = [2, 5, 9, 14]
  _close(_logits_of(params, loaded.cfg, ids), loaded.logits(ids))


def _logits_of(params, cfg, ids):
  tokens = jnp.asarray([ids], jnp.int32)
  positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
  return np.asarray(jax.jit(forward, static_argnames="cfg")(params, tokens, positions, cfg)[0][0])

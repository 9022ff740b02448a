"""The quantized-array type: packing, layouts, the folded matmul, baselines, recipes, footprint."""

import dataclasses
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see tests/test_turboquant.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gemma.model import config, params, weights  # noqa: E402
from gemma.model import transformer as model  # noqa: E402
from gemma.quant import codebook, footprint, packing, qarray, recipes  # noqa: E402
from gemma.quant.qarray import Layout, QArray, QuantSpec  # noqa: E402
from tests.conftest import tiny  # noqa: E402

SPECS = {
    "tq4": QuantSpec(bits=4),
    "tq3-rht": QuantSpec(bits=3, rotation="hadamard"),
    "tq2-gauss": QuantSpec(bits=2, law="gauss", block=64),
    "tq3-prod": QuantSpec(method="tq_prod", bits=3),
    "int8": QuantSpec(method="int", bits=8, rotation="none"),
    "int4": QuantSpec(method="int", bits=4, rotation="none"),
    "nf4": QuantSpec(method="nf4", rotation="none"),
}


def _normal(seed, shape, scale=0.02):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _close(a, b, rtol=2e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(b)), np.max(np.abs(a - b))


@pytest.mark.parametrize("bits,word_bits", [(1, 32), (2, 32), (3, 32), (4, 32), (5, 32),
                                            (7, 32), (8, 32), (3, 8), (4, 8)])
def test_pack_roundtrip(bits, word_bits):
  codes = jax.random.randint(jax.random.PRNGKey(bits), (3, 64, 5), 0, 2 ** bits)
  words = packing.pack(codes, bits, axis=1, word_bits=word_bits)
  assert words.shape == (3, 64 * bits // word_bits, 5)
  assert words.dtype == (jnp.uint8 if word_bits == 8 else jnp.uint32)
  np.testing.assert_array_equal(packing.unpack(words, bits, 64, axis=1), codes)


def test_pack_layout_and_errors():
  # 3 bits = a 2-bit plane then a 1-bit plane; code j of a word sits at bits [j·w, (j+1)·w).
  codes = jnp.arange(32) % 8
  words = np.asarray(packing.pack(codes, 3))
  assert words.shape == (3,) and packing.planes(3) == (2, 1)
  assert words[0] == sum(int(c & 3) << (2 * j) for j, c in enumerate(codes[:16]))
  assert words[2] == sum(int(c >> 2) << j for j, c in enumerate(codes))
  with pytest.raises(ValueError, match="multiple of 32"):
    packing.pack(jnp.zeros(48, jnp.int32), 3)


@pytest.mark.parametrize("name", ["tq4", "tq3-prod", "nf4"])
def test_layouts_and_folded_matmul(name):
  spec = SPECS[name]
  if name == "tq3-prod":
    spec = dataclasses.replace(spec, rotation="hadamard")
  quant = recipes.quantize
  x = _normal(1, (2, 3, 256), 1.0)
  # q [D, N, H] with 'btd,dnh->btnh'
  w = _normal(2, (256, 4, 32))
  q = quant(w, spec)
  assert q.codes.shape == (256 * spec.code_bits // 32, 4, 32) and q.codes.dtype == jnp.uint32
  assert q.scales.shape == (256 // q.spec.block, 4, 32) and q.scales.dtype == jnp.float16
  wd = qarray.dequantize(q)
  assert wd.shape == w.shape and wd.dtype == w.dtype
  _close(qarray.einsum("btd,dnh->btnh", x, q),
         jnp.einsum("btd,dnh->btnh", x, wd, precision="highest"))
  # A spec that is not a plain matmul falls back to the dequantized weight.
  _close(qarray.einsum("btd,dnh->bnth", x, q),
         jnp.einsum("btd,dnh->bnth", x, wd, precision="highest"))


def test_embedding_layout():
  """The tied embedding [V, D]: a table read by row and the LM head 'btd,vd->btv'.

  (o [N, H, D] with two contracted axes runs in test_quantized_model_matches_dequantized.)
  """
  spec, quant = SPECS["tq4"], recipes.quantize
  x = _normal(1, (2, 3, 256), 1.0)
  emb = _normal(5, (40, 256), 1.0)
  qe = quant(emb, spec, Layout(in_last=True))
  ids = jnp.array([[0, 7, 39], [3, 3, 1]])
  ed = qarray.dequantize(qe)
  np.testing.assert_allclose(qe[ids], ed[ids], atol=1e-6)
  _close(qarray.einsum("btd,vd->btv", x, qe, out_dtype=jnp.float32),
         jnp.einsum("btd,vd->btv", x, ed, precision="highest"))


@pytest.mark.parametrize("name,lo,hi", [
    ("tq4", 0.0088, 0.0098), ("tq3-rht", 0.0325, 0.0355), ("tq2-gauss", 0.108, 0.124),
    ("int8", 0, 1e-4), ("int4", 0.010, 0.016), ("nf4", 0.007, 0.011), ("tq3-prod", 0.15, 0.22)])
def test_weight_error_and_bits(name, lo, hi):
  """Relative error ‖W - Ŵ‖²/‖W‖² on Gaussian weights: TurboQuant gives D_mse(b, g)."""
  spec = SPECS[name]
  w = _normal(6, (512, 256))
  q = recipes.quantize(w, spec)
  rel = float(jnp.sum((qarray.dequantize(q) - w) ** 2) / jnp.sum(w ** 2))
  assert lo <= rel <= hi, rel
  if spec.method == "tq":
    assert abs(rel / codebook.lloyd_max(spec.bits, spec.block).mse - 1) < 0.03
  extra = 16 / spec.block * (2 if spec.method == "tq_prod" else 1)
  assert qarray.bits_per_weight(q) == spec.bits + extra


def test_scale_fits():
  """Scale-fit remedies: 'unbiased' removes the shrinkage ⟨w, ŵ⟩/‖w‖² ≈ 1 - D_mse (at a higher MSE);
  'lsq' keeps the codes and fits the scale, so its MSE is never above the paper's norm scale."""
  w = _normal(16, (512, 256))

  def stats(fit):
    wq = qarray.dequantize(recipes.quantize(w, QuantSpec(bits=3, scale_fit=fit)))
    return (float(jnp.sum((wq - w) ** 2) / jnp.sum(w ** 2)),
            float(jnp.sum(wq * w) / jnp.sum(w * w)))

  (mse_n, gain_n), (mse_u, gain_u), (mse_l, _) = stats("norm"), stats("unbiased"), stats("lsq")
  d = codebook.lloyd_max(3, 128).mse
  assert abs(gain_n - (1 - d)) < 0.005 and abs(gain_u - 1) < 0.005
  assert mse_u > mse_n and mse_l < mse_n
  with pytest.raises(ValueError, match="scale_fit"):
    QuantSpec(method="int", rotation="none", scale_fit="lsq")
  with pytest.raises(ValueError, match="scale_fit"):
    QuantSpec(scale_fit="median")


def test_recipe_dict_round_trip_and_errors():
  for name, recipe in recipes.RECIPES.items():
    assert recipes.recipe_from_dict(recipes.recipe_to_dict(recipe)) == recipe, name
  with pytest.raises(ValueError, match="unknown tensor classes"):
    recipes.recipe_from_dict({"name": "x", "specs": {"lm_head": {"bits": 4}}})
  with pytest.raises(ValueError, match="invalid quantization recipe"):
    recipes.recipe_from_dict({"name": "x", "specs": {"mlp": {"bits": 4, "block": 96}}})
  with pytest.raises(ValueError, match="unknown recipe 'tq7'"):
    recipes.get_recipe("tq7")
  # per-tensor widths (bit allocation) and the calibration record survive the round trip
  allocated = dataclasses.replace(
      recipes.get_recipe("tq4"), tensors=(("embed", QuantSpec(method="int", bits=8,
                                                               rotation="none")),
                                          ("layers.0.attn.q", None)), calibration="gptq on x")
  assert recipes.recipe_from_dict(recipes.recipe_to_dict(allocated)) == allocated
  assert allocated.spec_of("embed").bits == 8 and allocated.spec_of("layers.0.attn.q") is None
  assert allocated.spec_of("layers.0.attn.k").bits == 4


def test_experts_ragged_dot_and_padding():
  spec = QuantSpec(bits=4)
  w = _normal(7, (3, 48, 40))  # n_in = 48: padded to 64, block 64
  q = recipes.quantize(w, spec, Layout(batch_ndim=1))
  assert q.spec.block == 64 and q.codes.shape == (3, 64 * 4 // 32, 40)
  wd = qarray.dequantize(q)
  assert wd.shape == w.shape
  assert float(jnp.sum((wd - w) ** 2) / jnp.sum(w ** 2)) < 0.02
  lhs = _normal(8, (9, 48), 1.0)
  sizes = jnp.array([4, 0, 5], jnp.int32)
  ref = jax.lax.ragged_dot(lhs, wd, sizes, precision=jax.lax.Precision.HIGHEST)
  _close(qarray.ragged_dot(lhs, q, sizes), ref)


def test_zero_weights_and_jit():
  q = recipes.quantize(jnp.zeros((128, 8)), QuantSpec(method="tq_prod", bits=2))
  assert float(jnp.max(jnp.abs(qarray.dequantize(q)))) == 0
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 4 and jax.tree_util.tree_unflatten(treedef, leaves) == q
  y = jax.jit(lambda q, x: qarray.einsum("md,de->me", x, q))(q, jnp.ones((2, 128)))
  assert y.shape == (2, 8) and float(jnp.max(jnp.abs(y))) == 0


def test_block_plan():
  assert qarray.plan_block(2816, 128) == (128, 2816)
  assert qarray.plan_block(2112, 128) == (64, 2112)  # 26B-A4B's FFN and expert widths
  assert qarray.plan_block(704, 128) == (64, 704)
  assert qarray.plan_block(8, 128) == (32, 32)
  assert qarray.plan_block(48, 128) == (64, 64)
  with pytest.raises(ValueError):
    QuantSpec(block=96)


def test_recipe_classes_and_layouts():
  assert recipes.tensor_class("embed") == "embed"
  assert recipes.tensor_class("ple_embed") == "ple_table"
  assert recipes.tensor_class("layers.3.ple.gate") == "ple_proj"
  assert recipes.tensor_class("layers.12.attn.o") == "attention"
  assert recipes.tensor_class("layers.0.moe.down") == "experts"
  assert recipes.tensor_class("layers.0.moe.router") == "router"
  for scale in ("final_norm", "layers.1.attn.q_norm", "layers.0.moe.expert_scale",
                "layers.2.scalar", "layers.0.moe.router_scale", "ple_norm"):
    assert recipes.tensor_class(scale) is None
  assert recipes.layout_of("layers.0.attn.o") == Layout(in_ndim=2)
  assert recipes.layout_of("ple_embed") == Layout(in_last=True)
  assert recipes.layout_of("layers.0.moe.gate") == Layout(batch_ndim=1)
  assert recipes.layout_of("layers.0.moe.router") == Layout()
  assert {w.quant_class for w in weights.WEIGHTS} == set(recipes.CLASSES)
  assert set(recipes.RECIPES) >= {"tq4", "tq3", "tq2", "tq-mixed", "int8", "int4", "nf4"}
  assert isinstance(recipes.get_recipe("tq4").spec_for("mlp"), QuantSpec)
  assert recipes.get_recipe("tq4").spec_for(None) is None


# ------------------------------------------------------------------------- model and footprint
def _random_params(cfg, seed=0):
  """Weights N(0, 0.02²), scales 1 + N(0, 0.1²), made in numpy (no per-shape compilations)."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    scale = recipes.tensor_class(params.path_name(path)) is None
    v = (1.0 if scale else 0.0) + (0.1 if scale else 0.02) * rng.standard_normal(s.shape)
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(one, params.abstract(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gemma4-e2b", "gemma4-26b-a4b"])
def test_quantized_model_matches_dequantized(preset):
  """forward(quantized params) == forward(dequantized float params), through jit.

  E2B-style covers the tied embedding (table + LM head), PLE table and projections, KV sharing
  and padded input widths; 26B-style covers experts (ragged_dot via astype) and the router.
  """
  cfg = tiny(preset)
  p = _random_params(cfg)
  qp = recipes.quantize_params(p, "tq4" if preset != "gemma4-26b-a4b" else "tq-mixed")
  assert isinstance(qp.embed, QArray) and isinstance(qp.layers[0].attn.q, QArray)
  assert not isinstance(qp.final_norm, QArray) and qp.embed.dtype == jnp.float32
  deq = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if isinstance(a, QArray) else a,
                               qp, is_leaf=lambda a: isinstance(a, QArray))
  tokens = jnp.array([[2, 17, 5, 9, 33, 1]], jnp.int32)
  positions = jnp.arange(6, dtype=jnp.int32)[None]
  fwd = jax.jit(lambda p: model.forward(p, tokens, positions, cfg)[0])
  ref = fwd(deq)
  _close(fwd(qp), ref, rtol=1e-4)  # through gemma.model.layers.einsum / ragged_dot dispatch


def test_footprint_matches_quantize_params():
  for preset in ("gemma4-e2b", "gemma4-26b-a4b"):
    cfg = tiny(preset)
    for name in ("tq-mixed", "nf4"):
      got = footprint.quantized_abstract(cfg, name, jnp.float32)
      want = jax.eval_shape(lambda p, n=name: recipes.quantize_params(p, n),
                            params.abstract(cfg))
      is_q = lambda a: isinstance(a, QArray)  # noqa: E731
      g_leaves, g_tree = jax.tree_util.tree_flatten(got, is_leaf=is_q)
      w_leaves, w_tree = jax.tree_util.tree_flatten(want, is_leaf=is_q)
      assert g_tree == w_tree
      for a, b in zip(g_leaves, w_leaves, strict=True):
        if is_q(a):
          assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
          for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                          strict=True):
            assert (x.shape, x.dtype) == (y.shape, y.dtype)
        else:
          assert a.shape == b.shape  # float leaves: footprint counts them in the recipe's dtype


def test_full_size_footprints():
  gb24 = 24e9
  for name in config.PRESETS:
    cfg = config.get_preset(name)
    bf16 = footprint.footprint(cfg, "bf16")
    assert bf16["total_bytes"] == 2 * params.count(params.abstract(cfg))
    for r in ("tq4", "int4", "nf4"):
      f = footprint.footprint(cfg, r)
      assert 4.12 < f["bits_per_weight"] < 4.2, (name, r, f["bits_per_weight"])
    assert footprint.footprint(cfg, "tq2")["total_bytes"] < footprint.footprint(
        cfg, "tq3")["total_bytes"] < footprint.footprint(cfg, "tq-mixed")["total_bytes"]
  cfg = config.get_preset("gemma4-31b")
  tq4 = footprint.footprint(cfg, "tq4")["total_bytes"]
  kv = footprint.kv_cache_bytes(cfg, 32_768)
  # 31B under tq4 (about 15.8 GB) plus a bf16 KV cache of 32k tokens (3.5 GB) fits a 24 GB card
  # with more than 4 GB to spare; bf16 weights alone would not.
  assert tq4 + kv < gb24 - 4e9
  assert footprint.footprint(cfg, "bf16")["total_bytes"] > 2 * gb24
  assert "gemma4-31b" in footprint.table(["gemma4-31b"], ["tq4"])

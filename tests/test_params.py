"""Parameter counts of the full-size presets, computed without allocating; the weight table."""

import jax
import pytest

from gemma.model import config as C
from gemma.model import fused
from gemma.model import params as P
from gemma.model import weights as W

# Published totals (model cards / configs), in billions, rounded as published.
PUBLISHED = {
    "gemma4-e2b": dict(effective=2.27, ple=2.363, total=4.63),
    "gemma4-e4b": dict(effective=4.62, ple=2.846, total=7.46),
    "gemma4-26b-a4b": dict(total=25.2, active=3.8),
    "gemma4-31b": dict(total=30.70),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts(name):
  cfg = C.get_preset(name)
  shapes = jax.eval_shape(lambda k: P.init(k, cfg), jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(P.abstract(cfg))
  counts = P.count_breakdown(cfg)
  assert counts["total"] == P.count(shapes)
  for kind, billions in PUBLISHED[name].items():
    digits = len(str(billions).split(".")[1])
    assert round(counts[kind] / 1e9, digits) == billions, (kind, counts[kind])


def test_abstract_omits_unused_tensors():
  e2b = P.abstract(C.get_preset("gemma4-e2b"))
  assert e2b.layers[15].attn.k is None and e2b.layers[14].attn.k is not None
  assert e2b.ple_embed.shape == (262144, 35, 256)
  big = P.abstract(C.get_preset("gemma4-31b"))
  assert big.layers[5].attn.v is None and big.layers[5].attn.k.shape == (5376, 4, 512)
  assert big.layers[4].attn.v.shape == (5376, 16, 256)
  assert big.ple_embed is None and big.layers[0].moe is None


def test_weight_table_covers_every_weight_once():
  """Every leaf of every preset is a weight with one row of gemma.model.weights (axes of its
  rank) or a scale without one; every row is used by some preset."""
  used = set()
  for name in C.PRESETS:
    tree = P.abstract(C.get_preset(name))
    # the trees `gemma.load` serves: q/k/v and gate/up fused (`gemma.model.fused`)
    fused_tree = jax.eval_shape(fused.fuse, tree)
    leaves = [*zip(P.leaf_names(tree), jax.tree.leaves(tree), strict=True),
              *zip(P.leaf_names(fused_tree), jax.tree.leaves(fused_tree), strict=True)]
    for leaf_name, leaf in leaves:
      info = W.weight_info(leaf_name)
      assert (info is None) == P._is_scale(leaf_name), leaf_name
      if info is not None:
        used.add(info.name)
        assert len(info.axes) == leaf.ndim, leaf_name
        assert info.batch_ndim + info.in_ndim < leaf.ndim, leaf_name
        assert W.weight_info_by_suffix("opt_state.0.mu." + leaf_name) is info
  assert used == {w.name for w in W.WEIGHTS}
  assert W.weight_info("attn.q") is None and W.weight_info("layers.3.embed") is None
  assert list(W.lora_targets()) == ["q", "k", "v", "o", "gate", "up", "down"]

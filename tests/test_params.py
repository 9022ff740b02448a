"""Parameter counts of the full-size presets, computed without allocating."""

import jax
import pytest

from gemma.model import config as C
from gemma.model import params as P

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

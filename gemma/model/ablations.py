"""Named ablations of a model config: each is a `dataclasses.replace` of the preset.

  from gemma.model.ablations import ablate
  cfg = ablate(get_preset("gemma4-e2b"), "no_kv_sharing")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from gemma.model.config import AttentionType, ModelConfig

ABLATIONS: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    # every layer computes its own K/V (E2B/E4B)
    "no_kv_sharing": lambda c: dataclasses.replace(c, num_kv_shared_layers=0,
                                                   double_wide_mlp=False),
    # drop the per-layer embeddings (E2B/E4B)
    "no_ple": lambda c: dataclasses.replace(c, ple_dim=0, ple_vocab_size=0),
    # all layers global (no sliding window)
    "all_global": lambda c: dataclasses.replace(
        c, layer_types=(AttentionType.GLOBAL,) * c.num_layers),
    # no final logit soft-cap
    "no_softcap": lambda c: dataclasses.replace(c, final_softcap=None),
    # Gemma 2/3-style 1/sqrt(head_dim) attention scaling instead of 1.0
    "scaled_attention": lambda c: dataclasses.replace(c, query_pre_attn_scalar=float(c.head_dim)),
}


def ablate(cfg: ModelConfig, *names: str) -> ModelConfig:
  """Applies the named ablations in order; an unknown name lists the valid ones."""
  for name in names:
    if name not in ABLATIONS:
      raise ValueError(f"unknown ablation {name!r}; valid: {', '.join(ABLATIONS)}")
    cfg = ABLATIONS[name](cfg)
  return dataclasses.replace(cfg, name=f"{cfg.name}+{'+'.join(names)}") if names else cfg

"""Ablations: named model-structure ablations, and one experiment grid per file of this package.

Named ablations of a model config (each a `dataclasses.replace` of the preset; defined in
`gemma.model.ablations`, which fine-tuning uses, and re-exported here):

  from configs.ablations import ablate
  cfg = ablate(get_preset("gemma4-e2b"), "no_kv_sharing")

Experiments (`configs/experiment.py`): every other module here has `get_config()` returning an
`Experiment`, a base setting plus a grid of `dataclasses.replace` deltas:

  python scripts/ablate.py --config configs/ablations/quantizer.py --out docs/ablations/quantizer
"""

from __future__ import annotations

from pathlib import Path

from gemma.model.ablations import ABLATIONS, ablate

EXPERIMENTS = tuple(sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                           if not p.stem.startswith("_")))

__all__ = ["ABLATIONS", "EXPERIMENTS", "ablate"]

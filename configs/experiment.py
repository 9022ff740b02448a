"""Experiments as code: a base setting plus a grid of `dataclasses.replace` deltas (no YAML).

An `Experiment` (frozen) names its kind, a base object and its grid points; point i is

    dataclasses.replace(experiment.base, **experiment.points[i].deltas)

Kinds and their bases:
  eval        `EvalPoint`: weights quantized by one uniform `QuantSpec` (or a named recipe) and a
              KV cache width; perplexity / KL / top-1 agreement against the float model
              (`gemma.inference.evaluate.evaluate_many`).
  distortion  `Distortion`: a Monte Carlo of TurboQuant's D_mse at one bit width
              (`gemma.quant.montecarlo.distortion`), against the paper's bounds.
  finetune    `gemma.training.FinetuneConfig` (configs/finetune_tiny.py): a fine-tuning run
              (`gemma.training.train`), e.g. with structural `ablations`.

One file per experiment under configs/ablations/, each with `get_config() -> Experiment`; run
with `python scripts/ablate.py --config configs/ablations/NAME.py --out DIR`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma.quant.qarray import QuantSpec
from gemma.quant.recipes import Recipe, get_recipe, uniform
from gemma.training.config_file import load_config_file

KINDS = ("eval", "distortion", "finetune")
_TQ = ("tq", "tq_prod")


@dataclasses.dataclass(frozen=True)
class EvalPoint:
  """One evaluated model: its weights and its KV cache.

  Weights: every weight class quantized by one `QuantSpec(method, bits, block, rotation, law,
  scale_fit)` (`gemma.quant.recipes.uniform`; baselines never rotate, as in `RECIPES`), or the
  named recipe `recipe` (a `RECIPES` key) when given, or float with method=None.
  kv_quant: the KV cache (`gemma.kv.quant.CHOICES`); None: a plain forward pass without a cache.
  """

  method: str | None = "tq"
  bits: int = 4
  block: int = 128
  rotation: str = "haar"
  law: str = "beta"
  scale_fit: str = "norm"
  recipe: str | None = None
  kv_quant: str | None = None

  @property
  def quantizer(self) -> str:
    """What plots group lines by: the recipe name, the method, or "float"."""
    return self.recipe or self.method or "float"

  def spec(self) -> QuantSpec | None:
    if self.method is None:
      return None
    tq = self.method in _TQ
    return QuantSpec(method=self.method, bits=self.bits, block=self.block,
                     rotation=self.rotation if tq else "none", law=self.law if tq else "beta",
                     scale_fit=self.scale_fit if tq else "norm")

  def weight_recipe(self, name: str | None = None) -> Recipe | None:
    """The recipe of the weights (None: float weights); ValueError for an invalid setting."""
    if self.recipe is not None:
      return get_recipe(self.recipe)
    spec = self.spec()
    return None if spec is None else uniform(name or self.quantizer, spec)


@dataclasses.dataclass(frozen=True)
class Distortion:
  """TurboQuant_mse on uniform unit vectors of R^d (`gemma.quant.montecarlo.distortion`)."""

  bits: int = 4
  d: int = 128
  rotation: str = "haar"  # "haar" | "hadamard"
  rounds: int = 2
  law: str = "beta"
  draws: int = 20  # independent rotations
  vectors: int = 4000  # unit vectors per rotation
  seed: int = 0


def paper_bounds(bits: int) -> tuple[float, float]:
  """(lower, upper) bounds on D_mse of any / of TurboQuant's b-bit quantizer (Thm 1, Thm 3)."""
  return 4.0 ** -bits, math.sqrt(3) * math.pi / 2 * 4.0 ** -bits


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: a label and the `dataclasses.replace` deltas of the experiment's base."""

  label: str
  deltas: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Plot:
  """A PNG of the results: y against x, one line per value of `group` (a row field).

  x=None: a bar per grid point (by label). bounds: add the paper's D_mse bounds (distortion).
  annotate: write each point's label next to it (line plots).
  """

  y: str
  x: str | None = None
  group: str | None = None
  logy: bool = False
  bounds: bool = False
  annotate: bool = True
  title: str = ""

  @property
  def filename(self) -> str:
    return f"{self.y}_vs_{self.x}.png" if self.x else f"{self.y}.png"


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A grid of runs: point i is `dataclasses.replace(base, **points[i].deltas)`.

  Eval settings (kind "eval"): checkpoint None means the real Gemma 3 270M GGUF
  (scripts/quant_quality.py); text is relative to the repository root; the first `max_tokens`
  tokens are scored in BOS-led windows of `context` tokens against the float model with the KV
  cache `reference_kv_quant` (None: no cache).
  """

  name: str
  kind: str
  base: Any
  points: tuple[Point, ...]
  description: str = ""
  plots: tuple[Plot, ...] = ()
  checkpoint: str | None = None
  text: str = "data/alice_in_wonderland.txt"
  max_tokens: int = 2046
  context: int = 1024
  dtype: str = "float32"
  reference_kv_quant: str | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind {self.kind!r}; expected one of {KINDS}")
    labels = [p.label for p in self.points]
    if not labels or len(set(labels)) != len(labels):
      raise ValueError(f"experiment {self.name!r} needs distinct point labels, got {labels}")

  def resolve(self, point: Point) -> Any:
    """The base with the point's deltas applied (the setting the point runs)."""
    return dataclasses.replace(self.base, **dict(point.deltas))

  def resolved(self) -> list[tuple[Point, Any]]:
    return [(p, self.resolve(p)) for p in self.points]


def grid(label: str, **axes) -> tuple[Point, ...]:
  """The cartesian product of `axes` (field -> values), labelled by `label.format(**deltas)`.

    grid("{method}{bits}", method=("tq", "int"), bits=(3, 4))  # tq3, tq4, int3, int4
  """
  combos = (dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values()))
  return tuple(Point(label.format(**d), d) for d in combos)


def points(*entries: tuple[str, dict]) -> tuple[Point, ...]:
  """Points from explicit (label, deltas) pairs."""
  return tuple(Point(label, dict(deltas)) for label, deltas in entries)


def load_config(path: str | Path) -> Experiment:
  """`get_config()` of the experiment file at `path` (imported by path, not by module name)."""
  return load_config_file(path, Experiment)

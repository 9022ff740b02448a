"""Quantization recipes as data: which quantizer each class of tensor gets, and applying them.

Tensor classes (the `quant_class` of each weight in `gemma.model.weights`):
  embed       embed [V, D]: the token table and the tied LM head ('btd,vd->btv')
  attention   layers.N.attn.{q, k, v, o}
  mlp         layers.N.mlp.{gate, up, down} (the dense MLP, also the shared MLP of MoE layers)
  experts     layers.N.moe.{gate, up, down} [E, ...]
  router      layers.N.moe.router [D, E]
  ple_table   ple_embed [V_ple, L, P] (per-layer embedding table, read by row)
  ple_proj    ple_proj [D, L, P], layers.N.ple.{gate, proj}
Norm scales, layer scalars and router/expert scales have no class: they always stay float.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gemma.model import params as P
from gemma.model.weights import weight_info
from gemma.quant import baselines, turboquant
from gemma.quant.qarray import MATH_LAYOUT, Layout, QArray, QuantSpec

CLASSES = ("embed", "attention", "mlp", "experts", "router", "ple_table", "ple_proj")


def tensor_class(name: str) -> str | None:
  """Class of a params leaf ("layers.3.attn.q" -> "attention"); None for scales that stay float."""
  info = weight_info(name)
  return None if info is None else info.quant_class


def layout_of(name: str) -> Layout:
  """Batch / input / output axes of a params leaf (see gemma/model/notation.py); `Layout()` for
  leaves without a row in `gemma.model.weights`."""
  info = weight_info(name)
  if info is None:
    return Layout()
  return Layout(batch_ndim=info.batch_ndim, in_ndim=info.in_ndim, in_last=info.in_last)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A quantizer per tensor class (absent: keep float) and the dtype of what stays float.

  tensors: per-tensor overrides by dotted leaf name (bit allocation): (name, spec or None for
  float), taking precedence over the class's spec. calibration: how the weights were calibrated
  (a record for the checkpoint's config; the stored format does not depend on it).
  """

  name: str
  specs: tuple[tuple[str, QuantSpec], ...] = ()
  float_dtype: str = "bfloat16"
  tensors: tuple[tuple[str, QuantSpec | None], ...] = ()
  calibration: str = ""

  def spec_for(self, cls: str | None) -> QuantSpec | None:
    return dict(self.specs).get(cls)

  def spec_of(self, name: str) -> QuantSpec | None:
    """The quantizer of the params leaf `name` (override, else its class's), None: float."""
    overrides = dict(self.tensors)
    if name in overrides:
      return overrides[name]
    return self.spec_for(tensor_class(name))


def tq(bits: int, **kw) -> QuantSpec:
  return QuantSpec(method="tq", bits=bits, **kw)


def _rtn(bits: int) -> QuantSpec:
  return QuantSpec(method="int", bits=bits, rotation="none")


_WEIGHTS = ("embed", "attention", "mlp", "experts", "ple_table", "ple_proj")  # router stays float


def uniform(name: str, spec: QuantSpec) -> Recipe:
  return Recipe(name, tuple((cls, spec) for cls in _WEIGHTS))


RECIPES: dict[str, Recipe] = {
    "bf16": Recipe("bf16"),
    "tq4": uniform("tq4", tq(4)),
    "tq3": uniform("tq3", tq(3)),
    "tq2": uniform("tq2", tq(2)),
    # 4 bits where errors reach every token directly (embedding / LM head, attention, PLE
    # projections), 3 bits for the bulk of the weights (FFN, experts, PLE table).
    "tq-mixed": Recipe("tq-mixed", (
        ("embed", tq(4)), ("attention", tq(4)), ("ple_proj", tq(4)),
        ("mlp", tq(3)), ("experts", tq(3)), ("ple_table", tq(3)))),
    "int8": uniform("int8", _rtn(8)),
    "int4": uniform("int4", _rtn(4)),
    "nf4": uniform("nf4", QuantSpec(method="nf4", bits=4, rotation="none")),
    # Remedies for 4-bit TurboQuant (QuantSpec.scale_fit: 'unbiased' removes the shrinkage,
    # 'lsq' fits the least-squares scale), for ablations.
    "tq4-unbiased": uniform("tq4-unbiased", tq(4, scale_fit="unbiased")),
    "tq4-lsq": uniform("tq4-lsq", tq(4, scale_fit="lsq")),
    "tq4-g64-lsq": uniform("tq4-g64-lsq", tq(4, block=64, scale_fit="lsq")),
    # The tied embedding / LM head at int8 (it dominates the error of small models), rest tq4-lsq.
    # Codebooks that are odd polynomials of the code (+0.2% weight MSE at 3 and 4 bits): the
    # kernel computes values with FMAs instead of a 2^b - 1 select tree.
    "tq4-poly": uniform("tq4-poly", tq(4, law="poly")),
    "tq3-poly": uniform("tq3-poly", tq(3, law="poly")),
    "tq4-embed8": Recipe("tq4-embed8", (("embed", _rtn(8)),) + tuple(
        (cls, tq(4, scale_fit="lsq")) for cls in _WEIGHTS if cls != "embed")),
}


NAMED = tuple(RECIPES)  # the recipes above; the grid of variants below is generated


def _family(base: str, block: int) -> QuantSpec:
  if base == "nf4":
    return QuantSpec(method="nf4", bits=4, block=block, rotation="none")
  if base.startswith("int"):
    return QuantSpec(method="int", bits=int(base[3:]), block=block, rotation="none")
  return tq(int(base[2:]), block=block)


# Grid x group size x embedding width, for calibrated comparisons at equal bits:
# "<base>[-g64|-g32][-embed8]", e.g. nf4-g32-embed8 = int8 embedding, NF4 in groups of 32 elsewhere.
for _base in ("tq2", "tq3", "tq4", "tq5", "nf4", "int4"):
  for _g, _gname in ((128, ""), (64, "-g64"), (32, "-g32")):
    for _embed8 in (False, True):
      _name = _base + _gname + ("-embed8" if _embed8 else "")
      if _name not in RECIPES:
        _layers = uniform(_name, _family(_base, _g)).specs
        RECIPES[_name] = Recipe(_name, tuple(
            (cls, _rtn(8) if _embed8 and cls == "embed" else spec) for cls, spec in _layers))


def get_recipe(name: str) -> Recipe:
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
  return RECIPES[name]


def resolve(recipe: Recipe | str) -> Recipe:
  return get_recipe(recipe) if isinstance(recipe, str) else recipe


def recipe_to_dict(recipe: Recipe) -> dict:
  """JSON-ready form of a recipe (stored in quantized checkpoints)."""
  out = {"name": recipe.name, "float_dtype": recipe.float_dtype,
         "specs": {cls: dataclasses.asdict(spec) for cls, spec in recipe.specs}}
  if recipe.tensors:
    out["tensors"] = {name: None if spec is None else dataclasses.asdict(spec)
                      for name, spec in recipe.tensors}
  if recipe.calibration:
    out["calibration"] = recipe.calibration
  return out


def recipe_from_dict(data: dict) -> Recipe:
  """Inverse of `recipe_to_dict`; ValueError naming the problem on a malformed entry."""
  try:
    specs = tuple((cls, QuantSpec(**spec)) for cls, spec in data["specs"].items())
    unknown = sorted(cls for cls, _ in specs if cls not in CLASSES)
    if unknown:
      raise ValueError(f"unknown tensor classes {unknown}")
    tensors = tuple((str(name), None if spec is None else QuantSpec(**spec))
                    for name, spec in data.get("tensors", {}).items())
    return Recipe(str(data["name"]), specs, str(data.get("float_dtype", "bfloat16")), tensors,
                  str(data.get("calibration", "")))
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise ValueError(f"invalid quantization recipe {data!r}: {e}") from None


def quantize(w: jax.Array, spec: QuantSpec, layout: Layout = MATH_LAYOUT) -> QArray:
  """Quantizes one weight with any method."""
  if spec.method in ("tq", "tq_prod"):
    return turboquant.quantize_weight(w, spec, layout)
  return baselines.quantize_weight(w, spec, layout)


def quantizer(recipe: Recipe | str, float_dtype=None) -> Callable[[str, jax.Array], object]:
  """(params leaf name, weight) -> its QArray under `recipe`, or the weight itself (cast to
  `float_dtype` when given) for tensors the recipe keeps in float. This is the per-tensor hook
  checkpoint loaders call, so a model is quantized while it streams in."""
  recipe = resolve(recipe)

  def finish(name: str, leaf: jax.Array):
    spec = recipe.spec_of(name)
    if spec is not None:
      return quantize(leaf, spec, layout_of(name))
    return leaf if float_dtype is None else leaf.astype(jnp.dtype(float_dtype))

  return finish


def quantize_params(params: P.Params, recipe: Recipe | str) -> P.Params:
  """The params tree with every weight of a quantized class replaced by its QArray.

  Each weight is quantized by one jitted call (compiled once per shape), so layers of equal
  shapes share a compilation; the float weights are kept as they are.
  """
  finish = quantizer(recipe)
  return jax.tree_util.tree_map_with_path(lambda p, x: finish(P.path_name(p), x), params)

"""One table of the model's weights: what sharding, quantization and LoRA each need to know.

A row per weight kind of `gemma.model.params` (leaf names "embed", "layers.N.attn.q", ...):

  logical axes   named axes of the math-layout weight (see gemma/model/notation.py), which
                 `gemma.parallel.sharding` maps to mesh axes
  quant class    the recipe class that chooses its quantizer (`gemma.quant.recipes`)
  layout         batch / input / output axes: batch_ndim leading batch axes (experts), then
                 in_ndim contracted input axes and the outputs ([*batch, *in, *out]), or with
                 in_last the inputs last ([*batch, *out, *in]: tables read by row); plain ints
                 here, `gemma.quant.recipes.layout_of` makes the `Layout`
  LoRA target    the name `--lora-targets` uses for it (None: not adapted)

Norm scales, layer scalars and router / expert scales have no row: they are replicated, stay
float and are never adapted.

  weight_info("layers.3.attn.o")   # WeightInfo(name="attn.o", per_layer=True, in_ndim=2, ...)
  weight_info("layers.3.attn.q_norm") is None
"""

from __future__ import annotations

import dataclasses
import re

Axes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class WeightInfo:
  """One weight kind. `name` is the leaf name ("embed") or, with per_layer, the part after
  "layers.N." ("attn.q")."""

  name: str
  per_layer: bool
  axes: Axes  # logical axes, one per dimension
  quant_class: str  # recipe class
  batch_ndim: int = 0
  in_ndim: int = 1
  in_last: bool = False
  lora_target: str | None = None


def _top(name, axes, cls, **kw) -> WeightInfo:
  return WeightInfo(name, False, axes, cls, **kw)


def _layer(name, axes, cls, **kw) -> WeightInfo:
  return WeightInfo(name, True, axes, cls, **kw)


WEIGHTS: tuple[WeightInfo, ...] = (
    # [V, D]: the token table and the tied LM head ('btd,vd->btv'); rows are read by token id
    _top("embed", ("vocab", "embed"), "embed", in_last=True),
    # [V_ple, L, P]: per-layer-embedding table, read by row
    _top("ple_embed", ("vocab", None, None), "ple_table", in_last=True),
    _top("ple_proj", ("embed", None, None), "ple_proj"),  # [D, L, P]
    _layer("attn.q", ("embed", "heads", "head_dim"), "attention", lora_target="q"),  # [D, N, H]
    _layer("attn.k", ("embed", "kv_heads", "head_dim"), "attention", lora_target="k"),  # [D, K, H]
    _layer("attn.v", ("embed", "kv_heads", "head_dim"), "attention", lora_target="v"),  # [D, K, H]
    _layer("attn.o", ("heads", "head_dim", "embed"), "attention", in_ndim=2,
           lora_target="o"),  # [N, H, D]
    _layer("mlp.gate", ("embed", "ffn"), "mlp", lora_target="gate"),  # [D, F]
    _layer("mlp.up", ("embed", "ffn"), "mlp", lora_target="up"),  # [D, F]
    _layer("mlp.down", ("ffn", "embed"), "mlp", lora_target="down"),  # [F, D]
    # fused at load (`gemma.model.fused`): [D, (N + K + K)·H] and [D, 2F]; LoRA adapts the
    # separate weights (`fused.unfuse`)
    _layer("attn.qkv", ("embed", None), "attention"),
    _layer("mlp.gate_up", ("embed", None), "mlp"),
    _layer("moe.router", ("embed", None), "router"),  # [D, E]
    _layer("moe.gate", ("expert", "embed", "expert_ffn"), "experts", batch_ndim=1),  # [E, D, I]
    _layer("moe.up", ("expert", "embed", "expert_ffn"), "experts", batch_ndim=1),  # [E, D, I]
    _layer("moe.down", ("expert", "expert_ffn", "embed"), "experts", batch_ndim=1),  # [E, I, D]
    _layer("ple.gate", ("embed", None), "ple_proj"),  # [D, P]
    _layer("ple.proj", (None, "embed"), "ple_proj"),  # [P, D]
)

_BY_NAME = {w.name: w for w in WEIGHTS}
_LAYER_LEAF = re.compile(r"layers\.\d+\.([^.]+\.[^.]+)")


def weight_info(name: str) -> WeightInfo | None:
  """The row of the params leaf `name` ("layers.3.attn.q", "embed"); None for norms, scalars
  and names that are not params leaves."""
  m = _LAYER_LEAF.fullmatch(name)
  info = _BY_NAME.get(m.group(1) if m else name)
  return info if info is not None and info.per_layer == (m is not None) else None


def weight_info_by_suffix(name: str) -> WeightInfo | None:
  """The row whose name ends the dotted `name`: a params leaf inside a larger tree too
  ("opt_state.0.mu.layers.3.attn.q", "trainable.embed"); None when no row's name does."""
  parts = name.split(".")
  return _BY_NAME.get(".".join(parts[-2:])) or _BY_NAME.get(parts[-1])


def lora_targets() -> dict[str, WeightInfo]:
  """{LoRA target name: its row}, in table order (q, k, v, o, gate, up, down)."""
  return {w.lora_target: w for w in WEIGHTS if w.lora_target is not None}

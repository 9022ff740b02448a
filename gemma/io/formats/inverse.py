"""A loader's name table run backwards: params -> the tensors a checkpoint of that format holds.

Every format's `RegexTable` row says which source tensor fills which params and by which named
transform (`gemma.io.formats.common`). Exporting walks the same rows the other way, so one table
describes both directions:

  source name   the row's regex with its groups filled in ("layers.3.mlp.gate_proj.weight")
  tensor        the transform's inverse applied to the row's params (`INVERSES`)

The first row that can produce a param wins (a format with two spellings of one tensor, such as
GGUF's fused or separate expert gate/up, is written in the first). Skipped rows (targets None)
produce nothing; the exporter adds what a table does not hold (config, tokenizer).

  for name, array in source_tensors(hf.TABLE, named_arrays(params)): ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np

from gemma.io.formats.common import (
  RegexTable,
  linear,
  minus_one,
  same,
  split_gate_up,
  swap_last,
)
from gemma.model import fused
from gemma.model.config import ModelConfig
from gemma.model.params import Params, path_name
from gemma.model.weights import weight_info
from gemma.quant.qarray import QArray, dequantize


def _inv_same(arrays, names):
  # [V, L, P] -> [V, L*P]: a stored tensor is at most 2-D where ours splits axes
  a = arrays[0]
  return a.reshape(a.shape[0], -1) if a.ndim > 2 else a


def _inv_linear(arrays, names):
  # [*in, *out] -> nn.Linear [out, in]
  a, info = arrays[0], weight_info(names[0])
  k = info.in_ndim if info is not None else 1
  return a.reshape(math.prod(a.shape[:k]), -1).T


def _inv_swap_last(arrays, names):
  return np.swapaxes(arrays[0], -1, -2)  # [E, I, D] <-> [E, D, I]


def _inv_split_gate_up(arrays, names):
  # two [E, D, I] -> fused [E, 2I, D] (gate rows first)
  return np.concatenate([np.swapaxes(a, 1, 2) for a in arrays], axis=1)


def _inv_minus_one(arrays, names):
  return arrays[0] + np.asarray(1, arrays[0].dtype)  # stored as 1 + w


# transform -> its inverse (params of the row, their names) -> the stored tensor
INVERSES: dict[Callable, Callable] = {
    same: _inv_same, linear: _inv_linear, swap_last: _inv_swap_last,
    split_gate_up: _inv_split_gate_up, minus_one: _inv_minus_one,
}

_GROUP = re.compile(r"\([^)]*\)")


def _source_name(pattern: str, groups: tuple[str, ...]) -> str:
  """A row's regex with its groups filled in: layers\\.(\\d+)\\.x -> layers.3.x."""
  it = iter(groups)
  filled = _GROUP.sub(lambda _: next(it), pattern.removesuffix("$"))
  return filled.replace("\\", "")


def _target_regex(template: str) -> re.Pattern:
  """A param name template ("layers.{0}.attn.q") as a regex whose groups are the fields."""
  parts = re.split(r"\{\d+\}", template)
  return re.compile(r"(\d+)".join(re.escape(p) for p in parts))


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def source_tensors(table: RegexTable, named: dict[str, np.ndarray]
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """(source name, tensor) for every param in `named` ({param name: array}), through the first
  row of `table` that produces it; raises ValueError naming the params no row produces."""
  remaining = dict(named)
  for pattern, targets, fn in table.rows:
    if targets is None:
      continue
    if fn not in INVERSES:
      raise ValueError(f"transform {getattr(fn, '__name__', fn)} has no inverse")
    first = _target_regex(targets[0])
    for name in sorted(remaining, key=_natural):
      m = first.fullmatch(name)
      if m is None or name not in remaining:
        continue
      names = [t.format(*m.groups()) for t in targets]
      if not all(n in remaining for n in names):
        continue
      arrays = [remaining.pop(n) for n in names]
      yield _source_name(pattern.pattern, m.groups()), INVERSES[fn](arrays, names)
  if remaining:
    raise ValueError(f"no tensor of this format holds {sorted(remaining, key=_natural)[:6]}")


def named_arrays(params: Params, cfg: ModelConfig, dtype=None) -> tuple[dict[str, np.ndarray],
                                                                      list[str]]:
  """({param name: host array}, notes) of params as a checkpoint stores them: fused projections
  split (`gemma.model.fused.unfuse`), quantized weights dequantized, floats cast to `dtype`
  (None: each leaf's own dtype). `notes` says what the export loses: quantized leaves written
  as their dequantized values (the codes themselves are not kept) and narrowing casts."""
  params = fused.unfuse(params, cfg)
  # a QArray is one leaf here (leaf_names would name its codes, scales, ... separately)
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))
  out, dequantized, narrowed = {}, [], set()
  for path, leaf in flat:
    name = path_name(path)
    if isinstance(leaf, QArray):
      dequantized.append(name)
      leaf = dequantize(leaf)
    want = np.dtype(dtype or leaf.dtype)
    if np.finfo(want).bits < np.finfo(leaf.dtype).bits:
      narrowed.add(f"{leaf.dtype} -> {want}")
    out[name] = np.asarray(jax.device_get(leaf)).astype(want)
  notes = []
  if dequantized:
    notes.append(f"{len(dequantized)} quantized weights written as their dequantized values "
                 f"in {np.dtype(dtype or 'float32').name} (e.g. {dequantized[0]}): the same "
                 "function, not the same storage; quantize again to get the codes back")
  notes += [f"cast {c}: values rounded" for c in sorted(narrowed)]
  return out, notes


def source_name(table: RegexTable, param: str) -> str | None:
  """The source tensor name that `table`'s first row producing `param` gives it
  ("layers.3.attn.q" -> "layers.3.self_attn.q_proj.weight" in `hf.TABLE`); None if no row does
  (a row that fills several params, such as fused gate/up, names the tensor that holds them)."""
  for pattern, targets, _ in table.rows:
    for template in targets or ():
      m = _target_regex(template).fullmatch(param)
      if m is not None:
        return _source_name(pattern.pattern, m.groups())
  return None

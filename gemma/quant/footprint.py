"""Bytes of a model under a recipe, from `gemma.model.params.abstract(cfg)` (nothing is allocated).

`quantized_abstract(cfg, recipe)` is the params tree with `QArray`s of `jax.ShapeDtypeStruct`s in
place of quantized weights: the exact shapes `recipes.quantize_params` produces (a test checks it
against `jax.eval_shape`). Run `python -m gemma.quant.footprint` for the table of every preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from gemma.kv import quant as kvq
from gemma.kv.cache import cache_size
from gemma.model import config as C
from gemma.model import params as P
from gemma.quant import packing
from gemma.quant.qarray import Layout, QArray, QuantSpec, plan_block
from gemma.quant.recipes import CLASSES, NAMED, RECIPES, Recipe, get_recipe, layout_of, tensor_class

GIB = 2 ** 30


@functools.lru_cache(maxsize=4096)
def abstract_qarray(shape: tuple[int, ...], dtype: str, spec: QuantSpec, layout: Layout) -> QArray:
  """The QArray that quantizing a `shape` weight gives, with ShapeDtypeStruct children."""
  batch, in_shape, out_shape = layout.split(shape)
  g, n_pad = plan_block(math.prod(in_shape), spec.block)
  spec = dataclasses.replace(spec, block=g)

  def stored(m, dt):
    s = (*batch, *out_shape, m) if layout.in_last else (*batch, m, *out_shape)
    return jax.ShapeDtypeStruct(s, dt)

  words = packing.packed_length(n_pad, spec.code_bits)
  scales = stored(n_pad // g, jnp.dtype(spec.scale_dtype))
  prod = spec.method == "tq_prod"
  return QArray(codes=stored(words, jnp.uint32), scales=scales,
                qjl=stored(packing.packed_length(n_pad, 1), jnp.uint32) if prod else None,
                gamma=scales if prod else None, spec=spec, layout=layout, shape=shape,
                dtype_name=dtype)


def quantized_abstract(cfg: C.ModelConfig, recipe: Recipe | str, dtype=jnp.bfloat16,
                       float_dtype=None):
  """abstract(cfg) with quantized classes as abstract QArrays (of weights in `dtype`) and the
  rest in `float_dtype` (default: recipe.float_dtype)."""
  recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
  float_dtype = jnp.dtype(float_dtype or recipe.float_dtype)

  def one(path, leaf):
    name = P.path_name(path)
    spec = recipe.spec_of(name)
    if spec is None:
      return jax.ShapeDtypeStruct(leaf.shape, float_dtype)
    return abstract_qarray(tuple(leaf.shape), jnp.dtype(dtype).name, spec, layout_of(name))

  return jax.tree_util.tree_map_with_path(one, P.abstract(cfg, dtype))


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def size_report(tree) -> dict:
  """Stored bytes of a params tree (arrays or ShapeDtypeStructs; QArrays or float leaves).

  Returns:
    {"total_bytes", "params", "bits_per_weight" (all leaves, norms and scales included),
     "quantized_bits_per_weight" (QArray leaves only; None when nothing is quantized),
     "classes": {tensor class or "float": {"bytes", "params"}}}.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, QArray))
  classes = {c: dict(bytes=0, params=0) for c in (*CLASSES, "float")}
  q_bytes = q_params = 0
  for path, leaf in leaves:
    c = classes[tensor_class(P.path_name(path)) or "float"]
    c["bytes"] += _nbytes(leaf)
    c["params"] += math.prod(leaf.shape)
    if isinstance(leaf, QArray):
      q_bytes, q_params = q_bytes + _nbytes(leaf), q_params + leaf.size
  classes = {k: v for k, v in classes.items() if v["params"]}
  total = sum(v["bytes"] for v in classes.values())
  n = sum(v["params"] for v in classes.values())
  return dict(total_bytes=total, params=n, bits_per_weight=8 * total / n,
              quantized_bits_per_weight=8 * q_bytes / q_params if q_params else None,
              classes=classes)


def footprint(cfg: C.ModelConfig, recipe: Recipe | str) -> dict:
  """`size_report` of the preset `cfg` under a recipe, computed from shapes alone."""
  return size_report(quantized_abstract(cfg, recipe))


def kv_cache_bytes(cfg: C.ModelConfig, context: int, batch: int = 1, itemsize: int = 2,
                   kv_quant=None) -> int:
  """Bytes `gemma.kv.cache.init_cache(cfg, batch, context, kv_quant=...)` allocates (every leaf).

  kv_quant: None (K/V of `itemsize` bytes), "bf16" / "f32", or a TurboQuant width ("tq3.5",
  "tq3.5+s1+r128", or a `gemma.kv.quant.KVQuant`): codes, signs and float16 norms per slot, the
  per-row means, scales and channel orders, the bfloat16 sink and recent window, and the shared
  rotations.
  """
  spec = None
  if isinstance(kv_quant, str) and kv_quant in kvq.FLOAT_CACHES:
    itemsize = jnp.dtype(kvq.FLOAT_CACHES[kv_quant]).itemsize
  elif kv_quant is not None:
    spec = kvq.get_kv_quant(kv_quant)
  total = 4 + 4 * batch  # length, next_pos
  head_dims = set()
  for ls in cfg.layers:
    if ls.shares_kv:
      continue
    slots = cache_size(cfg, ls.index, context)
    k, h = ls.num_kv_heads, ls.head_dim
    total += batch * slots * 4  # positions
    if spec is None:
      total += 2 * batch * slots * k * h * itemsize
      continue
    head_dims.add(h)
    total += batch * slots * k * kvq.vector_bytes(spec, h)
    per_row = 2 * (spec.parts > 1) + 2 * spec.center + spec.query_scaling  # [K, H] f32 arrays
    total += per_row * batch * k * h * 4
    # bfloat16 K/V and positions of the newest tokens and of the sink
    exact = min(spec.recent, slots) + spec.sink
    total += batch * exact * (2 * k * h * jnp.dtype(kvq.EXACT_DTYPE).itemsize + 4)
  if spec is not None:
    total += kvq.codec_bytes(spec, head_dims)
  return total


def kv_table(presets=("gemma4-31b", "gemma4-e4b"), contexts=(8192, 131_072),
             kinds=("bf16", *kvq.WIDTHS, "tq3.5+s1+r128")) -> str:
  """A text table: KV cache GiB and bytes per token (batch 1) at each context, from shapes."""
  lines = [f"{'preset':<14}{'kv':<15}{'bits/ch':>8}" + "".join(
      f"{'GiB@' + str(c):>12}{'B/tok@' + str(c):>14}" for c in contexts)]
  for name in presets:
    cfg = C.get_preset(name)
    for kind in kinds:
      bits = 16.0 if kind == "bf16" else kvq.bits_per_channel(
          kvq.get_kv_quant(kind), cfg.global_head_dim or cfg.head_dim)
      row = f"{name:<14}{kind:<15}{bits:>8.3f}"
      for c in contexts:
        b = kv_cache_bytes(cfg, c, kv_quant=kind)
        row += f"{b / GIB:>12.3f}{b / c:>14,.0f}"
      lines.append(row)
  return "\n".join(lines)


def table(presets=tuple(C.PRESETS), recipes=NAMED, context: int = 32_768) -> str:
  """A text table: GiB and bits per weight of each preset under each recipe, plus the KV cache."""
  lines = [f"{'preset':<16}{'recipe':<10}{'GiB':>8}{'bits/w':>8}{'+kv@' + str(context):>12}"
           f"  per class GiB"]
  for name in presets:
    cfg = C.get_preset(name)
    kv = kv_cache_bytes(cfg, context)
    for r in recipes:
      f = footprint(cfg, r)
      per = " ".join(f"{k}={v['bytes'] / GIB:.2f}" for k, v in f["classes"].items())
      lines.append(f"{name:<16}{r:<10}{f['total_bytes'] / GIB:>8.2f}"
                   f"{f['bits_per_weight']:>8.3f}{(f['total_bytes'] + kv) / GIB:>12.2f}  {per}")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--presets", nargs="*", default=list(C.PRESETS))
  ap.add_argument("--recipes", nargs="*", default=list(NAMED), choices=list(RECIPES))
  ap.add_argument("--context", type=int, default=32_768, help="KV cache length (bf16, batch 1)")
  ap.add_argument("--kv", action="store_true",
                  help="print the KV cache table (31B and E4B at 8K and 128K, every --kv-quant)")
  args = ap.parse_args(argv)
  print(kv_table() if args.kv else table(args.presets, args.recipes, args.context))


if __name__ == "__main__":
  main()

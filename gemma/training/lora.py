"""LoRA adapters: W' = W + (α/r)·A B on chosen projections, through the one matmul dispatch.

A weight of shape [in..., out...] (math layout, see gemma/model/notation.py) gets A [in..., R] and
B [R, out...]. `with_adapters` swaps the targeted leaves for `LoraWeight`s, which
`gemma.model.layers.einsum` runs as einsum(x, W) + (α/r)·(x A) B: the base may be float or quantized
(`QArray`, QLoRA), the model code is unchanged. `merge` folds the adapters into float weights.

Targets (the `lora_target`s of `gemma.model.weights`; leaf names end in them): attention q, k, v,
o and the dense MLP gate, up, down. MoE experts and per-layer-embedding projections are not
adapted.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma.model import layers, weights
from gemma.model.params import Params, path_name, pytree_dataclass
from gemma.quant.qarray import QArray

# target -> (leaf-name suffix, number of input axes of the weight), from the weight table
TARGETS = {t: (w.name, w.in_ndim) for t, w in weights.lora_targets().items()}
DEFAULT_TARGETS = tuple(TARGETS)


@pytree_dataclass
class LoraPair:
  a: jax.Array  # [in..., R]
  b: jax.Array  # [R, out...]


@pytree_dataclass
class LoraWeight:
  """A frozen base weight plus a trainable low-rank update (what `layers.einsum` dispatches on)."""

  base: jax.Array | QArray  # [in..., out...]
  a: jax.Array  # [in..., R]
  b: jax.Array  # [R, out...]
  scale: float = dataclasses.field(metadata=dict(static=True))  # α / r

  def __gemma_einsum__(self, spec: str, x: jax.Array, out_dtype=None) -> jax.Array:
    out = layers.einsum(spec, x, self.base, jnp.float32)
    out = out + self.scale * delta_einsum(spec, x, self.a, self.b)
    return out.astype(out_dtype or x.dtype)


def _target_of(name: str, targets) -> str | None:
  for t in targets:
    if t not in TARGETS:
      raise ValueError(f"unknown LoRA target {t!r}; valid: {', '.join(TARGETS)}")
    if name.endswith("." + TARGETS[t][0]) and ".moe." not in name:
      return t
  return None


def _is_weight(x) -> bool:
  return isinstance(x, QArray)


def init_adapters(key: jax.Array, params: Params, rank: int, targets=DEFAULT_TARGETS,
                  dtype=jnp.float32) -> dict[str, LoraPair]:
  """Adapters for every targeted weight: A ~ N(0, 1/fan_in), B = 0 (the model starts unchanged).

  Returns {leaf name ("layers.3.attn.q"): LoraPair}.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_weight)[0]:
    name = path_name(path)
    t = _target_of(name, targets)
    if t is not None:
      found.append((name, tuple(leaf.shape), TARGETS[t][1]))
  if not found:
    raise ValueError(f"no weight matches the LoRA targets {tuple(targets)}")
  keys = jax.random.split(key, len(found))
  out = {}
  for (name, shape, n_in), k in zip(found, keys, strict=True):
    fan_in = math.prod(shape[:n_in])
    a = jax.random.normal(k, (*shape[:n_in], rank), jnp.float32) / math.sqrt(fan_in)
    out[name] = LoraPair(a=a.astype(dtype), b=jnp.zeros((rank, *shape[n_in:]), dtype))
  return out


def with_adapters(params: Params, adapters: dict[str, LoraPair], scale: float) -> Params:
  """params with each adapted leaf replaced by a `LoraWeight` (scale = α / r)."""
  missing = set(adapters)

  def swap(path, leaf):
    name = path_name(path)
    if name not in adapters:
      return leaf
    missing.discard(name)
    pair = adapters[name]
    return LoraWeight(base=leaf, a=pair.a, b=pair.b, scale=scale)

  out = jax.tree_util.tree_map_with_path(swap, params, is_leaf=_is_weight)
  if missing:
    raise ValueError(f"adapters for weights the model does not have: {sorted(missing)[:5]}")
  return out


def delta_einsum(spec: str, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """(x A) B for `jnp.einsum(spec, x, W)` with W [in..., out...] = A [in..., R] B [R, out...].

  Returns float32 in the spec's output layout.
  """
  inputs, out = spec.split("->")
  xs, ws = inputs.split(",")
  n_in = a.ndim - 1
  w_in, w_out = ws[:n_in], ws[n_in:]
  if any(c not in xs for c in w_in) or any(c in xs for c in w_out):
    raise ValueError(f"LoRA needs the weight's input axes first; got {spec!r} for A{a.shape}")
  r = next(c for c in "rzyxwuqjmo" if c not in spec)
  rest = "".join(c for c in xs if c not in w_in)
  # [x..., in...] · [in..., R] -> [x..., R]
  t = jnp.einsum(f"{xs},{w_in}{r}->{rest}{r}", x, a.astype(x.dtype),
                 preferred_element_type=jnp.float32)
  # [x..., R] · [R, out...] -> out
  return jnp.einsum(f"{rest}{r},{r}{w_out}->{out}", t, b.astype(jnp.float32),
                    preferred_element_type=jnp.float32)


def merge(params: Params, adapters: dict[str, LoraPair], scale: float) -> Params:
  """Float params with W + scale·A B folded in (for inference without adapters)."""

  def fold(path, leaf):
    name = path_name(path)
    if name not in adapters:
      return leaf
    if isinstance(leaf, QArray):
      raise ValueError(f"cannot merge LoRA into the quantized weight {name}; merge into the "
                       "float base checkpoint, then quantize")
    pair = adapters[name]
    n_in = pair.a.ndim - 1
    a = pair.a.astype(jnp.float32).reshape(-1, pair.a.shape[-1])
    b = pair.b.astype(jnp.float32).reshape(pair.b.shape[0], -1)
    # [I, R] · [R, O] -> [in..., out...]
    update = (a @ b).reshape(*pair.a.shape[:n_in], *pair.b.shape[1:])
    return (leaf.astype(jnp.float32) + scale * update).astype(leaf.dtype)

  missing = set(adapters) - {path_name(p) for p, _ in
                             jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_weight)[0]}
  if missing:
    raise ValueError(f"adapters for weights the model does not have: {sorted(missing)[:5]}")
  return jax.tree_util.tree_map_with_path(fold, params, is_leaf=_is_weight)

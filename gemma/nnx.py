"""The model as a Flax NNX module: the same functional core, the same params tree.

  import gemma, gemma.nnx, optax
  from flax import nnx
  module = gemma.nnx.from_model(gemma.load("path/to/checkpoint"))   # shares the weight arrays
  logits, _ = module(tokens)                    # == gemma.model.transformer.forward(params, ...)
  module.add_lora(rank=8, alpha=16.0, key=jax.random.key(0))
  opt = nnx.Optimizer(module, optax.adamw(1e-4), wrt=nnx.LoRAParam)
  params, adapters = module.to_params(), module.adapters()   # back to the functional world

`Gemma` holds the `Params` pytree with every array leaf wrapped in an `nnx.Param` whose
`out_sharding` metadata is the leaf's logical axes (`gemma.parallel.sharding.logical_axes`: the
weight table), quantized `QArray` leaves wrapped in `Quantized` (a plain `nnx.Variable`: frozen,
never differentiated nor updated by an optimizer over `nnx.Param`), and LoRA factors as
`nnx.LoRAParam` {leaf name: LoraPair(a, b)} made by `gemma.training.lora.init_adapters`.
`__call__` unwraps the variables back into `Params` (adapted leaves as `LoraWeight`, as the
functional fine-tuning step does) and calls `forward`: nothing of the model is reimplemented, so
the module's logits and gradients are the functional path's. `nnx.state`, `nnx.split` /
`nnx.merge`, `nnx.eval_shape`, `nnx.jit`, `nnx.grad`, `nnx.Optimizer` and Orbax checkpoints of
`nnx.state(module)` work as for any NNX module.

What Flax replaces here, and what it does not:
  * Variable types and metadata: each `nnx.Param` carries its logical axes as `out_sharding`
    (looked up once from the weight table), so Flax tooling (`nnx.get_partition_spec`,
    `nnx.logical_axis_rules`) reads them off the state, and `nnx.Optimizer(...,
    wrt=nnx.LoRAParam)` / `nnx.DiffState` select what trains by variable type where the
    functional loop passes separate `trainable` / `frozen` trees.
  * The params stay `gemma.model.params.Params` (`pytree_dataclass`), traversed by NNX as a
    generic pytree, not rebuilt as `nnx.Module`s / `flax.struct.dataclass`: the tree's dotted leaf
    names are the key of every checkpoint-format name table, the weight table, quantization
    recipes and LoRA targets; its leaves may be `QArray` / `LoraWeight` pytrees that dispatch in
    `gemma.model.layers.einsum`; and the functional core (`forward` under `jax.jit` with a
    static, hashable `ModelConfig`) stays free of Flax. `flax.struct.dataclass` would only
    restate `jax.tree_util.register_dataclass`, which `pytree_dataclass` already is.
  * Flax's logical partitioning rules (`nnx.logical_axis_rules`, `sharding_rules` metadata) map
    each logical axis to one fixed mesh axis; ours (`gemma.parallel.sharding.RULES`) depend on
    the shape: an axis the mesh axis does not divide stays replicated (1 KV head on 8 shards),
    `expert` falls back to `model`, a mesh axis is used once per tensor, and a `QArray` splits
    only along whole rotation blocks. So variables are created with `eager_sharding=False`
    (logical names are not mesh axes) and `partition_specs` / `shard` apply our rules to the
    variables' `out_sharding`: the placement is the functional path's, leaf for leaf.
  * LoRA factors are annotated replicated (all `None`), as the functional loop places them.
  * `nnx.LoRA` / `nnx.LoRALinear` do not replace `gemma.training.lora`: they adapt a 2-D
    `nnx.Linear` kernel, ours adapt multi-axis math-layout weights ([D, N, H], [N, H, D]) and
    quantized bases through the one `einsum` dispatch. Only their variable type
    (`nnx.LoRAParam`) is used.

Tunix's `PeftTrainer` takes the module as it is (it finds the `nnx.LoRAParam`s and trains them
with `nnx.Optimizer(..., wrt=nnx.LoRAParam)`); give it a loss with `with_loss_fn`, since its
default loss calls `model(tokens, positions, cache, attention_mask)` and `forward` builds its
masks from positions (-1 for padding) instead of taking one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma.kv.cache import KVCache
from gemma.model import fused
from gemma.model.config import ModelConfig
from gemma.model.params import Params, path_name
from gemma.model.transformer import forward
from gemma.parallel import sharding
from gemma.quant.qarray import QArray
from gemma.training import lora as lora_lib
from gemma.training.lora import DEFAULT_TARGETS, LoraPair, LoraWeight

__all__ = ["Gemma", "Quantized", "from_model", "from_params", "partition_specs", "shard",
           "to_params"]

LORA_MODES = (None, "wrap", "merge")


class Quantized(nnx.Variable):
  """A frozen quantized weight: its value is a `QArray` pytree (codes, scales, ...).

  Not an `nnx.Param`, so `nnx.grad` / `nnx.Optimizer` over `nnx.Param` or `nnx.LoRAParam`
  never touch it (QLoRA trains adapters on top). Metadata `logical_axes`: the float weight's
  logical axes, which `gemma.parallel.sharding.qarray_spec` places.
  """


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _is_qarray(x) -> bool:
  return isinstance(x, QArray)


def _is_weight(x) -> bool:
  """A leaf of a params tree that is a pytree itself (a quantized or a LoRA-wrapped weight)."""
  return isinstance(x, QArray | LoraWeight)


def _wrap_leaf(path, leaf):
  """One params leaf -> its variable: `nnx.Param` (array) or `Quantized` (QArray)."""
  name = path_name(path)
  if isinstance(leaf, QArray):
    return Quantized(leaf, logical_axes=sharding.logical_axes(name, leaf.ndim),
                     eager_sharding=False)
  if isinstance(leaf, LoraWeight):
    raise TypeError(f"{name} is a LoraWeight: pass the base params and the adapters "
                    "(`adapters=`, `lora_scale=`) separately")
  if not hasattr(leaf, "shape"):
    raise TypeError(f"{name}: cannot hold a {type(leaf).__name__} as a variable")
  return nnx.Param(leaf, out_sharding=sharding.logical_axes(name, len(leaf.shape)),
                   eager_sharding=False)


def _wrap_adapters(adapters: dict[str, LoraPair]) -> dict[str, LoraPair]:
  """{name: LoraPair(a [in..., R], b [R, out...])} -> the same with `nnx.LoRAParam` leaves."""

  def one(name, x):
    # the logical axes the functional loop gives "trainable.<name>.a": replicated
    return nnx.LoRAParam(x, out_sharding=sharding.logical_axes(name, len(x.shape)),
                         eager_sharding=False)

  return {name: LoraPair(a=one(f"{name}.a", pair.a), b=one(f"{name}.b", pair.b))
          for name, pair in adapters.items()}


def _values(tree):
  """A tree of variables -> the same tree of their values."""
  return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_var)


def _assign(variables, values) -> None:
  """Sets each variable of `variables` to the matching subtree of `values` (same structure)."""
  jax.tree.map(lambda v, x: v.set_value(x), variables, values, is_leaf=_is_var)


class Gemma(nnx.Module):
  """A Gemma decoder as an `nnx.Module` over the functional `forward`.

  Attributes:
    cfg: the `ModelConfig` (static: part of the graphdef, hashable like a `jax.jit` static arg).
    params: `Params` whose array leaves are `nnx.Param` (out_sharding = logical axes) and whose
      quantized leaves are `Quantized`.
    lora: {leaf name ("layers.3.attn.q"): LoraPair(a=nnx.LoRAParam [in..., R],
      b=nnx.LoRAParam [R, out...])}; empty without adapters.
    lora_scale: α / r of the adapters (static), None without adapters.
  """

  def __init__(self, params: Params, cfg: ModelConfig, *,
               adapters: dict[str, LoraPair] | None = None, lora_scale: float | None = None):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    self.params = nnx.data(jax.tree_util.tree_map_with_path(_wrap_leaf, params,
                                                            is_leaf=_is_weight))
    self.lora = nnx.data({})
    self.lora_scale = None
    if adapters:
      self.set_adapters(adapters, lora_scale)

  # ------------------------------------------------------------------ LoRA
  def set_adapters(self, adapters: dict[str, LoraPair], lora_scale: float) -> Gemma:
    """Replaces the adapters with `adapters` ({name: LoraPair}, e.g. a trained run's
    `gemma.training.load_trained`) at scale α / r. Returns self."""
    if lora_scale is None:
      raise ValueError("adapters need their lora_scale (alpha / rank)")
    names = set(_weight_names(self.to_params()))
    missing = sorted(set(adapters) - names)
    if missing:
      raise ValueError(f"adapters for weights the model does not have: {missing[:5]}")
    self.lora = nnx.data(_wrap_adapters(adapters))
    self.lora_scale = float(lora_scale)
    return self

  def add_lora(self, rank: int, alpha: float, targets=DEFAULT_TARGETS, *,
               key: jax.Array) -> Gemma:
    """New adapters on `targets` (q, k, v, o, gate, up, down): A ~ N(0, 1/fan_in), B = 0 in
    float32, exactly `gemma.training.lora.init_adapters(key, params, rank, targets)` (what a
    functional run with the same key starts from). Scale α / rank. Returns self."""
    if self.lora:
      raise ValueError("the module already has LoRA adapters")
    adapters = lora_lib.init_adapters(key, self.to_params(), rank, targets, jnp.float32)
    return self.set_adapters(adapters, alpha / rank)

  def adapters(self) -> dict[str, LoraPair]:
    """The adapters as plain arrays {name: LoraPair} (the functional loop's `trainable`)."""
    return _values(self.lora)

  # ------------------------------------------------------------------ functional views
  def to_params(self, lora: str | None = None) -> Params:
    """The functional `Params` of the variables' current values.

    lora: None: the base weights (the tree `from_params` took; adapters left out, see
    `adapters()`); "wrap": adapted leaves as `LoraWeight` (what `__call__` feeds `forward`);
    "merge": W + (α/r)·A B folded into float weights (`gemma.training.lora.merge`).
    """
    if lora not in LORA_MODES:
      raise ValueError(f"lora must be one of {LORA_MODES}, got {lora!r}")
    base = _values(self.params)
    if lora is None or not self.lora:
      return base
    fold = lora_lib.with_adapters if lora == "wrap" else lora_lib.merge
    return fold(base, self.adapters(), self.lora_scale)

  def load_params(self, params: Params, adapters: dict[str, LoraPair] | None = None) -> Gemma:
    """Sets the variables' values from a functional tree of the same structure (and the
    adapters, when given; the metadata is kept). Returns self."""
    _assign(self.params, params)
    if adapters is not None:
      if set(adapters) != set(self.lora):
        raise ValueError("adapters must cover the same weights as the module's")
      _assign(self.lora, adapters)
    return self

  # ------------------------------------------------------------------ forward
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               cache: KVCache | None = None, num_columns: jax.Array | None = None,
               logits_at: jax.Array | None = None):
    """`gemma.model.transformer.forward` with this module's params (LoRA applied).

    Args:
      tokens: [B, T] int32 token ids.
      positions: [B, T] int32 absolute positions, -1 for padding; default 0..T-1 (after a
        cache: each row's `cache.next_pos` onwards).
      cache, num_columns, logits_at: as for `forward`.
    Returns:
      (logits float32 [B, T, V] or [B, V], the updated cache or None)
    """
    if positions is None:
      b, t = tokens.shape
      start = jnp.zeros((b, 1), jnp.int32) if cache is None else cache.next_pos[:, None]
      positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
    return forward(self.to_params(lora="wrap"), tokens, positions, self.cfg, cache,
                   num_columns, logits_at)


def _weight_names(params: Params) -> list[str]:
  """Dotted names of the weights of `params` (a QArray counts as one weight)."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)[0]
  return [path_name(p) for p, _ in flat]


# ---------------------------------------------------------------------- construction
def from_params(params: Params, cfg: ModelConfig, *, adapters: dict[str, LoraPair] | None = None,
                lora_scale: float | None = None) -> Gemma:
  """The `Gemma` module of a functional params tree (the arrays are shared, not copied).

  adapters: {leaf name: LoraPair} (e.g. from `gemma.training.load_trained`), with lora_scale
  = α / r. For an abstract module (an Orbax restore target), call this under `nnx.eval_shape`.
  """
  return Gemma(params, cfg, adapters=adapters, lora_scale=lora_scale)


def from_model(model, *, adapters: dict[str, LoraPair] | None = None,
               lora_scale: float | None = None) -> Gemma:
  """The `Gemma` module of anything with `.cfg` (ModelConfig) and `.params` (Params), such as
  `gemma.Model`. Fused projections (`gemma.model.fused`, how `gemma.load` serves) are split
  back into q/k/v and gate/up first: the module's variables and LoRA targets are the separate
  weights (copies of those; every other weight array is shared)."""
  return from_params(fused.unfuse(model.params, model.cfg), model.cfg, adapters=adapters,
                     lora_scale=lora_scale)


def to_params(module: Gemma, lora: str | None = None) -> Params:
  """`module.to_params(lora)`: the functional params (see `Gemma.to_params`)."""
  return module.to_params(lora)


# ---------------------------------------------------------------------- sharding
def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def partition_specs(module: Gemma, sizes: dict[str, int]) -> nnx.State:
  """PartitionSpecs of `nnx.state(module)` on a mesh of `sizes` ({"data": 2, "model": 4}).

  Each variable's `out_sharding` (logical axes) goes through `gemma.parallel.sharding`'s
  shape-aware rules; a `Quantized` variable gets `qarray_spec` for every child. The result has
  the structure of `nnx.state(module)` with PartitionSpec values (as `nnx.get_partition_spec`
  returns), and equals `sharding.param_specs` of the functional tree leaf for leaf.
  """

  def one(_, var):
    value = var.get_value()
    if isinstance(var, Quantized):
      spec = sharding.qarray_spec(value, var.get_metadata("logical_axes"), sizes)
      return var.replace(jax.tree.map(lambda _: spec, value))
    return var.replace(sharding.partition_spec(var.get_metadata("out_sharding"), value.shape,
                                               sizes))

  return nnx.map_state(one, nnx.state(module))


def shard(module: Gemma, mesh: Mesh) -> Gemma:
  """Places every variable on `mesh` by `partition_specs` (in place); returns the module."""
  state = nnx.state(module)
  specs = partition_specs(module, dict(mesh.shape))
  placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                        state, specs, is_leaf=_is_spec)
  nnx.update(module, placed)
  return module

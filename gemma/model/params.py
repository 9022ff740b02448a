"""Parameter pytrees. `abstract(cfg)` is the single source of truth for every shape.

Absent parts are `None` (no V projection on k_eq_v layers, no K/V on KV-shared layers, no PLE,
no MoE), so the tree of a config holds exactly the tensors that config uses. Weights are in math
layout (`y = x @ W`); see gemma/model/notation.py for the axis letters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gemma.model.config import LayerSpec, ModelConfig

Array = Any  # jax.Array, or jax.ShapeDtypeStruct in an abstract tree


def pytree_dataclass(cls):
  """A frozen dataclass registered as a pytree whose fields are all children."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  return jax.tree_util.register_dataclass(cls)


@pytree_dataclass
class Attention:
  q: Array | None  # [D, N, H]; None when fused into qkv
  o: Array  # [N, H, D]
  q_norm: Array  # [H]
  k: Array | None = None  # [D, K, H]; None on KV-shared layers
  v: Array | None = None  # [D, K, H]; None on KV-shared and k_eq_v layers
  k_norm: Array | None = None  # [H]; None on KV-shared layers
  qkv: Array | None = None  # [D, (N + K + K)·H]: q, k, v fused at load (`gemma.model.fused`)


@pytree_dataclass
class Mlp:
  gate: Array | None  # [D, F]; None when fused into gate_up
  up: Array | None  # [D, F]; None when fused into gate_up
  down: Array  # [F, D]
  gate_up: Array | None = None  # [D, 2F]: gate, up fused at load (`gemma.model.fused`)


@pytree_dataclass
class Moe:
  """Routed experts of a MoE layer (the shared dense MLP lives in `Layer.mlp`)."""

  router: Array  # [D, E]
  router_scale: Array  # [D]
  expert_scale: Array  # [E]
  gate: Array  # [E, D, I]
  up: Array  # [E, D, I]
  down: Array  # [E, I, D]
  pre_norm: Array  # [D] before the experts (HF pre_feedforward_layernorm_2)
  post_norm: Array  # [D] after the experts (HF post_feedforward_layernorm_2)
  dense_post_norm: Array  # [D] after the shared dense MLP (HF post_feedforward_layernorm_1)


@pytree_dataclass
class PerLayerInput:
  """Per-layer-embedding injection of one layer (E2B/E4B)."""

  gate: Array  # [D, P]
  proj: Array  # [P, D]
  norm: Array  # [D]


@pytree_dataclass
class Layer:
  attn_pre_norm: Array  # [D]
  attn_post_norm: Array  # [D]
  mlp_pre_norm: Array  # [D]
  mlp_post_norm: Array  # [D]
  attn: Attention
  mlp: Mlp
  moe: Moe | None = None
  ple: PerLayerInput | None = None
  scalar: Array | None = None  # [1] multiplies the whole residual stream


@pytree_dataclass
class Params:
  embed: Array  # [V, D], also the tied output projection
  final_norm: Array  # [D]
  layers: tuple[Layer, ...]
  ple_embed: Array | None = None  # [V_ple, L, P]
  ple_proj: Array | None = None  # [D, L, P]
  ple_norm: Array | None = None  # [P]


# ------------------------------------------------------------------------------ abstract
def _layer_abstract(cfg: ModelConfig, spec: LayerSpec, dtype) -> Layer:
  d, n, h, k = cfg.embed_dim, cfg.num_heads, spec.head_dim, spec.num_kv_heads

  def s(*shape):
    return jax.ShapeDtypeStruct(shape, dtype)

  own_kv = not spec.shares_kv
  attn = Attention(
      q=s(d, n, h), o=s(n, h, d), q_norm=s(h),
      k=s(d, k, h) if own_kv else None,
      v=s(d, k, h) if own_kv and not spec.k_eq_v else None,
      k_norm=s(h) if own_kv else None)
  moe = None
  if cfg.use_moe:
    e, i = cfg.num_experts, cfg.moe_ffn_dim
    moe = Moe(router=s(d, e), router_scale=s(d), expert_scale=s(e), gate=s(e, d, i),
              up=s(e, d, i), down=s(e, i, d), pre_norm=s(d), post_norm=s(d),
              dense_post_norm=s(d))
  ple = None
  if cfg.use_ple:
    ple = PerLayerInput(gate=s(d, cfg.ple_dim), proj=s(cfg.ple_dim, d), norm=s(d))
  return Layer(
      attn_pre_norm=s(d), attn_post_norm=s(d), mlp_pre_norm=s(d), mlp_post_norm=s(d),
      attn=attn, mlp=Mlp(gate=s(d, spec.ffn_dim), up=s(d, spec.ffn_dim), down=s(spec.ffn_dim, d)),
      moe=moe, ple=ple, scalar=s(1) if cfg.use_layer_scalar else None)


def abstract(cfg: ModelConfig, dtype=jnp.float32) -> Params:
  """Shapes and dtypes of every parameter, as `jax.ShapeDtypeStruct` leaves (nothing allocated)."""
  d, v = cfg.embed_dim, cfg.vocab_size

  def s(*shape):
    return jax.ShapeDtypeStruct(shape, dtype)

  ple = {}
  if cfg.use_ple:
    ple = dict(ple_embed=s(cfg.ple_vocab_size, cfg.num_layers, cfg.ple_dim),
               ple_proj=s(d, cfg.num_layers, cfg.ple_dim), ple_norm=s(cfg.ple_dim))
  return Params(embed=s(v, d), final_norm=s(d),
                layers=tuple(_layer_abstract(cfg, spec, dtype) for spec in cfg.layers), **ple)


def leaf_names(tree) -> list[str]:
  """Dotted names of the leaves of a params tree, in flatten order ("layers.3.attn.q")."""
  paths, _ = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
  return [path_name(p) for p in paths]


def path_name(path) -> str:
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(getattr(key, "key", key)))
  return ".".join(parts)


def _is_scale(name: str) -> bool:
  last = name.rsplit(".", 1)[-1]
  return last.endswith("norm") or last in ("scalar", "router_scale", "expert_scale")


def init(key: jax.Array, cfg: ModelConfig, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random params: scales (norms, layer scalars, router scales) are ones, weights N(0, std²)."""
  tree = abstract(cfg, dtype)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for name, leaf, k in zip(leaf_names(tree), leaves, keys, strict=True):
    if _is_scale(name):
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      out.append((std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def count(tree) -> int:
  """Number of scalars in a params (or abstract) tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def count_breakdown(cfg: ModelConfig) -> dict[str, int]:
  """Total, PLE-table, effective (total minus PLE tables) and active (MoE) parameter counts."""
  tree = abstract(cfg)
  total = count(tree)
  ple = count((tree.ple_embed, tree.ple_proj))
  experts = sum(count((ly.moe.gate, ly.moe.up, ly.moe.down)) for ly in tree.layers if ly.moe)
  inactive = experts * (cfg.num_experts - cfg.top_k_experts) // max(cfg.num_experts, 1)
  return dict(total=total, ple=ple, effective=total - ple, active=total - ple - inactive)

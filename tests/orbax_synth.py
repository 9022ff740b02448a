"""Writes official-layout Gemma 4 Orbax checkpoints (unstacked and stacked) from our Params, for
tests.

Applies the inverse of `gemma.io.formats.orbax_official`'s transforms. KV-shared layers get dead
`kv_einsum`/`k_einsum` and `key_norm` copies of their producer (as the released checkpoints do),
and a fake vision encoder leaf and multimodal projection are added.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from gemma.model.config import ModelConfig
from gemma.model.params import Params


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _heads_first(w) -> np.ndarray:
  return np.swapaxes(_np(w), 0, 1)  # [D, N, H] -> [N, D, H]


def _attention(cfg: ModelConfig, params: Params, i: int) -> dict:
  spec = cfg.layers[i]
  attn = params.layers[i].attn
  kv = params.layers[spec.kv_source].attn  # dead copies on KV-shared layers
  out = {"q_einsum": {"w": _heads_first(attn.q)}, "attn_vec_einsum": {"w": _np(attn.o)},
         "query_norm": {"scale": _np(attn.q_norm)}, "key_norm": {"scale": _np(kv.k_norm)}}
  if spec.k_eq_v:
    out["k_einsum"] = {"w": _heads_first(kv.k)}
  elif spec.num_kv_heads == cfg.num_heads and not spec.shares_kv:
    del out["q_einsum"]
    out["qkv_einsum"] = {"w": np.stack([_heads_first(w) for w in (attn.q, kv.k, kv.v)])}
  else:
    out["kv_einsum"] = {"w": np.stack([_heads_first(kv.k), _heads_first(kv.v)])}
  return out


def _dense(mlp) -> dict:
  return {"gating_einsum": {"w": np.stack([_np(mlp.gate).T, _np(mlp.up).T])},
          "linear": {"w": _np(mlp.down)}}


def _layer(cfg: ModelConfig, params: Params, i: int) -> dict:
  ly = params.layers[i]
  out = {"attn": _attention(cfg, params, i),
         "pre_attention_norm": {"scale": _np(ly.attn_pre_norm)},
         "post_attention_norm": {"scale": _np(ly.attn_post_norm)},
         "post_ffw_norm": {"scale": _np(ly.mlp_post_norm)}}
  if ly.scalar is not None:
    out["skip_scale"] = _np(ly.scalar)
  if ly.moe is None:
    out["pre_ffw_norm"] = {"scale": _np(ly.mlp_pre_norm)}
    out["mlp"] = _dense(ly.mlp)
  else:
    m = ly.moe
    out.update(pre_ffw_norm={"scale": _np(m.pre_norm)},
               pre_ffw2_norm={"scale": _np(ly.mlp_pre_norm)},
               post_ffw1_norm={"scale": _np(m.post_norm)},
               post_ffw2_norm={"scale": _np(m.dense_post_norm)}, mlp2=_dense(ly.mlp))
    out["mlp"] = {"gating_einsum": {"w": np.stack([np.swapaxes(_np(m.gate), 1, 2),
                                                   np.swapaxes(_np(m.up), 1, 2)], axis=1)},
                  "linear": {"w": _np(m.down)}, "router_logits": {"w": _np(m.router)},
                  "router_scale": _np(m.router_scale), "per_expert_scale": _np(m.expert_scale)}
  if ly.ple is not None:
    out.update(per_layer_input_gate={"w": _np(ly.ple.gate)},
               per_layer_projection={"w": _np(ly.ple.proj)},
               post_per_layer_input_norm={"scale": _np(ly.ple.norm)})
  return out


def official_tree(cfg: ModelConfig, params: Params, stacked: bool = False) -> dict:
  """The nested `{"transformer": {...}}` tree of the official layout (plus a fake vision encoder
  leaf)."""
  embedder = {"input_embedding": _np(params.embed),
              "mm_input_projection": {"w": np.ones((8, cfg.embed_dim), np.float32)}}
  if params.ple_embed is not None:
    embedder.update(per_layer_embeddings=_np(params.ple_embed),
                    per_layer_model_projection={"w": _np(params.ple_proj)},
                    per_layer_projection_norm={"scale": _np(params.ple_norm)})
  transformer = {"embedder": embedder, "final_norm": {"scale": _np(params.final_norm)}}
  layers = [_layer(cfg, params, i) for i in range(cfg.num_layers)]
  if stacked:
    if cfg.num_layers % 6:
      raise ValueError(f"stacked layout needs a multiple of 6 layers, not {cfg.num_layers}")
    transformer["stacked_layers"] = {
        f"attention_type_{k}": jax.tree.map(lambda *xs: np.stack(xs), *layers[k::6])
        for k in range(6)}
  else:
    transformer.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
  vision = {"_model": {"vit": {"embedding": {"kernel": np.ones((4, 4), np.float32)}}}}
  return {"transformer": transformer, "PatchInputVariablePoolingEncoder_0": vision}


def flatten_modules(tree: dict, prefix: str = "") -> dict:
  """The released FLAT layout: {'transformer/layer_0/attn/q_einsum': {'w': ...}, ...}."""
  out, own = {}, {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      out.update(flatten_modules(value, name))
    else:
      own[key] = value
  if own:
    out[prefix] = own
  return out


def write_official(path: str | Path, cfg: ModelConfig, params: Params, *, stacked: bool = False,
                   policy_prefix: bool = False, params_level: bool = False,
                   flat: bool = False, edit=None) -> Path:
  """Saves an official-layout Orbax checkpoint; `edit(tree) -> tree` may damage it for tests."""
  import orbax.checkpoint as ocp

  tree = official_tree(cfg, params, stacked=stacked)
  if flat:
    tree = flatten_modules(tree)
  if params_level:
    tree = {"params": tree}
  if policy_prefix:
    tree = {"rlx_networks": {"policy_network": tree}}
  if edit is not None:
    tree = edit(tree)
  path = Path(path)
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(path, tree)
  return path

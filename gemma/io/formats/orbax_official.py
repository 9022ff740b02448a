"""Google's official Gemma 4 Orbax checkpoints (gs://gemma-data/checkpoints/gemma4-*).

Two layouts: unstacked `transformer/layer_{N}/...` and stacked
`transformer/stacked_layers/attention_type_{k}/...` whose leaves carry a leading axis of L/6
(layer = 6*i + k). Trees may be nested dicts or flat dicts with '/'-joined keys; a
`rlx_networks/policy_network/` prefix and leading `params` levels are stripped. These
checkpoints have no config: it comes from `cfg`, a preset name, or is inferred from the shapes.

Leaves are listed from Orbax's tree metadata without reading data, then restored lazily with
`PyTreeRestore(partial_restore=True)` in stream order, in groups of about 1 GiB of the leaves the
config uses. Per-leaf restores work too but each call re-parses the whole tree metadata (about
0.07 s for an 800-leaf tree), which would dominate on unstacked checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from gemma.io.formats.common import (
  CheckpointError,
  Finish,
  Loader,
  Mapped,
  RegexTable,
  Skip,
  assemble,
  log,
  same,
)
from gemma.model.config import PRESETS, ModelConfig, get_preset
from gemma.model.params import Params, abstract, leaf_names

STACK_PERIOD = 6  # stacked layout: layer = 6 * i + k


# ----------------------------------------------------------------------- named transforms
def exact(w: np.ndarray, shape) -> np.ndarray:
  """Already in our layout (attn_vec_einsum [N,H,D], linear [F,D], router_logits [D,E], ...)."""
  if tuple(w.shape) != tuple(shape):
    raise ValueError(f"{w.shape} != {shape}")
  return w


def scalar(w: np.ndarray, shape) -> np.ndarray:
  """skip_scale: [1] or [] -> [1]."""
  if w.size != 1:
    raise ValueError(f"{w.shape} is not a scalar")
  return w.reshape(shape)


def heads_first(w: np.ndarray, shape) -> np.ndarray:
  """q_einsum [N,D,H] -> q [D,N,H]; k_einsum (k_eq_v) [K,D,H] -> k [D,K,H]."""
  if w.ndim != 3:
    raise ValueError(f"{w.shape} is not [heads, D, H]")
  return exact(np.swapaxes(w, 0, 1), shape)


def _unstack(w: np.ndarray, n: int) -> list[np.ndarray]:
  if w.ndim < 1 or w.shape[0] != n:
    raise ValueError(f"{w.shape} has no leading axis of {n}")
  return [w[i] for i in range(n)]


def split_kv(w: np.ndarray, shapes) -> list[np.ndarray]:
  """kv_einsum [2,K,D,H] -> k, v [D,K,H]."""
  return [heads_first(x, s) for x, s in zip(_unstack(w, 2), shapes, strict=True)]


def split_qkv(w: np.ndarray, shapes) -> list[np.ndarray]:
  """qkv_einsum [3,N,D,H] (multi-head layers, K == N) -> q, k, v [D,N,H]."""
  return [heads_first(x, s) for x, s in zip(_unstack(w, 3), shapes, strict=True)]


def split_gate_up_dense(w: np.ndarray, shapes) -> list[np.ndarray]:
  """gating_einsum [2,F,D] -> gate, up [D,F]."""
  return [exact(x.T, s) for x, s in zip(_unstack(w, 2), shapes, strict=True)]


def split_gate_up_moe(w: np.ndarray, shapes) -> list[np.ndarray]:
  """MoE gating_einsum [E,2,I,D] -> gate, up [E,D,I]."""
  if w.ndim != 4:
    raise ValueError(f"{w.shape} is not [E, 2, I, D]")
  halves = _unstack(np.moveaxis(w, 1, 0), 2)
  return [exact(np.swapaxes(x, 1, 2), s) for x, s in zip(halves, shapes, strict=True)]


# ---------------------------------------------------------------------------- name tables
# Names are relative to `transformer/`; stacked leaves are renamed to `layer_{6i+k}` first.
L = r"layer_(\d+)/"
W = r"(?:/w)?"  # the gemma library's nested tree stores mlp einsums as bare arrays
_COMMON = [
    (r"embedder/input_embedding", ("embed",), exact),
    (r"embedder/per_layer_embeddings", ("ple_embed",), same),
    (r"embedder/per_layer_model_projection/w", ("ple_proj",), same),
    (r"embedder/per_layer_projection_norm/scale", ("ple_norm",), exact),
    (r"embedder/(?:mm_|audio_).*", None, "vision/audio projections (text model only)"),
    (r"final_norm/scale", ("final_norm",), exact),
    (L + r"skip_scale", ("layers.{0}.scalar",), scalar),
    (L + r"pre_attention_norm/scale", ("layers.{0}.attn_pre_norm",), exact),
    (L + r"post_attention_norm/scale", ("layers.{0}.attn_post_norm",), exact),
    (L + r"post_ffw_norm/scale", ("layers.{0}.mlp_post_norm",), exact),
    (L + r"attn/q_einsum/w", ("layers.{0}.attn.q",), heads_first),
    (L + r"attn/kv_einsum/w", ("layers.{0}.attn.k", "layers.{0}.attn.v"), split_kv),
    (L + r"attn/k_einsum/w", ("layers.{0}.attn.k",), heads_first),
    (L + r"attn/qkv_einsum/w",
     ("layers.{0}.attn.q", "layers.{0}.attn.k", "layers.{0}.attn.v"), split_qkv),
    (L + r"attn/attn_vec_einsum/w", ("layers.{0}.attn.o",), exact),
    (L + r"attn/query_norm/scale", ("layers.{0}.attn.q_norm",), exact),
    (L + r"attn/key_norm/scale", ("layers.{0}.attn.k_norm",), exact),
    (L + r"per_layer_input_gate/w", ("layers.{0}.ple.gate",), exact),
    (L + r"per_layer_projection/w", ("layers.{0}.ple.proj",), exact),
    (L + r"post_per_layer_input_norm/scale", ("layers.{0}.ple.norm",), exact),
]
DENSE_TABLE = RegexTable(_COMMON + [
    (L + r"pre_ffw_norm/scale", ("layers.{0}.mlp_pre_norm",), exact),
    (L + r"mlp/gating_einsum" + W, ("layers.{0}.mlp.gate", "layers.{0}.mlp.up"),
     split_gate_up_dense),
    (L + r"mlp/linear" + W, ("layers.{0}.mlp.down",), exact),
])
# MoE: JAX `mlp` = routed experts, `mlp2` = shared dense MLP, and the norm
# names cross: pre_ffw_norm -> experts' pre-norm (HF pre_feedforward_layernorm_2), pre_ffw2_norm
# -> dense pre-norm (HF pre_feedforward_layernorm), post_ffw1_norm -> experts' post-norm (HF
# post_feedforward_layernorm_2), post_ffw2_norm -> dense post-norm (HF ..._1); post_ffw_norm
# stays the combined post-norm (HF post_feedforward_layernorm).
MOE_TABLE = RegexTable(_COMMON + [
    (L + r"pre_ffw_norm/scale", ("layers.{0}.moe.pre_norm",), exact),
    (L + r"pre_ffw2_norm/scale", ("layers.{0}.mlp_pre_norm",), exact),
    (L + r"post_ffw1_norm/scale", ("layers.{0}.moe.post_norm",), exact),
    (L + r"post_ffw2_norm/scale", ("layers.{0}.moe.dense_post_norm",), exact),
    (L + r"mlp/gating_einsum" + W, ("layers.{0}.moe.gate", "layers.{0}.moe.up"),
     split_gate_up_moe),
    (L + r"mlp/linear" + W, ("layers.{0}.moe.down",), exact),
    (L + r"mlp/router_logits/w", ("layers.{0}.moe.router",), exact),
    (L + r"mlp/router_scale", ("layers.{0}.moe.router_scale",), exact),
    (L + r"mlp/per_expert_scale", ("layers.{0}.moe.expert_scale",), exact),
    (L + r"mlp2/gating_einsum" + W, ("layers.{0}.mlp.gate", "layers.{0}.mlp.up"),
     split_gate_up_dense),
    (L + r"mlp2/linear" + W, ("layers.{0}.mlp.down",), exact),
])

ENCODERS = re.compile(r"(^|/)(PatchInputVariablePoolingEncoder_\d+|AudioEncoder|vision_encoder|"
                      r"audio_encoder)(/|$)")
_PREFIXES = ("params/", "rlx_networks/policy_network/")
_STACKED = re.compile(r"stacked_layers/attention_type_(\d+)/(.+)\[(\d+)\]$")


def strip_prefixes(name: str) -> str:
  """Drops leading `params` levels and the `rlx_networks/policy_network/` prefix."""
  while True:
    prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
    if prefix is None:
      return name
    name = name[len(prefix):]


def make_mapper(cfg: ModelConfig):
  """Mapper of normalized leaf names ('transformer/...', stacked slices as '...[i]')."""
  table = MOE_TABLE if cfg.use_moe else DENSE_TABLE

  def mapper(name: str) -> Mapped | Skip | None:
    if ENCODERS.search(name):
      return Skip("vision/audio encoder tensors (text model only)")
    if name.startswith("rlx_networks/"):
      return Skip("networks other than rlx_networks/policy_network")
    if not name.startswith("transformer/"):
      return None
    rel = name[len("transformer/"):]
    stacked = _STACKED.match(rel)
    if stacked:
      k, rest, i = stacked.groups()
      rel = f"layer_{STACK_PERIOD * int(i) + int(k)}/{rest}"
    return table(rel)

  return mapper


# ------------------------------------------------------------------------------- reading
def _orbax_root(path: Path) -> Path | None:
  for root in (path, path / "params", path / "default"):
    if (root / "_METADATA").exists() or (root / "checkpoint").exists():
      return root
  return None


def list_leaves(path: Path) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
  """Normalized name -> (original key path, shape, dtype) from the metadata alone (no data)."""
  import orbax.checkpoint as ocp

  root = _orbax_root(path)
  if root is None:
    raise CheckpointError(f"{path}: not an Orbax checkpoint (no _METADATA)")
  try:
    meta = ocp.PyTreeCheckpointer().metadata(root)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  except Exception as e:  # unreadable or corrupt metadata
    raise CheckpointError(f"{root}: cannot read Orbax metadata ({e})") from None
  if not flat:
    raise CheckpointError(f"{root}: Orbax metadata is missing or unreadable (no leaves listed)")
  out = {}
  for keypath, leaf in flat:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
    name = strip_prefixes("/".join(keys))
    out[name] = (keys, tuple(getattr(leaf, "shape", ()) or ()), str(getattr(leaf, "dtype", "?")))
  return out


GROUP_BYTES = 1 << 30  # leaves restored per Orbax call (a larger leaf is restored alone)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:
    itemsize = 4
  return int(np.prod(shape, dtype=np.int64)) * itemsize


class _GroupReader:
  """Restores groups of leaves with one partial restore each and hands them out one by one."""

  def __init__(self, root: Path, dtype=None):
    import orbax.checkpoint as ocp

    self.root, self.ocp, self.dtype = root, ocp, dtype
    self.checkpointer = ocp.PyTreeCheckpointer()
    self.cache: dict[tuple[str, ...], np.ndarray] = {}

  def restore(self, keys: list[tuple[str, ...]]) -> dict[tuple[str, ...], np.ndarray]:
    item, args = {}, {}
    for key in keys:
      node, arg = item, args
      for part in key[:-1]:
        node, arg = node.setdefault(part, {}), arg.setdefault(part, {})
      node[key[-1]] = 0
      arg[key[-1]] = self.ocp.RestoreArgs(restore_type=np.ndarray, dtype=self.dtype)
    try:
      tree = self.checkpointer.restore(self.root, args=self.ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
    except Exception as e:
      names = ", ".join("/".join(k) for k in keys[:3])
      raise CheckpointError(f"{self.root}: cannot restore {names} ({e})") from None
    out = {}
    for key in keys:
      node = tree
      for part in key:
        node = node[part]
      out[key] = np.asarray(node)
    return out

  def read(self, group: list[tuple[str, ...]], key: tuple[str, ...], index: int | None,
           last: bool) -> np.ndarray:
    """Leaf `key` (slice `index` of a stacked leaf); `last` frees it from the cache."""
    if key not in self.cache:
      self.cache.clear()
      self.cache = self.restore(group)
    arr = self.cache.pop(key) if last else self.cache[key]
    return arr if index is None else np.ascontiguousarray(arr[index])


def iter_leaves(path: Path, cfg: ModelConfig, dtype=None,
                leaves: dict | None = None) -> Iterator[tuple[str, Loader]]:
  """Yields (normalized name, lazy loader); a stacked leaf becomes one entry per layer.

  Leaves the config uses are restored in groups of about GROUP_BYTES, in stream order, so host
  memory holds at most one group beyond the assembled output. With `dtype`, TensorStore casts
  while reading (round to nearest even, like jnp), so no float32 copy of a bf16 load is made.
  """
  leaves = leaves or list_leaves(path)
  reader = _GroupReader(_orbax_root(path), dtype)
  mapper = make_mapper(cfg)
  expected = set(leaf_names(abstract(cfg)))

  def wanted(name: str) -> bool:
    m = mapper(name)
    return isinstance(m, Mapped) and all(t in expected for t in m.targets)

  entries = []  # (name, original keys, index into a stacked leaf, wanted)
  for name, (keys, shape, _) in leaves.items():
    if name.startswith("transformer/stacked_layers/"):
      entries += [(f"{name}[{i}]", keys, i, wanted(f"{name}[{i}]"))
                  for i in range(shape[0] if shape else 0)]
    else:
      entries.append((name, keys, None, wanted(name)))
  last_use = {keys: n for n, (_, keys, _, want) in enumerate(entries) if want}
  groups: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
  group, size = [], GROUP_BYTES
  for keys in last_use:  # insertion order = stream order of first use
    nbytes = _nbytes(*leaves[strip_prefixes("/".join(keys))][1:])
    if size + nbytes > GROUP_BYTES and group:
      group, size = [], 0
    group.append(keys)
    groups[keys] = group
    size += nbytes
  for n, (name, keys, index, _) in enumerate(entries):
    members, last = groups.get(keys, [keys]), last_use.get(keys) == n
    yield name, (lambda m=members, k=keys, i=index, f=last: reader.read(m, k, i, f))


# ---------------------------------------------------------------------------------- API
def is_official_orbax(path: str | Path) -> bool:
  """True for an Orbax checkpoint directory whose tree holds a `transformer/` root."""
  path = Path(path)
  if not path.is_dir() or (path / "gemma_config.json").exists() or _orbax_root(path) is None:
    return False
  try:
    return any(n.startswith("transformer/") for n in list_leaves(path))
  except CheckpointError:
    return False


def infer_preset(shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
  """The preset whose embedding width and layer count match the leaf shapes."""
  embed = shapes.get("transformer/embedder/input_embedding")
  if not embed or len(embed) != 2:
    raise CheckpointError("cannot infer the model: no transformer/embedder/input_embedding")
  layers = {int(m.group(1)) for n in shapes if (m := re.match(r"transformer/layer_(\d+)/", n))}
  stacked = [s[0] for n, s in shapes.items() if n.startswith("transformer/stacked_layers/") and s]
  num_layers = STACK_PERIOD * max(stacked) if stacked else len(layers)
  for cfg in PRESETS.values():
    if (cfg.vocab_size, cfg.embed_dim, cfg.num_layers) == (*embed, num_layers):
      return cfg
  raise CheckpointError(
      f"no preset has vocab {embed[0]}, width {embed[1]} and {num_layers} layers: pass a preset "
      f"({', '.join(PRESETS)}) or a config")


def load(path: str | Path, dtype, cfg: ModelConfig | None = None,
         preset: str | None = None, finish: Finish | None = None,
         mesh=None) -> tuple[ModelConfig, Params]:
  """Loads an official Orbax checkpoint. Returns (config, params cast to dtype).

  The config is `cfg`, else the preset named `preset`, else the preset inferred from shapes.
  With a `mesh`, each process still restores whole leaves (stacked leaves are split per layer
  and fused ones per target, in host memory), then puts only the slices its devices own in place
  (`common.assemble`).
  """
  path = Path(path)
  names = list_leaves(path)
  if not any(n.startswith("transformer/") for n in names):
    tops = sorted({n.split("/")[0] for n in names})
    raise CheckpointError(f"{path}: no transformer/ tree (top-level keys: {', '.join(tops)})")
  if cfg is None and preset is not None:
    cfg = get_preset(preset)
  if cfg is None:
    cfg = infer_preset({n: s for n, (_, s, _) in names.items()})
    log(f"{path}: official Orbax checkpoint, config inferred as preset {cfg.name}")
  tensors = iter_leaves(path, cfg, dtype, leaves=names)
  return cfg, assemble(cfg, tensors, make_mapper(cfg), dtype, source=str(path), finish=finish,
                       mesh=mesh)

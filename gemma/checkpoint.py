"""Loading Hugging Face Gemma 4 checkpoints (config.json + safetensors) into `Params`.

The name mapping is a declarative table (HF name regex -> param name, transform) plus a short list
of named transforms. Every source tensor is consumed or explicitly ignored, every param leaf is
filled, every shape is checked against `abstract(cfg)`; otherwise one error lists the problems.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma.config import ModelConfig, from_hf_config
from gemma.params import Params, abstract, leaf_names

# Text-decoder prefixes: Gemma4ForConditionalGeneration, then Gemma4ForCausalLM.
TEXT_PREFIXES = ("model.language_model.", "model.")
# Multimodal parts that a text model skips (vision/audio towers and their projections).
MULTIMODAL = re.compile(r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio|"
                        r"multi_modal_projector)\.")
TIED_HEAD = "lm_head.weight"  # the output projection is the embedding table


# Named transforms: HF tensor (numpy) + target shape(s) -> array(s) in our math layout.
# The leading axis must be a leading group of the target axes, so a reshape never hides a
# transposed tensor.
def _reshape(w, shape):
  prefixes = {int(np.prod(shape[:j])) for j in range(1, len(shape) + 1)}
  if w.ndim == 0 or w.shape[0] not in prefixes or w.size != int(np.prod(shape)):
    raise ValueError(f"{w.shape} -> {shape}")
  return w.reshape(shape)


def _same(w, shape):
  return _reshape(w, shape)  # e.g. embed_tokens_per_layer [V, L*P] -> [V, L, P]


def _linear(w, shape):
  return _reshape(w.T, shape)  # nn.Linear [out, in] -> [in, ...out axes]


def _swap_last(w, shape):
  return _reshape(np.swapaxes(w, -1, -2), shape)  # experts.down_proj [E, D, I] -> [E, I, D]


def _split_gate_up(w, shapes):
  # experts.gate_up_proj [E, 2I, D]: rows [0:I] gate, [I:2I] up -> two [E, D, I]
  gate, up = np.split(w, 2, axis=1)
  return [_reshape(np.swapaxes(gate, 1, 2), shapes[0]), _reshape(np.swapaxes(up, 1, 2), shapes[1])]


L = r"layers\.(\d+)\."
HF_TABLE: list[tuple[str, tuple[str, ...], Callable]] = [
    (r"embed_tokens\.weight", ("embed",), _same),
    (r"norm\.weight", ("final_norm",), _same),
    (r"embed_tokens_per_layer\.weight", ("ple_embed",), _same),
    (r"per_layer_model_projection\.weight", ("ple_proj",), _linear),
    (r"per_layer_projection_norm\.weight", ("ple_norm",), _same),
    (L + r"input_layernorm\.weight", ("layers.{0}.attn_pre_norm",), _same),
    (L + r"post_attention_layernorm\.weight", ("layers.{0}.attn_post_norm",), _same),
    (L + r"pre_feedforward_layernorm\.weight", ("layers.{0}.mlp_pre_norm",), _same),
    (L + r"post_feedforward_layernorm\.weight", ("layers.{0}.mlp_post_norm",), _same),
    (L + r"self_attn\.q_proj\.weight", ("layers.{0}.attn.q",), _linear),
    (L + r"self_attn\.k_proj\.weight", ("layers.{0}.attn.k",), _linear),
    (L + r"self_attn\.v_proj\.weight", ("layers.{0}.attn.v",), _linear),
    (L + r"self_attn\.o_proj\.weight", ("layers.{0}.attn.o",), _linear),
    (L + r"self_attn\.q_norm\.weight", ("layers.{0}.attn.q_norm",), _same),
    (L + r"self_attn\.k_norm\.weight", ("layers.{0}.attn.k_norm",), _same),
    (L + r"mlp\.gate_proj\.weight", ("layers.{0}.mlp.gate",), _linear),
    (L + r"mlp\.up_proj\.weight", ("layers.{0}.mlp.up",), _linear),
    (L + r"mlp\.down_proj\.weight", ("layers.{0}.mlp.down",), _linear),
    (L + r"layer_scalar", ("layers.{0}.scalar",), _same),
    (L + r"per_layer_input_gate\.weight", ("layers.{0}.ple.gate",), _linear),
    (L + r"per_layer_projection\.weight", ("layers.{0}.ple.proj",), _linear),
    (L + r"post_per_layer_input_norm\.weight", ("layers.{0}.ple.norm",), _same),
    (L + r"router\.proj\.weight", ("layers.{0}.moe.router",), _linear),
    (L + r"router\.scale", ("layers.{0}.moe.router_scale",), _same),
    (L + r"router\.per_expert_scale", ("layers.{0}.moe.expert_scale",), _same),
    (L + r"experts\.gate_up_proj", ("layers.{0}.moe.gate", "layers.{0}.moe.up"), _split_gate_up),
    (L + r"experts\.down_proj", ("layers.{0}.moe.down",), _swap_last),
    (L + r"pre_feedforward_layernorm_2\.weight", ("layers.{0}.moe.pre_norm",), _same),
    (L + r"post_feedforward_layernorm_1\.weight", ("layers.{0}.moe.dense_post_norm",), _same),
    (L + r"post_feedforward_layernorm_2\.weight", ("layers.{0}.moe.post_norm",), _same),
]
_COMPILED = [(re.compile(pattern + "$"), targets, fn) for pattern, targets, fn in HF_TABLE]
# K/V tensors that KV-shared layers may still carry (Orbax conversions): present and ignored.
_DEAD_KV = re.compile(r"layers\.(\d+)\.attn\.(k|v|k_norm)$")


class CheckpointError(ValueError):
  """A checkpoint that does not match the model; names every missing/unexpected/bad tensor."""


def map_name(name: str) -> tuple[tuple[str, ...], Callable] | None:
  """Param names and transform for one HF text tensor name (prefix already stripped)."""
  for pattern, targets, fn in _COMPILED:
    m = pattern.match(name)
    if m:
      return tuple(t.format(*m.groups()) for t in targets), fn
  return None


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def safetensors_files(path: Path) -> list[Path]:
  """The safetensors files of an HF directory (single file or sharded with an index)."""
  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return [path / f for f in sorted(set(weight_map.values()))]
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors files")
  return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
  """Yields (name, loader) for every tensor, reading lazily one tensor at a time."""
  from safetensors import safe_open

  for f in files:
    try:
      handle = safe_open(str(f), framework="numpy")
      names = list(handle.keys())
    except Exception as e:  # truncated or not a safetensors file
      raise CheckpointError(f"{f}: cannot read safetensors header ({e})") from None
    for name in names:
      yield name, (lambda h=handle, n=name, f=f: _read(h, n, f))


def _read(handle, name: str, f: Path) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except Exception as e:
    raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from None


def read_config(path: Path) -> ModelConfig:
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise CheckpointError(f"{path}: no config.json")
  return from_hf_config(json.loads(cfg_file.read_text()), name=path.name)


def load_hf(path: str | Path, dtype=jnp.bfloat16,
            cfg: ModelConfig | None = None) -> tuple[ModelConfig, Params]:
  """Loads an HF Gemma 4 directory. Returns (config, params cast to `dtype`)."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint {path} is not a directory")
  cfg = cfg or read_config(path)
  tree = abstract(cfg, dtype)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  expected = dict(zip(leaf_names(tree), leaves, strict=True))
  dead_ok = {str(s.index) for s in cfg.layers if s.shares_kv}
  values: dict[str, jax.Array] = {}
  unexpected, misshaped, skipped = [], [], 0
  tensors = list(iter_safetensors(safetensors_files(path)))
  for i, (full_name, load) in enumerate(tensors):
    _progress(i + 1, len(tensors))
    if MULTIMODAL.match(full_name) or full_name == TIED_HEAD:
      skipped += MULTIMODAL.match(full_name) is not None
      continue
    prefix = next((p for p in TEXT_PREFIXES if full_name.startswith(p)), None)
    mapped = map_name(full_name[len(prefix):]) if prefix else None
    if mapped is None:
      unexpected.append(full_name)
      continue
    targets, fn = mapped
    if any(t not in expected for t in targets):
      m = _DEAD_KV.match(targets[0])
      if not (m and m.group(1) in dead_ok):
        unexpected.append(full_name)
      continue
    arr = load()
    shapes = [expected[t].shape for t in targets]
    try:
      out = fn(arr, shapes if len(targets) > 1 else shapes[0])
    except ValueError:
      misshaped.append(f"{full_name}: {arr.shape} cannot become {shapes}")
      continue
    for target, a in zip(targets, out if len(targets) > 1 else [out], strict=True):
      values[target] = jnp.asarray(a, dtype)
  if skipped:
    _log(f"skipped {skipped} vision/audio tensors (text model only)")
  missing = [n for n in expected if n not in values]
  if missing or unexpected or misshaped:
    raise CheckpointError(
        f"{path} does not match config {cfg.name}:\n" + "\n".join(
            f"  {kind}: {', '.join(items)}" for kind, items in
            (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if items))
  return cfg, jax.tree_util.tree_unflatten(treedef, [values[n] for n in expected])


def _progress(done: int, total: int) -> None:
  if sys.stderr.isatty() or done == total:
    end = "\n" if done == total else ""
    print(f"\rloading tensors {done}/{total}", end=end, file=sys.stderr, flush=True)

"""Hugging Face directories: config.json + safetensors (single or sharded with an index).

Gemma4ForConditionalGeneration (`model.language_model.` prefix) and Gemma4ForCausalLM
(`model.`); vision/audio towers and multimodal projections are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma.io.formats.common import (
  CheckpointError,
  Finish,
  Loader,
  Mapped,
  RegexTable,
  Skip,
  assemble,
  linear,
  same,
  split_gate_up,
  swap_last,
)
from gemma.io.formats.hf_config import from_hf_config
from gemma.model.config import ModelConfig
from gemma.model.params import Params

# Text-decoder prefixes: Gemma 4 conditional generation,
# Gemma 3 conditional generation as transformers 5 saves it, then the causal LMs.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
MULTIMODAL = re.compile(r"^(model\.)?(vision_tower|audio_tower|embed_vision|embed_audio|"
                        r"multi_modal_projector)\.")
TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")

L = r"layers\.(\d+)\."
TABLE = RegexTable([
    (r"embed_tokens\.weight", ("embed",), same),
    (r"norm\.weight", ("final_norm",), same),
    (r"embed_tokens_per_layer\.weight", ("ple_embed",), same),
    (r"per_layer_model_projection\.weight", ("ple_proj",), linear),
    (r"per_layer_projection_norm\.weight", ("ple_norm",), same),
    (L + r"input_layernorm\.weight", ("layers.{0}.attn_pre_norm",), same),
    (L + r"post_attention_layernorm\.weight", ("layers.{0}.attn_post_norm",), same),
    (L + r"pre_feedforward_layernorm\.weight", ("layers.{0}.mlp_pre_norm",), same),
    (L + r"post_feedforward_layernorm\.weight", ("layers.{0}.mlp_post_norm",), same),
    (L + r"self_attn\.q_proj\.weight", ("layers.{0}.attn.q",), linear),
    (L + r"self_attn\.k_proj\.weight", ("layers.{0}.attn.k",), linear),
    (L + r"self_attn\.v_proj\.weight", ("layers.{0}.attn.v",), linear),
    (L + r"self_attn\.o_proj\.weight", ("layers.{0}.attn.o",), linear),
    (L + r"self_attn\.q_norm\.weight", ("layers.{0}.attn.q_norm",), same),
    (L + r"self_attn\.k_norm\.weight", ("layers.{0}.attn.k_norm",), same),
    (L + r"mlp\.gate_proj\.weight", ("layers.{0}.mlp.gate",), linear),
    (L + r"mlp\.up_proj\.weight", ("layers.{0}.mlp.up",), linear),
    (L + r"mlp\.down_proj\.weight", ("layers.{0}.mlp.down",), linear),
    (L + r"layer_scalar", ("layers.{0}.scalar",), same),
    (L + r"per_layer_input_gate\.weight", ("layers.{0}.ple.gate",), linear),
    (L + r"per_layer_projection\.weight", ("layers.{0}.ple.proj",), linear),
    (L + r"post_per_layer_input_norm\.weight", ("layers.{0}.ple.norm",), same),
    (L + r"router\.proj\.weight", ("layers.{0}.moe.router",), linear),
    (L + r"router\.scale", ("layers.{0}.moe.router_scale",), same),
    (L + r"router\.per_expert_scale", ("layers.{0}.moe.expert_scale",), same),
    (L + r"experts\.gate_up_proj", ("layers.{0}.moe.gate", "layers.{0}.moe.up"), split_gate_up),
    (L + r"experts\.down_proj", ("layers.{0}.moe.down",), swap_last),
    (L + r"pre_feedforward_layernorm_2\.weight", ("layers.{0}.moe.pre_norm",), same),
    (L + r"post_feedforward_layernorm_1\.weight", ("layers.{0}.moe.dense_post_norm",), same),
    (L + r"post_feedforward_layernorm_2\.weight", ("layers.{0}.moe.post_norm",), same),
])


def map_name(name: str) -> Mapped | Skip | None:
  """Maps a full HF tensor name (with its model prefix) to param names and a transform."""
  if MULTIMODAL.match(name):
    return Skip("vision/audio tensors (text model only)")
  if name in TIED_HEADS:
    return Skip("tied output head tensor (the embedding is used)")
  prefix = next((p for p in TEXT_PREFIXES if name.startswith(p)), None)
  return TABLE(name[len(prefix):]) if prefix else None


def safetensors_files(path: Path) -> list[Path]:
  """The safetensors files of an HF directory (single file or sharded with an index)."""
  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [path / f for f in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.exists()]
    if absent:
      raise CheckpointError(f"{path}: shards listed in the index are missing: {absent}")
    return files
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors files")
  return files


# safetensors dtype tag -> numpy dtype (little-endian; bfloat16 / float8 from ml_dtypes)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
           "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
           "F8_E5M2": ml_dtypes.float8_e5m2}


def read_header(f: Path) -> tuple[int, dict[str, dict]]:
  """(byte offset of the data section, {name: {"dtype", "shape", "data_offsets"}}) of one
  safetensors file: an 8-byte little-endian header length N, N bytes of JSON, then the data.
  Checks every entry against the file size; raises CheckpointError naming the file."""
  size = f.stat().st_size
  try:
    with open(f, "rb") as fh:
      n = int.from_bytes(fh.read(8), "little")
      if size < 8 or n > size - 8:
        raise ValueError(f"header length {n} exceeds the file size {size}")
      header = json.loads(fh.read(n))
    if not isinstance(header, dict):
      raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, entry in header.items():
      dtype = np.dtype(_DTYPES[entry["dtype"]])
      begin, end = entry["data_offsets"]
      count = int(np.prod(entry["shape"], dtype=np.int64))
      if end - begin != count * dtype.itemsize or begin < 0 or start + end > size:
        raise ValueError(f"tensor {name!r}: data_offsets {entry['data_offsets']} do not hold "
                         f"{entry['dtype']}{entry['shape']} within the file ({size} bytes)")
  except KeyError as e:
    raise CheckpointError(f"{f}: cannot read safetensors header (unknown dtype or missing "
                          f"field {e})") from None
  except (ValueError, TypeError, OSError) as e:  # JSONDecodeError is a ValueError
    raise CheckpointError(f"{f}: cannot read safetensors header ({e})") from None
  return start, header


def map_tensor(f: Path, start: int, entry: dict) -> np.ndarray:
  """One tensor of a safetensors file as a read-only memory map (no data is read yet): slicing
  it, or a view of it, touches only the pages of the slice."""
  dtype, shape = np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"])
  count = int(np.prod(shape, dtype=np.int64))
  if count == 0:  # an empty tensor: nothing to map
    return np.zeros(shape, dtype)
  mapped = np.memmap(f, dtype=dtype, mode="r", offset=start + entry["data_offsets"][0],
                     shape=(count,))
  return mapped.reshape(shape)


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Loader]]:
  """Yields (name, loader) for every tensor; a loader returns the tensor memory-mapped (see
  `map_tensor`), so nothing is read before the assembler copies the slices it needs."""
  for f in files:
    start, header = read_header(f)
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
      yield name, (lambda f=f, s=start, e=entry, n=name: _read(f, s, e, n))


def _read(f: Path, start: int, entry: dict, name: str) -> np.ndarray:
  try:
    return map_tensor(f, start, entry)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from None


def read_config(path: Path) -> ModelConfig:
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise CheckpointError(f"{path}: no config.json")
  try:
    hf = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
  return from_hf_config(hf, name=path.name)


def load(path: Path, dtype, cfg: ModelConfig | None = None, finish: Finish | None = None,
         mesh=None) -> tuple[ModelConfig, Params]:
  """Loads an HF Gemma directory. Returns (config, params cast to dtype, each passed through
  `finish` when given).

  Tensors are memory-mapped; with a `mesh` (a `jax.sharding.Mesh`) each leaf is built from the
  slices this process's devices own, so only those bytes are read (see `common.assemble`).
  """
  cfg = cfg or read_config(path)
  tensors = iter_safetensors(safetensors_files(path))
  return cfg, assemble(cfg, tensors, map_name, dtype, source=str(path), finish=finish,
                       mesh=mesh)

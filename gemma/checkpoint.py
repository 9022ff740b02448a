"""Loading checkpoints into `Params`: one entry point that detects the format.

Formats (gemma/formats/): Hugging Face directories (config.json + safetensors), GGUF files,
official Gemma 4 Orbax checkpoints (config from a preset), and our own converted Orbax
checkpoints. Each is a declarative name table plus named transforms over a stream of tensors,
assembled and checked by `gemma.formats.common.assemble`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from gemma.config import ModelConfig, get_preset
from gemma.formats import converted, gguf, hf, orbax_official
from gemma.formats.common import CheckpointError
from gemma.params import Params

__all__ = ["FORMATS", "CheckpointError", "detect_format", "inspect", "load", "load_hf"]

FORMATS = ("hf", "gguf", "orbax", "converted")


def detect_format(path: str | Path) -> str:
  """Names the format of a checkpoint path: one of FORMATS."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint {path} does not exist")
  if path.is_file():
    if gguf.is_gguf(path):
      return "gguf"
    raise CheckpointError(f"{path}: a file that is not GGUF; expected a .gguf file or a "
                          "checkpoint directory")
  if converted.is_converted(path):
    return "converted"
  if (path / "config.json").exists():
    return "hf"
  if orbax_official.is_official_orbax(path):
    return "orbax"
  raise CheckpointError(f"{path}: not a known checkpoint (no config.json, no "
                        f"{converted.CONFIG_FILE}, no Orbax transformer/ tree)")


def inspect(path: str | Path, preset: str | None = None) -> tuple[str, ModelConfig]:
  """(format name, config) of a checkpoint, without reading any weight."""
  path = Path(path)
  fmt = detect_format(path)
  if fmt == "gguf":
    return fmt, gguf.read_config(gguf.open_gguf(path))
  if fmt == "orbax":
    if preset:
      return fmt, get_preset(preset)
    leaves = orbax_official.list_leaves(path)
    return fmt, orbax_official.infer_preset({n: s for n, (_, s, _) in leaves.items()})
  return fmt, {"hf": hf.read_config, "converted": converted.read_config}[fmt](path)


def load(path: str | Path, dtype=jnp.bfloat16, cfg: ModelConfig | None = None,
         preset: str | None = None, quant=None, float_dtype=None,
         mesh=None) -> tuple[ModelConfig, Params]:
  """Loads any supported checkpoint. Returns (config, params cast to `dtype`).

  `cfg` overrides the checkpoint's own config; `preset` names the config of an official Orbax
  checkpoint (inferred from its shapes when omitted). `quant` (a recipe or its name, see
  `gemma.quant.recipes`) quantizes each weight as soon as it is read, so the model is never
  whole in full precision. A checkpoint written by `gemma4 quantize` loads quantized as it is;
  asking for the recipe it was quantized with is a no-op, any other recipe is an error.
  `float_dtype` casts the weights `quant` keeps in float (default: `dtype`).

  `mesh` (a `jax.sharding.Mesh`, e.g. `gemma.sharding.make_mesh("2x4")`) loads every leaf
  straight into the `NamedSharding` that `gemma.sharding.param_specs` gives it, never whole on
  one device. What each process reads, by format:
    hf         tensors are memory-mapped and each process reads only the slices its devices own
               (each distinct slice once)
    converted  Orbax restores into the target shardings, so TensorStore reads only the chunks
               overlapping owned slices (QArray children too, placed as `param_specs` says)
    gguf       every process reads and dequantizes whole tensors, then keeps its own slices
    orbax      every process restores whole leaves, then keeps its own slices
  With `quant`, weights are quantized after the sharded read (jitted on sharded arrays) and the
  result is placed with `gemma.sharding.shard_params` at the end.
  """
  fmt = detect_format(path)
  if preset is not None and cfg is None:
    cfg = get_preset(preset)
  finish = None
  if quant is not None:
    from gemma.quant.recipes import quantizer, resolve

    recipe = resolve(quant)
    stored = converted.read_recipe(path) if fmt == "converted" else None
    if stored is not None and stored.name != recipe.name:
      raise CheckpointError(f"{path} is already quantized with recipe {stored.name!r}; "
                            f"cannot load it as {recipe.name!r}")
    finish = None if stored is not None else quantizer(recipe, float_dtype)
  loader = {"hf": hf.load, "gguf": gguf.load, "orbax": orbax_official.load,
            "converted": converted.load}[fmt]
  cfg, params = loader(Path(path), dtype, cfg, finish=finish, mesh=mesh)
  if mesh is not None and finish is not None:
    from gemma.sharding import shard_params

    # quantize-on-load outputs land where XLA put them: move every leaf to its param_specs
    # place (a no-op for leaves already there)
    params = shard_params(params, mesh)
  return cfg, params


def load_hf(path: str | Path, dtype=jnp.bfloat16,
            cfg: ModelConfig | None = None) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face directory (config.json + safetensors)."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint {path} is not a directory")
  if not (path / "config.json").exists():
    raise CheckpointError(f"{path}: no config.json")
  return hf.load(path, dtype, cfg)

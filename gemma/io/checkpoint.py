"""Loading checkpoints into `Params`: one entry point that detects the format.

Formats (gemma/io/formats/): Hugging Face directories (config.json + safetensors), GGUF files,
official Gemma 4 Orbax checkpoints (config from a preset), and our own converted Orbax
checkpoints. Each is a declarative name table plus named transforms over a stream of tensors,
assembled and checked by `gemma.io.formats.common.assemble`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma.inference import chat
from gemma.io import atomic
from gemma.io.formats import converted, gguf, hf, orbax_official
from gemma.io.formats.common import CheckpointError, log
from gemma.io.tokenizer import HFTokenizer, Tokenizer
from gemma.io.tokenizer_gguf import tokenizer_from_gguf
from gemma.model.config import ModelConfig, get_preset
from gemma.model.params import Params
from gemma.parallel.sharding import shard_params
from gemma.quant.recipes import quantizer, resolve

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
         mesh=None, verify: bool = True) -> tuple[ModelConfig, Params]:
  """Loads any supported checkpoint. Returns (config, params cast to `dtype`).

  `cfg` overrides the checkpoint's own config; `preset` names the config of an official Orbax
  checkpoint (inferred from its shapes when omitted). `quant` (a recipe or its name, see
  `gemma.quant.recipes`) quantizes each weight as soon as it is read, so the model is never
  whole in full precision. A checkpoint written by `gemma4 quantize` loads quantized as it is;
  asking for the recipe it was quantized with is a no-op, any other recipe is an error.
  `float_dtype` casts the weights `quant` keeps in float (default: `dtype`).

  `mesh` (a `jax.sharding.Mesh`, e.g. `gemma.parallel.sharding.make_mesh("2x4")`) loads every
  leaf straight into the `NamedSharding` that `gemma.parallel.sharding.param_specs` gives it,
  never whole on one device. What each process reads, by format:
    hf         tensors are memory-mapped and each process reads only the slices its devices own
               (each distinct slice once)
    converted  Orbax restores into the target shardings, so TensorStore reads only the chunks
               overlapping owned slices (QArray children too, placed as `param_specs` says)
    gguf       every process reads and dequantizes whole tensors, then keeps its own slices
    orbax      every process restores whole leaves, then keeps its own slices
  With `quant`, weights are quantized after the sharded read (jitted on sharded arrays) and the
  result is placed with `gemma.parallel.sharding.shard_params` at the end.

  Integrity: a converted checkpoint's arrays are checked against the CRC-32s recorded when it
  was written (`verify=False` skips it; so does a mesh), and every format's tensors are checked
  for non-finite values as they are read; either names the bad tensor (CheckpointError).
  """
  fmt = detect_format(path)
  if preset is not None and cfg is None:
    cfg = get_preset(preset)
  finish = None
  if quant is not None:
    recipe = resolve(quant)
    stored = converted.read_recipe(path) if fmt == "converted" else None
    if stored is not None and stored.name != recipe.name:
      raise CheckpointError(f"{path} is already quantized with recipe {stored.name!r}; "
                            f"cannot load it as {recipe.name!r}")
    finish = None if stored is not None else quantizer(recipe, float_dtype)
  loader = {"hf": hf.load, "gguf": gguf.load, "orbax": orbax_official.load,
            "converted": converted.load}[fmt]
  extra = {"verify_checksums": verify} if fmt == "converted" else {}
  cfg, params = loader(Path(path), dtype, cfg, finish=finish, mesh=mesh, **extra)
  cfg = with_generation_eos(cfg, path)
  if mesh is not None and finish is not None:
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


def load_tokenizer(checkpoint: str | Path):
  """The tokenizer of a checkpoint: a GGUF file's metadata, else `tokenizer.model`, else
  `tokenizer.json` in the checkpoint directory (or that file itself)."""
  path = Path(checkpoint)
  if not path.exists():
    raise CheckpointError(f"checkpoint {path} does not exist")
  if path.is_file() and path.suffix == ".model":
    return Tokenizer.from_file(path)
  if path.is_file() and path.suffix == ".json" and path.name != "config.json":
    return HFTokenizer(path)
  if path.is_file() and path.suffix == ".gguf":
    return tokenizer_from_gguf(path)
  folder = path if path.is_dir() else path.parent
  if (folder / "tokenizer.model").exists():
    return Tokenizer.from_file(folder / "tokenizer.model")
  if (folder / "tokenizer.json").exists():
    return HFTokenizer(folder / "tokenizer.json")
  raise FileNotFoundError(
      f"{checkpoint} has no tokenizer (tokenizer.model, tokenizer.json or GGUF metadata): "
      "pass --prompt-ids instead")


def convert(src_path: str | Path, out_dir: str | Path, dtype, cfg: ModelConfig | None = None,
            tokenizer_file: str | Path | None = None, force: bool = False,
            transform=None, load_dtype=None) -> Path:
  """Loads any supported checkpoint via `gemma.io.checkpoint.load` and saves it converted.

  Writes the source's tokenizer (`copy_tokenizer`: from GGUF metadata too) and copies
  generation_config.json (whose EOS ids `load` merges into the config). `transform(params)`
  edits the params before saving (e.g. folding in LoRA adapters); `load_dtype` (default `dtype`)
  is the dtype they are loaded and transformed in, before the cast to `dtype`.
  """
  src = Path(src_path)
  out = atomic.check_target(out_dir, force, replaceable=converted.is_converted)  # before loading
  t0 = time.perf_counter()
  log(f"loading {src} as {np.dtype(dtype).name}")
  cfg, params = load(src, load_dtype or dtype, cfg)
  if transform is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), transform(params))
  if tokenizer_file is None and (src / "tokenizer.model").is_file():
    tokenizer_file = src / "tokenizer.model"
  t1 = time.perf_counter()
  log(f"loaded {cfg.name} in {t1 - t0:.1f} s; writing {out}")
  converted.save_converted(out, cfg, params, tokenizer_file=tokenizer_file, force=force,
                           tokenizer_source=src)
  size = sum(f.stat().st_size for f in (out / converted.PARAMS_DIR).rglob("*") if f.is_file())
  log(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - t1:.1f} s")
  return out


def with_generation_eos(cfg: ModelConfig, path: str | Path) -> ModelConfig:
  """`cfg` with the EOS ids of a `generation_config.json` in the checkpoint directory added (so
  `load` + `gemma.inference.decode.generate` stop where the command does)."""
  gen = Path(path) / "generation_config.json"
  if not gen.is_file():
    return cfg
  eos = json.loads(gen.read_text()).get("eos_token_id")
  eos = {int(i) for i in ([eos] if isinstance(eos, int) else (eos or []))}
  if eos <= set(cfg.eos_ids):
    return cfg
  return dataclasses.replace(cfg, eos_ids=tuple(sorted({*cfg.eos_ids, *eos})))


def stop_ids(cfg: ModelConfig, tokenizer=None) -> tuple[int, ...]:
  """Every id generation stops on, for a config as `load` returns it: its EOS ids (GGUF: EOS,
  EOT and end-of-turn from the metadata; a directory's `generation_config.json`, merged by
  `load`), the tokenizer's <eos>, and its chat template's end-of-turn marker."""
  ids = set(cfg.eos_ids)
  if tokenizer is not None:
    ids.update(chat.stop_ids(tokenizer))
  return tuple(sorted(int(i) for i in ids if i is not None))

"""Loading checkpoints into `Params`: one entry point that detects the format.

Formats live in `gemma/formats/`: each is a declarative name table plus named transforms over a
stream of tensors, assembled and checked by `gemma.formats.common.assemble`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from gemma.config import ModelConfig
from gemma.formats import hf
from gemma.formats.common import CheckpointError
from gemma.params import Params

__all__ = ["CheckpointError", "detect_format", "inspect", "load", "load_hf"]


def detect_format(path: str | Path) -> str:
  """Names the format of a checkpoint path: "hf"."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint {path} does not exist")
  if path.is_dir() and (path / "config.json").exists():
    return "hf"
  if not path.is_dir():
    raise CheckpointError(f"checkpoint {path} is not a directory")
  raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")


def inspect(path: str | Path) -> tuple[str, ModelConfig]:
  """(format name, config) of a checkpoint, without reading any tensor."""
  fmt = detect_format(path)
  return fmt, {"hf": hf.read_config}[fmt](Path(path))


def load(path: str | Path, dtype=jnp.bfloat16,
         cfg: ModelConfig | None = None) -> tuple[ModelConfig, Params]:
  """Loads any supported checkpoint. Returns (config, params cast to `dtype`)."""
  fmt = detect_format(path)
  return {"hf": hf.load}[fmt](Path(path), dtype, cfg)


def load_hf(path: str | Path, dtype=jnp.bfloat16,
            cfg: ModelConfig | None = None) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face directory (config.json + safetensors)."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint {path} is not a directory")
  if not (path / "config.json").exists():
    raise CheckpointError(f"{path}: no config.json")
  return hf.load(path, dtype, cfg)

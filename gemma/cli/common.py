"""What the `gemma4` commands share: dtype, checkpoint, mesh and tokenizer from flags."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma.io.checkpoint import load, load_tokenizer
from gemma.parallel.sharding import make_mesh


def _dtype(name: str | None):

  if name is None:
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return jnp.dtype(name)


def _load(args, quantize: bool = True):
  """(cfg, params) of --checkpoint in --dtype, quantized on load by --quant unless `quantize`
  is False; read straight into the --mesh shardings when one is given."""

  quant = getattr(args, "quant", None) if quantize else None
  return load(args.checkpoint, _dtype(args.dtype), preset=args.preset, quant=quant,
              mesh=_mesh(args))


def _mesh(args):
  """The --mesh DxM device mesh, or None."""
  if not getattr(args, "mesh", None):
    return None

  return make_mesh(args.mesh)


def _tokenizer(checkpoint: str):

  return load_tokenizer(checkpoint)

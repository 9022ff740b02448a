"""The quantization commands of the `gemma4` CLI: `quantize` and `eval` (flags in gemma/cli.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gemma.checkpoint import load
from gemma.cli import _load, _tokenizer
from gemma.evaluate import check_stride, evaluate
from gemma.formats.converted import copy_tokenizer, save_converted
from gemma.quant import QArray, quantize_params
from gemma.quant.footprint import size_report
from gemma.quant.recipes import get_recipe


def _size_line(params) -> str:
  r = size_report(params)
  line = (f"{r['total_bytes']:,} bytes for {r['params']:,} parameters: "
          f"{r['total_bytes'] / r['params']:.4f} bytes/parameter (norms and scales included)")
  if r["quantized_bits_per_weight"] is not None:
    line += f"; quantized weights {r['quantized_bits_per_weight']:.4f} bits/weight"
  return line


def cmd_quantize(args) -> int:
  """`gemma4 quantize`: stream a checkpoint through a recipe into a converted directory."""
  recipe = get_recipe(args.recipe)
  out = Path(args.out)
  if (out / "params").exists() and not args.force:
    raise ValueError(f"{out} already holds a checkpoint (pass --force to overwrite)")
  t0 = time.perf_counter()
  # float32 source, each tensor quantized (or cast to --dtype) as soon as it is read
  cfg, params = load(args.checkpoint, jnp.float32, preset=args.preset, quant=recipe,
                     float_dtype=jnp.dtype(args.dtype or "bfloat16"))
  save_converted(out, cfg, params, force=args.force, recipe=recipe)
  copy_tokenizer(args.checkpoint, out)
  print(f"quantized {cfg.name} with {recipe.name} in {time.perf_counter() - t0:.1f} s: "
        f"{_size_line(params)}")
  print(f"wrote {out.absolute()}")
  return 0


def cmd_eval(args) -> int:
  """`gemma4 eval`: perplexity, and KL / top-1 agreement against the unquantized model (weights
  without --quant, KV cache without --kv-quant)."""
  stride = check_stride(args.context, args.stride)  # before loading anything
  text = Path(args.text).read_text(encoding="utf-8")
  if args.max_tokens < 0:
    raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
  tokenizer = _tokenizer(args.checkpoint)
  ids = tokenizer.encode(text, add_bos=False)
  ids = ids[:args.max_tokens] if args.max_tokens else ids
  if args.quant:
    cfg, reference = _load(args, quantize=False)
    if any(isinstance(x, QArray) for x in jax.tree.leaves(
        reference, is_leaf=lambda x: isinstance(x, QArray))):
      raise ValueError(f"{args.checkpoint} is already quantized; evaluate it without --quant")
    params = quantize_params(reference, args.quant)
  else:
    (cfg, params), reference = _load(args), None
  if args.kv_quant and reference is None:  # compare against the same weights, plain cache
    reference = params
  if getattr(args, "mesh", None):
    from gemma import sharding

    mesh = sharding.make_mesh(args.mesh)
    params = sharding.shard_params(params, mesh)
    reference = None if reference is None else sharding.shard_params(reference, mesh)
  result = evaluate(params, cfg, ids, args.context, reference=reference,
                    bos_id=getattr(tokenizer, "bos_id", None), kv_quant=args.kv_quant,
                    stride=stride)
  size = size_report(params)
  bits = size["quantized_bits_per_weight"] or size["bits_per_weight"]
  out = dict(perplexity=result.perplexity, mean_kl=result.mean_kl,
             top1_agreement=result.top1_agreement, bits_per_weight=bits,
             reference_perplexity=result.reference_perplexity, tokens=result.tokens,
             windows=result.windows, context=args.context, stride=stride,
             recipe=args.quant or "none",
             kv_quant=args.kv_quant or "none",
             model=cfg.name, bytes=size["total_bytes"], seconds=result.seconds)
  print(f"{cfg.name} [{out['recipe']}, kv {out['kv_quant']}] on {result.tokens} tokens: perplexity "
        f"{result.perplexity:.4f} (reference {result.reference_perplexity:.4f}), mean KL "
        f"{result.mean_kl:.5f}, top-1 agreement {result.top1_agreement:.4f}, "
        f"{bits:.3f} bits/weight")
  if args.json:
    print(json.dumps(out))
  return 0

"""The quantization commands of the `gemma4` CLI: `quantize` and `eval` (base flags in gemma/cli/app.py,
calibration and reference flags here)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gemma.cli.common import _dtype, _load, _tokenizer
from gemma.inference.evaluate import check_stride, evaluate
from gemma.io.checkpoint import load
from gemma.io.formats.converted import copy_tokenizer, save_converted
from gemma.parallel import sharding
from gemma.quant import QArray, allocate, quantize_params
from gemma.quant.calibrate import Calibration, calibrate, calibration_windows
from gemma.quant.footprint import size_report
from gemma.quant.gptq import METHODS
from gemma.quant.recipes import get_recipe


def add_quantize_parser(sub, common, recipes) -> None:
  """`gemma4 quantize`: recipe, output, and the flags of calibrated rounding and bit allocation."""
  p = sub.add_parser("quantize", help="quantize a checkpoint tensor by tensor and save it")
  common(p, dtype_help="stored dtype of the tensors kept in float (default bfloat16)")
  p.add_argument("--recipe", choices=list(recipes), required=True)
  p.add_argument("--out", required=True, help="output directory (loads like any checkpoint)")
  p.add_argument("--force", action="store_true", help="overwrite an existing --out")
  d = Calibration()
  p.add_argument("--calibrate", metavar="TEXT", default=None,
                 help="UTF-8 text to calibrate on: weights are rounded with GPTQ/LDLQ (or --method)"
                 " using the statistics of their inputs, collected layer by layer")
  p.add_argument("--calib-tokens", type=int, default=d.tokens,
                 help=f"use the first N tokens of the text (default {d.tokens})")
  p.add_argument("--calib-context", type=int, default=d.context,
                 help=f"calibration window length, BOS included (default {d.context})")
  p.add_argument("--method", choices=METHODS, default=None,
                 help="gptq (default: error feedback + weighted scale refit) or awq-scale "
                 "(importance-weighted scales only)")
  p.add_argument("--damp", type=float, default=d.damp,
                 help=f"GPTQ damping, fraction of H's mean diagonal (default {d.damp})")
  p.add_argument("--target-bpw", type=float, default=None,
                 help="choose a width per tensor (2-5 bits of the recipe's grid, or int8) for "
                 "this average of stored bits per quantized weight, by measured sensitivity")


def add_reference_flag(p) -> None:
  p.add_argument("--reference", default=None, metavar="PATH",
                 help="score against this checkpoint (any format, same tokenizer and "
                 "vocabulary) instead of the unquantized --checkpoint: KL, top-1 agreement and "
                 "both perplexities")


def _size_line(params) -> str:
  r = size_report(params)
  line = (f"{r['total_bytes']:,} bytes for {r['params']:,} parameters: "
          f"{r['total_bytes'] / r['params']:.4f} bytes/parameter (norms and scales included)")
  if r["quantized_bits_per_weight"] is not None:
    line += f"; quantized weights {r['quantized_bits_per_weight']:.4f} bits/weight"
  return line


def _calibration(args, recipe):
  """(Calibration, windows, recipe to use) from the flags, all checked before any weight loads."""
  if not args.calibrate:
    if args.method or args.target_bpw is not None:
      raise ValueError("--method and --target-bpw need --calibrate TEXT")
    return None, None, recipe
  calib = Calibration(method=args.method or "gptq", tokens=args.calib_tokens,
                      context=args.calib_context, damp=args.damp)
  if args.target_bpw is not None:
    allocate.check_target(args.target_bpw, allocate.candidates(recipe))
  tokenizer = _tokenizer(args.checkpoint)
  text = Path(args.calibrate).read_text(encoding="utf-8")
  ids = tokenizer.encode(text, add_bos=False)
  windows = calibration_windows(ids, tokenizer.bos_id, calib)
  note = (f"{calib.method} on {Path(args.calibrate).name}: {windows.shape[0]} windows of "
          f"{calib.context} tokens, damp {calib.damp}")
  return calib, windows, dataclasses.replace(recipe, calibration=note)


def cmd_quantize(args) -> int:
  """`gemma4 quantize`: stream a checkpoint through a recipe into a converted directory, or with
  --calibrate round every weight with calibration statistics (and --target-bpw: per-tensor
  widths)."""
  recipe = get_recipe(args.recipe)
  out = Path(args.out)
  if (out / "params").exists() and not args.force:
    raise ValueError(f"{out} already holds a checkpoint (pass --force to overwrite)")
  calib, windows, recipe = _calibration(args, recipe)
  t0 = time.perf_counter()
  float_dtype = jnp.dtype(args.dtype or "bfloat16")
  if calib is None:
    # float32 source, each tensor quantized (or cast to --dtype) as soon as it is read
    cfg, params = load(args.checkpoint, jnp.float32, preset=args.preset, quant=recipe,
                       float_dtype=float_dtype)
  else:
    cfg, params = load(args.checkpoint, jnp.float32, preset=args.preset)
    if _quantized(params):
      raise ValueError(f"{args.checkpoint} is already quantized; calibrate from a float "
                       "checkpoint")
    if args.target_bpw is not None:
      recipe = allocate.allocate(params, cfg, recipe, windows, args.target_bpw)
      print(f"widths chosen for {args.target_bpw} bits/weight:\n{allocate.widths_table(recipe)}")
    params = calibrate(params, cfg, recipe, windows, calib)
    params = jax.tree.map(lambda x: x if isinstance(x, QArray) else x.astype(float_dtype),
                          params, is_leaf=lambda x: isinstance(x, QArray))
  save_converted(out, cfg, params, force=args.force, recipe=recipe)
  copy_tokenizer(args.checkpoint, out)
  how = f" ({recipe.calibration})" if recipe.calibration else ""
  print(f"quantized {cfg.name} with {recipe.name}{how} in {time.perf_counter() - t0:.1f} s: "
        f"{_size_line(params)}")
  print(f"wrote {out.absolute()}")
  return 0


def _quantized(params) -> bool:
  return any(isinstance(x, QArray) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, QArray)))


def cmd_eval(args) -> int:
  """`gemma4 eval`: perplexity, and KL / top-1 agreement against the unquantized model (weights
  without --quant, KV cache without --kv-quant)."""
  stride = check_stride(args.context, args.stride)  # before loading anything
  text = Path(args.text).read_text(encoding="utf-8")
  if args.max_tokens < 0:
    raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
  tokenizer = _tokenizer(args.checkpoint)
  text_ids = tokenizer.encode(text, add_bos=False)
  ids = text_ids[:args.max_tokens] if args.max_tokens else text_ids
  ref_cfg = None
  if args.quant:
    cfg, reference = _load(args, quantize=False)
    if _quantized(reference):
      raise ValueError(f"{args.checkpoint} is already quantized; evaluate it without --quant")
    params = quantize_params(reference, args.quant)
  else:
    (cfg, params), reference = _load(args), None
  if args.reference:
    ref_cfg, reference = _reference(args, cfg, tokenizer, text, text_ids)
  elif args.kv_quant and reference is None:  # compare against the same weights, plain cache
    reference = params
  if getattr(args, "mesh", None):

    mesh = sharding.make_mesh(args.mesh)
    params = sharding.shard_params(params, mesh)
    reference = None if reference is None else sharding.shard_params(reference, mesh)
  result = evaluate(params, cfg, ids, args.context, reference=reference,
                    bos_id=getattr(tokenizer, "bos_id", None), kv_quant=args.kv_quant,
                    stride=stride, reference_cfg=ref_cfg)
  size = size_report(params)
  bits = size["quantized_bits_per_weight"] or size["bits_per_weight"]
  out = dict(perplexity=result.perplexity, mean_kl=result.mean_kl,
             top1_agreement=result.top1_agreement, bits_per_weight=bits,
             reference_perplexity=result.reference_perplexity, tokens=result.tokens,
             windows=result.windows, context=args.context, stride=stride,
             recipe=args.quant or "none",
             kv_quant=args.kv_quant or "none",
             reference=args.reference or "unquantized",
             model=cfg.name, bytes=size["total_bytes"], seconds=result.seconds)
  print(f"{cfg.name} [{out['recipe']}, kv {out['kv_quant']}] on {result.tokens} tokens: perplexity "
        f"{result.perplexity:.4f} (reference {result.reference_perplexity:.4f}), mean KL "
        f"{result.mean_kl:.5f}, top-1 agreement {result.top1_agreement:.4f}, "
        f"{bits:.3f} bits/weight")
  if args.json:
    print(json.dumps(out))
  return 0


def _reference(args, cfg, tokenizer, text, text_ids):
  """(config, params) of --reference, after checking it reads the text as `text_ids` (the
  --checkpoint tokenizer's ids) too."""
  path = Path(args.reference)
  if not path.exists():
    raise FileNotFoundError(f"--reference {path} does not exist")
  try:
    ref_tokenizer = _tokenizer(args.reference)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"--reference {path} has no tokenizer to check against --checkpoint's "
                     f"({e})") from None
  if ref_tokenizer.encode(text, add_bos=False) != text_ids or (
      getattr(ref_tokenizer, "bos_id", None) != getattr(tokenizer, "bos_id", None)):
    raise ValueError(f"--reference {path} tokenizes the text differently from --checkpoint "
                     f"{args.checkpoint}: they must share the tokenizer")
  ref_cfg, reference = load(args.reference, _dtype(args.dtype), preset=args.preset)
  if ref_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"--reference {path} has a vocabulary of {ref_cfg.vocab_size}, --checkpoint "
                     f"{args.checkpoint} of {cfg.vocab_size}: KL needs the same vocabulary")
  return ref_cfg, reference

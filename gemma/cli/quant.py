"""`gemma4 quantize` and `gemma4 eval`: flags onto `gemma.load`, `Model.quantize`,
`Model.save` and `Model.evaluate`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp

import gemma
from gemma.api import is_quantized
from gemma.cli import common
from gemma.inference.evaluate import check_stride
from gemma.io.atomic import check_target
from gemma.io.formats.converted import is_converted
from gemma.quant import allocate
from gemma.quant.calibrate import Calibration
from gemma.quant.footprint import size_report
from gemma.quant.gptq import METHODS
from gemma.quant.recipes import RECIPES, get_recipe


def add_quantize_parser(sub) -> None:
  """`gemma4 quantize`: recipe, output, and the flags of calibrated rounding and bit allocation."""
  p = sub.add_parser("quantize", help="quantize a checkpoint tensor by tensor and save it")
  common.add_checkpoint(p, dtype_help="stored dtype of the tensors kept in float "
                        "(default bfloat16)")
  p.add_argument("--recipe", choices=list(RECIPES), required=True)
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


def add_eval_flags(p) -> None:
  p.add_argument("--text", required=True, help="UTF-8 text file to score")
  p.add_argument("--context", type=int, default=1024,
                 help="window length in tokens, BOS included (default 1024)")
  p.add_argument("--stride", type=int, default=None,
                 help="strided (sliding-window) perplexity: a window starts every N text "
                 "tokens and scores only its last N, so each token is scored once with >= "
                 "context-1-N tokens of history; 1 <= N <= context-1 (default context-1: "
                 "non-overlapping windows)")
  p.add_argument("--max-tokens", type=int, default=0,
                 help="score only the first N tokens of the text (0: all)")
  p.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
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


def _read_text(path: str, flag: str) -> str:
  if not Path(path).is_file():
    raise FileNotFoundError(f"{flag} {path} does not exist")
  return Path(path).read_text(encoding="utf-8")


def cmd_quantize(args) -> int:
  """`gemma4 quantize`: stream a checkpoint through a recipe into a converted directory, or with
  --calibrate round every weight with calibration statistics (and --target-bpw: per-tensor
  widths)."""
  recipe = get_recipe(args.recipe)
  out = check_target(args.out, args.force, replaceable=is_converted)  # before loading anything
  float_dtype = jnp.dtype(args.dtype or "bfloat16")
  t0 = time.perf_counter()
  if not args.calibrate:
    if args.method or args.target_bpw is not None:
      raise ValueError("--method and --target-bpw need --calibrate TEXT")
    # float32 source, each tensor quantized (or cast to --dtype) as soon as it is read
    model = gemma.load(args.checkpoint, dtype="float32", preset=args.preset, quant=recipe,
                       float_dtype=float_dtype, verify=args.verify)
  else:  # every flag is checked before any weight loads
    calib = Calibration(method=args.method or "gptq", tokens=args.calib_tokens,
                        context=args.calib_context, damp=args.damp)
    if args.target_bpw is not None:
      allocate.check_target(args.target_bpw, allocate.candidates(recipe))
    text = _read_text(args.calibrate, "--calibrate")
    model = gemma.load(args.checkpoint, dtype="float32", preset=args.preset, verify=args.verify)
    ids = model.text_ids(text)
    windows = len(ids[:calib.tokens]) // (calib.context - 1)
    note = (f"{calib.method} on {Path(args.calibrate).name}: {windows} windows of "
            f"{calib.context} tokens, damp {calib.damp}")
    model = model.quantize(
        dataclasses.replace(recipe, calibration=note), calibrate_on=ids, calibration=calib,
        target_bpw=args.target_bpw, float_dtype=float_dtype,
        on_widths=lambda r: print(f"widths chosen for {args.target_bpw} bits/weight:\n"
                                  f"{allocate.widths_table(r)}"))
  model.save(out, force=args.force)
  how = f" ({model.recipe.calibration})" if model.recipe.calibration else ""
  print(f"quantized {model.name} with {model.recipe.name}{how} in "
        f"{time.perf_counter() - t0:.1f} s: {_size_line(model.params)}")
  print(f"wrote {out.absolute()}")
  return 0


def cmd_eval(args) -> int:
  """`gemma4 eval`: perplexity, and KL / top-1 agreement against the unquantized model (weights
  without --quant, KV cache without --kv-quant) or against --reference."""
  stride = check_stride(args.context, args.stride)  # before loading anything
  text = _read_text(args.text, "--text")
  if args.max_tokens < 0:
    raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
  if args.reference and not Path(args.reference).exists():
    raise FileNotFoundError(f"--reference {args.reference} does not exist")
  reference = None
  if args.quant:
    reference = common.load_model(args, quantize=False)
    if is_quantized(reference.params):
      raise ValueError(f"{args.checkpoint} is already quantized; evaluate it without --quant")
    model = reference.quantize(args.quant)
  else:
    model = common.load_model(args)
  if args.reference:
    reference = gemma.load(args.reference, dtype=args.dtype, preset=args.preset,
                           mesh=model.mesh)
    if reference.tokenizer is None:
      raise ValueError(f"--reference {args.reference} has no tokenizer to check against "
                       f"--checkpoint's")
  result = model.evaluate(text, context=args.context, stride=stride, max_tokens=args.max_tokens,
                          reference=reference)
  size = size_report(model.params)
  bits = size["quantized_bits_per_weight"] or size["bits_per_weight"]
  out = dict(perplexity=result.perplexity, mean_kl=result.mean_kl,
             top1_agreement=result.top1_agreement, bits_per_weight=bits,
             reference_perplexity=result.reference_perplexity, tokens=result.tokens,
             windows=result.windows, context=args.context, stride=stride,
             recipe=args.quant or "none",
             kv_quant=args.kv_quant or "none",
             reference=args.reference or "unquantized",
             model=model.name, bytes=size["total_bytes"], seconds=result.seconds)
  print(f"{model.name} [{out['recipe']}, kv {out['kv_quant']}] on {result.tokens} tokens: "
        f"perplexity {result.perplexity:.4f} (reference {result.reference_perplexity:.4f}), "
        f"mean KL {result.mean_kl:.5f}, top-1 agreement {result.top1_agreement:.4f}, "
        f"{bits:.3f} bits/weight")
  if args.json:
    print(json.dumps(out))
  return 0

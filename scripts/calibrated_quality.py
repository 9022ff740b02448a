"""Calibrated vs data-free quantization, side by side, on a held-out part of a text.

Calibrates on the first `--calib-tokens` tokens of the text and evaluates every model on the
last `--eval-windows` windows of `--context` tokens (disjoint from the calibration part; the
script refuses overlap), all in one run against one reference: the real Gemma 3 270M GGUF
(dequantized to float32) by default.

  .venv/bin/python scripts/calibrated_quality.py [--checkpoint PATH] [--text FILE]
      [--calib-tokens 8192] [--calib-context 512] [--context 1024] [--eval-windows 6]
      [--rtn R ...] [--gptq R ...] [--awq R ...] [--bpw 4.5 3.5] [--bpw-base tq4]
      [--bpw-windows 8] [--json-out FILE]

Rows: `R` (round to nearest, data-free), `R+gptq`, `R+awq`, `<base>-bpwX+gptq` (bit
allocation to an average of X bits per quantized weight, then GPTQ) and `--gguf NAME=FILE` (the
same model quantized by another tool, e.g. `scripts/llamacpp_requantize.py`). Prints a Markdown
table, then (last line) one JSON object {row: {...}, "_meta": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma.inference.evaluate import evaluate_many  # noqa: E402
from gemma.io.checkpoint import load, load_tokenizer  # noqa: E402
from gemma.io.formats.common import log  # noqa: E402
from gemma.io.formats.gguf_file import open_gguf  # noqa: E402
from gemma.quant import allocate  # noqa: E402
from gemma.quant.calibrate import Calibration, calibrate, calibration_windows  # noqa: E402
from gemma.quant.footprint import size_report  # noqa: E402
from gemma.quant.recipes import RECIPES, quantize_params  # noqa: E402
from scripts.quant_quality import default_checkpoint  # noqa: E402

RTN = ("tq4", "tq4-embed8", "tq4-g32-embed8", "nf4-g32-embed8", "int4-g32-embed8",
       "tq5-embed8", "int8", "tq3-embed8")
GPTQ = ("tq4", "tq4-g32", "tq4-embed8", "tq4-g32-embed8", "nf4-embed8", "nf4-g32",
        "nf4-g32-embed8", "int4-embed8", "int4-g32", "int4-g32-embed8", "tq3", "tq3-embed8")
AWQ = ("tq4-embed8", "nf4-g32-embed8")


def bits_split(params) -> tuple[float, float]:
  """Stored bits per weight of the quantized layers (all but the embedding) and the embedding."""
  r = size_report(params)["classes"]
  emb = r.get("embed", dict(bytes=0, params=1))
  rest = [v for k, v in r.items() if k not in ("embed", "float", "router")]
  layers = 8 * sum(v["bytes"] for v in rest) / max(1, sum(v["params"] for v in rest))
  return layers, 8 * emb["bytes"] / emb["params"]


def gguf_bits_split(path: str) -> tuple[float, float]:
  """Stored bits per weight of a GGUF file's matrices: all but the token embedding, and it."""
  f = open_gguf(path)
  mats = [t for t in f.tensors.values() if len(t.shape) >= 2]
  emb = [t for t in mats if t.name == "token_embd.weight"]
  rest = [t for t in mats if t.name != "token_embd.weight"]

  def bits(ts):
    return 8 * sum(t.nbytes for t in ts) / max(1, sum(int(np.prod(t.shape)) for t in ts))

  return bits(rest), bits(emb)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", default=None, help="default: the real Gemma 3 270M GGUF")
  ap.add_argument("--text", default=str(ROOT / "data" / "alice_in_wonderland.txt"))
  ap.add_argument("--calib-tokens", type=int, default=8192)
  ap.add_argument("--calib-context", type=int, default=512)
  ap.add_argument("--context", type=int, default=1024)
  ap.add_argument("--eval-windows", type=int, default=6)
  ap.add_argument("--rtn", nargs="*", default=list(RTN), choices=list(RECIPES))
  ap.add_argument("--gptq", nargs="*", default=list(GPTQ), choices=list(RECIPES))
  ap.add_argument("--awq", nargs="*", default=list(AWQ), choices=list(RECIPES))
  ap.add_argument("--bpw", nargs="*", type=float, default=[4.5, 3.5])
  ap.add_argument("--bpw-base", default="tq4", choices=list(RECIPES))
  ap.add_argument("--bpw-windows", type=int, default=8,
                  help="calibration windows used to measure sensitivities")
  ap.add_argument("--gguf", nargs="*", default=[], metavar="NAME=FILE",
                  help="extra rows: GGUF files of the same model quantized by another tool "
                  "(scripts/llamacpp_requantize.py), dequantized by our loader")
  ap.add_argument("--json-out", default=None)
  args = ap.parse_args(argv)

  checkpoint = args.checkpoint or default_checkpoint()
  tokenizer = load_tokenizer(checkpoint)
  ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_bos=False)
  span = args.context - 1
  eval_start = len(ids) - args.eval_windows * span
  if eval_start < args.calib_tokens:
    raise SystemExit(f"calibration part [0, {args.calib_tokens}) overlaps the evaluation part "
                     f"[{eval_start}, {len(ids)})")
  calib = Calibration(tokens=args.calib_tokens, context=args.calib_context)
  windows = calibration_windows(ids, tokenizer.bos_id, calib)
  cfg, reference = load(checkpoint, jnp.float32)
  models, how, gguf_bits = {}, {}, {}

  def add(name, params, seconds):
    models[name] = jax.block_until_ready(params)
    how[name] = seconds
    log(f"{name}: {seconds:.1f} s")

  for target in args.bpw:  # first: allocation measures the float model alone
    t0 = time.perf_counter()
    recipe = allocate.allocate(reference, cfg, args.bpw_base, windows[:args.bpw_windows], target)
    log(allocate.widths_table(recipe))
    add(f"{recipe.name}+gptq", calibrate(reference, cfg, recipe, windows, calib),
        time.perf_counter() - t0)
  for item in args.gguf:
    name, _, path = item.partition("=")
    t0 = time.perf_counter()
    other_cfg, params = load(path, jnp.float32)
    if other_cfg.vocab_size != cfg.vocab_size:
      raise SystemExit(f"{path} has another vocabulary than {checkpoint}")
    add(name, params, time.perf_counter() - t0)
    gguf_bits[name] = gguf_bits_split(path)
  for name in args.rtn:
    t0 = time.perf_counter()
    add(name, quantize_params(reference, name), time.perf_counter() - t0)
  for method, names in (("gptq", args.gptq), ("awq-scale", args.awq)):
    c = Calibration(method=method, tokens=args.calib_tokens, context=args.calib_context)
    for name in names:
      t0 = time.perf_counter()
      add(f"{name}+{method.split('-')[0]}", calibrate(reference, cfg, name, windows, c),
          time.perf_counter() - t0)
  results = evaluate_many(models, cfg, ids[eval_start:], args.context, reference=reference,
                          bos_id=tokenizer.bos_id)
  ref_ppl = next(iter(results.values())).reference_perplexity
  print(f"{cfg.name}: calibration on tokens [0, {windows.size - len(windows)}) of "
        f"{Path(args.text).name} ({len(windows)} windows of {args.calib_context}), evaluation on "
        f"tokens [{eval_start}, {len(ids)}) in windows of {args.context}; reference perplexity "
        f"{ref_ppl:.4f}\n")
  print("| quantizer | bits/weight: layers (embedding) | perplexity | Δ ppl | mean KL | top-1 |"
        " quantize s |")
  print("|---|---|---|---|---|---|---|")
  out = {}
  for name, r in results.items():
    layers, emb = gguf_bits.get(name) or bits_split(models[name])
    print(f"| {name} | {layers:.3f} ({emb:.3f}) | {r.perplexity:.4f} | "
          f"{100 * (r.perplexity / ref_ppl - 1):+.2f}% | {r.mean_kl:.4f} | "
          f"{r.top1_agreement:.4f} | {how[name]:.0f} |")
    out[name] = dict(perplexity=r.perplexity, mean_kl=r.mean_kl, top1_agreement=r.top1_agreement,
                     layer_bits=layers, embed_bits=emb,
                     bits_per_weight=None if name in gguf_bits else size_report(
                         models[name])["quantized_bits_per_weight"],
                     reference_perplexity=r.reference_perplexity, quantize_seconds=how[name])
  out["_meta"] = dict(model=cfg.name, text=Path(args.text).name, calib_tokens=windows.size,
                      calib_context=args.calib_context, eval_start=eval_start,
                      eval_tokens=len(ids) - eval_start, context=args.context,
                      machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                      date=time.strftime("%Y-%m-%d"))
  line = json.dumps(out)
  if args.json_out:
    Path(args.json_out).write_text(line + "\n")
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())

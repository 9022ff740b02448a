"""Quantization quality table: perplexity, KL and top-1 agreement of several recipes at once.

Same numbers as `gemma4 eval --quant R` for each recipe, but the reference model runs once per
window for all recipes. Default: the real Gemma 3 270M GGUF weights (dequantized = the
reference) on data/alice_in_wonderland.txt, windows of 1024 tokens.

  .venv/bin/python scripts/quant_quality.py [--checkpoint PATH] [--text FILE]
      [--recipes tq4 tq3 tq2 int8 int4 nf4] [--context 1024] [--max-tokens N]

Prints a Markdown table, then (last line) one JSON object {recipe: {perplexity, mean_kl,
top1_agreement, bits_per_weight, ...}, "_meta": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemma.inference.evaluate import evaluate_many  # noqa: E402
from gemma.io.checkpoint import load, load_tokenizer  # noqa: E402
from gemma.io.formats.common import log  # noqa: E402
from gemma.quant.footprint import size_report  # noqa: E402
from gemma.quant.recipes import RECIPES, quantize_params  # noqa: E402

DEFAULT_RECIPES = ("tq4", "tq3", "tq2", "int8", "int4", "nf4")


def default_checkpoint() -> str:
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gemma3_270m_path.py")],
                       capture_output=True, text=True, check=True)
  return out.stdout.strip()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", default=None, help="default: the real Gemma 3 270M GGUF")
  ap.add_argument("--text", default=str(ROOT / "data" / "alice_in_wonderland.txt"))
  ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES))
  ap.add_argument("--context", type=int, default=1024)
  ap.add_argument("--max-tokens", type=int, default=0, help="0: the whole text")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = ap.parse_args(argv)

  checkpoint = args.checkpoint or default_checkpoint()
  tokenizer = load_tokenizer(checkpoint)
  ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_bos=False)
  ids = ids[:args.max_tokens] if args.max_tokens else ids
  cfg, reference = load(checkpoint, jnp.dtype(args.dtype))
  models, bits = {}, {}
  for name in args.recipes:
    t0 = time.perf_counter()
    models[name] = jax.block_until_ready(quantize_params(reference, name))
    report = size_report(models[name])
    bits[name] = report["quantized_bits_per_weight"] or report["bits_per_weight"]
    log(f"quantized {name} in {time.perf_counter() - t0:.1f} s ({bits[name]:.3f} bits/weight)")
  results = evaluate_many(models, cfg, ids, args.context, reference=reference,
                          bos_id=tokenizer.bos_id)
  ref_ppl = next(iter(results.values())).reference_perplexity
  print(f"{cfg.name}, {len(ids)} tokens of {Path(args.text).name}, context {args.context}, "
        f"reference perplexity {ref_ppl:.4f}\n")
  print("| recipe | bits/weight | perplexity | Δ ppl | mean KL | top-1 agreement |")
  print("|---|---|---|---|---|---|")
  out = {}
  for name, r in results.items():
    print(f"| {name} | {bits[name]:.3f} | {r.perplexity:.4f} | "
          f"{100 * (r.perplexity / ref_ppl - 1):+.2f}% | {r.mean_kl:.5f} | "
          f"{r.top1_agreement:.4f} |")
    out[name] = dict(perplexity=r.perplexity, mean_kl=r.mean_kl,
                     top1_agreement=r.top1_agreement, bits_per_weight=bits[name],
                     reference_perplexity=r.reference_perplexity, seconds=r.seconds)
  out["_meta"] = dict(model=cfg.name, tokens=len(ids), context=args.context,
                      text=Path(args.text).name, machine=platform.processor() or platform.machine(),
                      cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())

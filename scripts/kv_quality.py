"""KV-cache quantization quality: perplexity, KL and greedy agreement vs a bf16 cache, and a
needle-in-a-haystack retrieval, for every --kv-quant width.

Default: the real Gemma 3 270M GGUF weights on data/alice_in_wonderland.txt, windows of 1024
tokens. Every scored token attends to the stored (quantized) keys and values of all earlier
tokens and of itself, exactly as in streaming decode (`gemma.inference.evaluate.log_probs`).

  .venv/bin/python scripts/kv_quality.py [--checkpoint PATH] [--text FILE] [--widths ...]
      [--context 1024] [--max-tokens N] [--needle-tokens 4096] [--attribution] [--seeds N]

Prints a Markdown table, then (last line) one JSON object {width: {...}, "_needle": {...},
"_meta": {...}}. "agreement" is the share of scored positions whose greedy (argmax) token equals
the bf16 cache's. --attribution adds, per width, "W:keys" (keys at W, values at 8 bits) and
"W:values" (keys at 8 bits with TurboQuant_mse, values at W): which half of the cache costs the
perplexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma.inference.decode import generate  # noqa: E402
from gemma.inference.evaluate import NEEDLE_ANSWER, evaluate_many, needle_prompt  # noqa: E402
from gemma.io.checkpoint import load, load_tokenizer  # noqa: E402
from gemma.io.formats.common import log  # noqa: E402
from gemma.kv.quant import KVQuant, bits_per_channel, get_kv_quant, parse_kv_cache  # noqa: E402
from gemma.quant.footprint import kv_cache_bytes  # noqa: E402
from scripts.quant_quality import default_checkpoint  # noqa: E402

DEFAULT_WIDTHS = ("tq2", "tq2.5", "tq3", "tq3.5", "tq4", "tq3.5-mse", "tq4-mse")
LONG = 32_768  # a second context for bytes/token (sink and recent window amortized)
HIGH_BITS = 8  # the other half of the cache in an attribution run (near-lossless: +0.05% ppl)


def attribution(width: str) -> dict[str, KVQuant]:
  """Keys-only and values-only variants of a width (the other half at HIGH_BITS)."""
  spec = get_kv_quant(width)
  high = (HIGH_BITS,) * spec.parts
  return {f"{width}:keys": dataclasses.replace(spec, name=f"{width}:keys", value_bits=high),
          f"{width}:values": dataclasses.replace(spec, name=f"{width}:values", key_bits=high,
                                                 key_method="mse")}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", default=None, help="default: the real Gemma 3 270M GGUF")
  ap.add_argument("--text", default=str(ROOT / "data" / "alice_in_wonderland.txt"))
  ap.add_argument("--widths", nargs="+", default=list(DEFAULT_WIDTHS), type=parse_kv_cache)
  ap.add_argument("--context", type=int, default=1024)
  ap.add_argument("--max-tokens", type=int, default=0, help="0: the whole text")
  ap.add_argument("--needle-tokens", type=int, default=4096, help="0: no needle test")
  ap.add_argument("--answer-tokens", type=int, default=8)
  ap.add_argument("--attribution", action="store_true",
                  help="also keys-only / values-only variants of each width")
  ap.add_argument("--seeds", type=int, default=1,
                  help="rotation/projection seeds per width (0..N-1); the table gives the mean "
                  "and, for N > 1, the standard deviation over seeds")
  args = ap.parse_args(argv)

  checkpoint = args.checkpoint or default_checkpoint()
  tokenizer = load_tokenizer(checkpoint)
  all_ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_bos=False)
  ids = all_ids[:args.max_tokens] if args.max_tokens else all_ids
  cfg, params = load(checkpoint, jnp.float32)
  head_dim = max(ls.head_dim for ls in cfg.layers)
  out = {}
  specs = {w: get_kv_quant(w) for w in args.widths}
  if args.attribution:
    for w in args.widths:
      specs.update(attribution(w))
  if args.context:
    seeded = {(w, seed): dataclasses.replace(spec, seed=seed, name=f"{spec.name}@{seed}")
              for w, spec in specs.items() for seed in range(args.seeds)}
    results = evaluate_many({key: params for key in seeded}, cfg, ids, args.context,
                            reference=params, bos_id=tokenizer.bos_id,
                            kv_quants=seeded, reference_kv_quant="bf16")
    ref_ppl = next(iter(results.values())).reference_perplexity
    for w, spec in specs.items():
      runs = [results[(w, seed)] for seed in range(args.seeds)]
      ppl = np.array([r.perplexity for r in runs])
      delta = 100 * (ppl / ref_ppl - 1)
      out[w] = dict(perplexity=float(ppl.mean()), delta_pct=float(delta.mean()),
                    delta_pct_sd=float(delta.std(ddof=1)) if len(runs) > 1 else 0.0,
                    delta_pct_per_seed=delta.tolist(),
                    mean_kl=float(np.mean([r.mean_kl for r in runs])),
                    agreement=float(np.mean([r.top1_agreement for r in runs])),
                    bits_per_channel=bits_per_channel(spec, head_dim),
                    bytes_per_token=kv_cache_bytes(cfg, args.context, kv_quant=spec)
                    / args.context,
                    bytes_per_token_32k=kv_cache_bytes(cfg, LONG, kv_quant=spec) / LONG,
                    reference_perplexity=ref_ppl, seeds=args.seeds,
                    seconds=sum(r.seconds for r in runs))
    out["bf16"] = dict(perplexity=ref_ppl, delta_pct=0.0, mean_kl=0.0, agreement=1.0,
                       bits_per_channel=16.0, reference_perplexity=ref_ppl,
                       bytes_per_token=kv_cache_bytes(cfg, args.context, kv_quant="bf16")
                       / args.context,
                       bytes_per_token_32k=kv_cache_bytes(cfg, LONG, kv_quant="bf16") / LONG)
  needle = {}
  if args.needle_tokens:
    prompt = needle_prompt(tokenizer, all_ids, args.needle_tokens)
    for w in ("bf16", *args.widths):
      t0 = time.perf_counter()
      g = generate(params, cfg, [prompt], args.answer_tokens, kv_quant=w, eos_ids=[])
      answer = tokenizer.decode(g.tokens[0])
      needle[w] = dict(answer=answer, tokens=g.tokens[0], found=NEEDLE_ANSWER in answer,
                       kv_cache_bytes=g.kv_cache_bytes, seconds=time.perf_counter() - t0)
      log(f"needle {w}: {answer!r} ({needle[w]['seconds']:.1f} s)")
    for w in needle:
      needle[w]["same_as_bf16"] = needle[w]["tokens"] == needle["bf16"]["tokens"]

  print(f"{cfg.name}, {len(ids)} tokens of {Path(args.text).name}, context {args.context}; "
        f"needle at {args.needle_tokens} tokens\n")
  seeds = f", mean ± sd over {args.seeds} seeds" if args.seeds > 1 else ""
  print(f"| KV cache | bits/channel | bytes/token @{args.context} | bytes/token @{LONG} | "
        f"perplexity | Δ ppl{seeds} | mean KL | greedy agreement | needle answer | same as bf16 |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for w in ("bf16", *specs):
    r, n = out.get(w), needle.get(w, {})
    cells = ["-"] * 7 if r is None else [
        f"{r['bits_per_channel']:.3f}", f"{r['bytes_per_token']:,.0f}",
        f"{r['bytes_per_token_32k']:,.0f}", f"{r['perplexity']:.4f}",
        f"{r['delta_pct']:+.2f}%" + (f" ± {r['delta_pct_sd']:.2f}" if r.get("delta_pct_sd")
                                     else ""),
        f"{r['mean_kl']:.5f}", f"{r['agreement']:.4f}"]
    cells += [repr(n.get("answer", "-")), str(n.get("same_as_bf16", "-"))]
    print(f"| {w} | " + " | ".join(cells) + " |")
  out["_needle"] = needle
  out["_meta"] = dict(model=cfg.name, tokens=len(ids), context=args.context,
                      needle_tokens=args.needle_tokens, text=Path(args.text).name,
                      machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                      date=time.strftime("%Y-%m-%d"))
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())

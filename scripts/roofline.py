"""A roofline PREDICTION of batch-1 decode on H100 SXM and H200 from the kernel compile report:
per kernel and per decode step, HBM time (bytes / bandwidth) against instruction-issue time
(weights x SASS instructions per weight / lane-instructions per second). Not a measurement: the
first GPU run (scripts/gpu_check.sh) checks it.

  python scripts/roofline.py [--report docs/kernel_report_sm90.json] [--context 1024] [--json]

Per card: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz = 33.5e12 lane-instructions/s (H100 SXM
and H200 have the same SMs and clock), HBM 3.35 TB/s (H100 SXM) or 4.8 TB/s (H200), datasheet
figures (sustained copies reach ~90 % of them).
Per kernel: a weight-streaming matmul of the report's configuration at those rates: predicted
% of bandwidth = HBM time / max(HBM time, issue time).
Per decode step of a preset and weight format (`gemma.quant.recipes`): bytes = every weight the
step reads (one PLE row per token, the active experts' share) + a bf16 KV cache at `--context`
(`scripts/bench_decode.bytes_per_step`); issue time = weights of the quantized matmuls x the
report's instructions per weight (decode tiling for the layers, the row-major LM-head kernel
for the tied embedding; tq4-poly's LM head uses the poly decode count, the only poly figure).
bf16 weights run through XLA's own GEMV (no dequantization): issue time 0, i.e. the prediction is
the bandwidth bound. What the model leaves out, and a GPU will add: kernel launches and the
per-layer dispatch floor (~10-20 us per layer for E2B/E4B-sized layers), attention time beyond
reading the cache, L2 effects, and occupancy (the report's 12-16 warps per SM may not hide HBM
latency).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma.model import config as C  # noqa: E402
from gemma.quant.footprint import quantized_abstract, size_report  # noqa: E402
from scripts.bench_decode import bytes_per_step  # noqa: E402

LANES_PER_S = 132 * 4 * 32 * 1.98e9
CARDS = {"H100 SXM": 3.35e12, "H200": 4.8e12}
FORMATS = {  # recipe -> (bits, report config of the layer matmuls, of the LM head)
    "bf16": (16, None, None),
    "tq4": (4, "tq4 beta decode", "tq4 beta lm_head"),
    "tq4-poly": (4, "tq4 poly decode", "tq4 poly decode"),
    "tq2": (2, "tq2 beta decode", "tq2 beta lm_head"),
}
MATMUL_CLASSES = ("attention", "mlp", "experts", "ple_proj")


def per_weight(report: list[dict], prefix: str | None) -> float:
  if prefix is None:
    return 0.0
  rows = [r for r in report if r["kernel"] == "codebook_matmul" and r["sm"] == 90
          and r["config"].startswith(prefix)]
  if not rows:
    raise SystemExit(f"the report has no sm_90 codebook_matmul row '{prefix} ...'")
  return rows[0]["instr_per_weight"]


def kernels(report: list[dict]) -> list[dict]:
  rows = []
  for r in report:
    if r["sm"] != 90 or r["kernel"] != "codebook_matmul" or "prefill" in r["config"]:
      continue
    bits = int(r["config"][2]) if r["config"].startswith("tq") else 4
    for card, bw in CARDS.items():
      hbm = bits / 8 / bw  # seconds per weight
      issue = r["instr_per_weight"] / LANES_PER_S
      rows.append(dict(kernel=r["config"], card=card, instr_per_weight=r["instr_per_weight"],
                       budget=LANES_PER_S * bits / 8 / bw,
                       pct_bandwidth=100 * hbm / max(hbm, issue)))
  return rows


def steps(report: list[dict], context: int) -> list[dict]:
  rows = []
  for preset in ("gemma4-e4b", "gemma4-31b"):
    cfg = C.get_preset(preset)
    for recipe, (_, layer_row, head_row) in FORMATS.items():
      tree = quantized_abstract(cfg, recipe)
      classes = size_report(tree)["classes"]
      nbytes = bytes_per_step(cfg, tree, 1, context, 2)
      experts = classes.get("experts", {"params": 0})["params"]
      active = experts * cfg.top_k_experts / max(cfg.num_experts, 1)
      layer_weights = sum(classes[c]["params"] for c in MATMUL_CLASSES if c in classes)
      layer_weights -= experts - active
      instr = (layer_weights * per_weight(report, layer_row)
               + classes["embed"]["params"] * per_weight(report, head_row))
      for card, bw in CARDS.items():
        hbm, issue = nbytes / bw, instr / LANES_PER_S
        step = max(hbm, issue)
        rows.append(dict(preset=preset, recipe=recipe, card=card, context=context,
                         gb_per_step=nbytes / 1e9, hbm_ms=1e3 * hbm, issue_ms=1e3 * issue,
                         pct_bandwidth=100 * hbm / step, tokens_per_s=1 / step,
                         bound_tokens_per_s=1 / hbm))
  return rows


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--report", default=str(ROOT / "docs/kernel_report_sm90.json"))
  ap.add_argument("--context", type=int, default=1024)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args()
  report = json.loads(Path(args.report).read_text())
  krows, srows = kernels(report), steps(report, args.context)
  print("PREDICTION (not measured). Per kernel, weight streaming at batch 1:")
  print("| kernel (sm_90) | card | instr/weight | budget | predicted % of bandwidth |")
  print("|---|---|---|---|---|")
  for r in krows:
    print(f"| {r['kernel']} | {r['card']} | {r['instr_per_weight']:.1f} | {r['budget']:.1f} | "
          f"{r['pct_bandwidth']:.0f} % |")
  print(f"\nPer decode step, batch 1, bf16 KV cache at context {args.context}:")
  print("| preset | weights | card | GB/step | HBM ms | issue ms | predicted % of bandwidth | "
        "predicted tok/s | bandwidth bound tok/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in srows:
    print(f"| {r['preset']} | {r['recipe']} | {r['card']} | {r['gb_per_step']:.2f} | "
          f"{r['hbm_ms']:.2f} | {r['issue_ms']:.2f} | {r['pct_bandwidth']:.0f} % | "
          f"{r['tokens_per_s']:.0f} | {r['bound_tokens_per_s']:.0f} |")
  if args.json:
    print(json.dumps(dict(kernels=krows, steps=srows)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

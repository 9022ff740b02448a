"""Monte Carlo of TurboQuant's distortion (arXiv:2504.19874 Thm 1-2) against the exact values.

  python scripts/turboquant_distortion.py --d 128 --bits 1 2 3 4 [--rotations 20] \
      [--vectors 4000] [--rotation haar|hadamard] [--rounds 2] [--law beta|gauss] [--json]

For each bit width b: D_mse = E‖x - x̃‖² of TurboQuant_mse over uniform unit x (mean over
`--rotations` random rotations x `--vectors` vectors each), d·D_prod = d·E(⟨y, x̃⟩ - ⟨y, x⟩)² of
TurboQuant_prod with y independent of x, and the shrinkage factor E⟨x, x̃_mse⟩ (= 1 - D_mse).
With --json the last stdout line is one JSON object {"d", "mse", "prod", "bias", ...}, keyed by b.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gemma.quant import montecarlo  # noqa: E402

# The paper's rounded values (Thm 1 and 2; D_prod given as d·D_prod for |y| = 1).
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
PAPER_PROD = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--d", type=int, default=128)
  ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
  ap.add_argument("--rotations", type=int, default=20, help="independent rotations (>= 20)")
  ap.add_argument("--vectors", type=int, default=4000, help="unit vectors per rotation")
  ap.add_argument("--rotation", choices=("haar", "hadamard"), default="haar")
  ap.add_argument("--rounds", type=int, default=2, help="randomized Hadamard rounds")
  ap.add_argument("--law", choices=("beta", "gauss"), default="beta", help="codebook law")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", action="store_true", help="end with one JSON line")
  args = ap.parse_args(argv)
  out = montecarlo.distortion(args.d, args.bits, draws=args.rotations, vectors=args.vectors,
                              seed=args.seed, kind=args.rotation, rounds=args.rounds,
                              law=args.law)
  print(f"d={args.d}, {args.rotations} {args.rotation} rotations x {args.vectors} vectors, "
        f"{args.law} codebooks")
  print(f"{'b':>2} {'D_mse':>9} {'±se':>8} {'exact':>9} {'paper':>6} {'d*D_prod':>9} "
        f"{'predicted':>9} {'paper':>6} {'E<x,x~>':>8} {'4^-b':>7} {'2.72*4^-b':>9}")
  for b in args.bits:
    k = str(b)
    print(f"{b:>2} {out['mse'][k]:>9.5f} {out['mse_se'][k]:>8.5f} {out['exact_mse'][k]:>9.5f} "
          f"{PAPER_MSE.get(b, float('nan')):>6} {out['prod'][k]:>9.4f} "
          f"{out['predicted_prod'][k]:>9.4f} {PAPER_PROD.get(b, float('nan')):>6} "
          f"{out['bias'][k]:>8.4f} {4.0 ** -b:>7.4f} {2.72 * 4.0 ** -b:>9.4f}")
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()

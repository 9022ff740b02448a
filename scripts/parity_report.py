"""Prints our logits error against the reference fixtures (f32 and bf16), for docs/BENCHMARKS.md.

  python scripts/parity_report.py [--fixtures tests/fixtures]

Error = max|ours - reference_f64| / max|reference_f64| over the prompt. The bf16 row also shows
the reference's own bf16 error, the yardstick a bf16 run is measured against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma.io.checkpoint import load_hf
from gemma.model.transformer import forward


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--fixtures", type=Path, default=Path("tests/fixtures"))
  args = ap.parse_args()
  run = jax.jit(forward, static_argnames="cfg")
  print("| fixture | dtype | max rel error | argmax agreement | reference's own error | ratio |")
  print("|---|---|---|---|---|---|")
  for path in sorted(p for p in args.fixtures.iterdir() if (p / "reference.npz").exists()):
    ref = np.load(path / "reference.npz")
    ids = jnp.asarray(ref["prompt_ids"])[None]
    scale = np.abs(ref["logits"]).max()
    own = {"float32": None, "bfloat16": np.abs(ref["logits_bf16"] - ref["logits"]).max() / scale}
    for dtype, theirs in own.items():
      cfg, params = load_hf(path, jnp.dtype(dtype))
      logits = np.asarray(run(params, ids, jnp.arange(ids.shape[1])[None], cfg)[0][0])
      err = np.abs(logits - ref["logits"]).max() / scale
      agree = (logits.argmax(-1) == ref["logits"].argmax(-1)).mean()
      ratio = f"{err / theirs:.2f}" if theirs else "-"
      theirs_s = f"{theirs:.3g}" if theirs else "-"
      print(f"| {path.name} | {dtype} | {err:.3g} | {agree:.3f} | {theirs_s} | {ratio} |")


if __name__ == "__main__":
  main()

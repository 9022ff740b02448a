"""Issue 24 item 1 against the reference: transformers loads our Hugging Face export
(`gemma.io.formats.hf_export.export_hf`) and reproduces our logits.

Two steps, one per venv (the reference venv has torch + transformers, no jax):

  # 1. ours (.venv): each parity fixture loaded as `gemma.load` serves it (fused q/k/v and
  #    gate/up), exported in float32 to WORK/<family>, reloaded from the export, and its logits
  #    on the fixture's prompt saved to WORK/<family>.ours.npz
  .venv/bin/python scripts/check_export_reference.py ours --work /tmp/hf_export
  # 2. the reference (.venv-ref): AutoModelForCausalLM.from_pretrained(WORK/<family>,
  #    dtype=float32, eager attention), no missing / unexpected / mis-shaped tensors, logits on
  #    the same prompt
  .venv-ref/bin/python scripts/check_export_reference.py reference --work /tmp/hf_export

  # or both at once from the reference venv (step 1 runs in a subprocess with .venv's python)
  .venv-ref/bin/python scripts/check_export_reference.py all --work /tmp/hf_export
  # sharded exports (model-0000i-of-0000N.safetensors + index), loaded the same way
  .venv-ref/bin/python scripts/check_export_reference.py all --work /tmp/hf_sharded \
      --max-shard-bytes 20000

`reference` prints one JSON line per family: `rel_vs_ours` = max|hf - ours| / max|ours| (must be
<= 1e-4) and `rel_vs_fixture` (against the float64 logits in tests/fixtures/<family>/reference.npz,
which transformers computed from the original weights). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("e_style", "dense_keqv", "moe", "gemma3")
TOLERANCE = 1e-4
ARCHITECTURES = {"gemma3": "Gemma3ForCausalLM"}  # the others: Gemma4ForCausalLM


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _fixture(family: str) -> Path:
  return ROOT / "tests" / "fixtures" / family


# ------------------------------------------------------------------------------ ours (.venv)
def ours(work: Path, families, max_shard_bytes: int = 2_000_000_000) -> None:
  import gemma
  from gemma.io.formats.hf_export import export_hf

  work.mkdir(parents=True, exist_ok=True)
  for family in families:
    prompt = np.load(_fixture(family) / "reference.npz")["prompt_ids"]
    model = gemma.load(_fixture(family), dtype="float32")
    out, notes = export_hf(model.params, model.cfg, work / family, dtype="float32",
                           tokenizer_source=_fixture(family), force=True,
                           max_shard_bytes=max_shard_bytes)
    logits = gemma.load(out, dtype="float32").logits(prompt)
    np.savez(work / f"{family}.ours.npz", prompt_ids=prompt, logits=logits)
    print(json.dumps({"family": family, "export": str(out), "notes": notes}), flush=True)


# ------------------------------------------------------------------------- reference (torch)
def reference(work: Path, families) -> bool:
  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  ok = True
  for family in families:
    saved = np.load(work / f"{family}.ours.npz")
    model, info = AutoModelForCausalLM.from_pretrained(
        work / family, dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True)
    model.eval()
    ids = torch.as_tensor(saved["prompt_ids"], dtype=torch.long)[None]
    with torch.no_grad():
      logits = model(input_ids=ids, use_cache=False).logits[0].double().numpy()
    fixture = np.load(_fixture(family) / "reference.npz")["logits"]
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    row = {"family": family, "class": type(model).__name__,
           "rel_vs_ours": _rel(logits, saved["logits"]),
           "rel_vs_fixture": _rel(logits, fixture),
           "ours_vs_fixture": _rel(saved["logits"], fixture),
           "loading_problems": problems, "transformers": transformers.__version__,
           "torch": torch.__version__}
    row["pass"] = (row["rel_vs_ours"] <= TOLERANCE and not problems
                   and row["class"] == ARCHITECTURES.get(family, "Gemma4ForCausalLM"))
    ok &= row["pass"]
    print(json.dumps(row), flush=True)
  return ok


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("step", choices=("ours", "reference", "all"))
  ap.add_argument("--work", type=Path, required=True, help="folder of the exports")
  ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
  ap.add_argument("--max-shard-bytes", type=int, default=2_000_000_000,
                  help="step 'ours': shard the safetensors above this size (e.g. 20000)")
  ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                  help="python of the jax venv (step 'all')")
  args = ap.parse_args(argv)
  if args.step == "ours":
    ours(args.work, args.families, args.max_shard_bytes)
    return 0
  if args.step == "all":
    subprocess.run([args.python, __file__, "ours", "--work", str(args.work), "--families",
                    *args.families, "--max-shard-bytes", str(args.max_shard_bytes)],
                   check=True, cwd=ROOT)
  return 0 if reference(args.work, args.families) else 1


if __name__ == "__main__":
  sys.exit(main())

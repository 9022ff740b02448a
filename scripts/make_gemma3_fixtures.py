"""Generate a tiny random-weight Gemma 3 parity fixture with the Hugging Face reference.

Builds one tiny ``Gemma3ForCausalLM`` (eager attention) and writes to ``<out>/`` the float32
``config.json`` + ``model.safetensors`` (``save_pretrained``), ``reference.npz`` (same fields as
the Gemma 4 fixtures of scripts/make_reference_fixtures.py) and ``README.md``.

Structure chosen so that convention bugs show: 7 layers ``LLLLLGL`` (5:1 with a local last
layer, as gemma-3-1b), GQA 8 query / 2 KV heads (N*H = 128 != D = 64), MLP 96,
``query_pre_attn_scalar`` 24 != head_dim 16, window 8 with a 28-token prompt, local RoPE base
1e4 and global 1e6 with a linear factor 2 (global layers only), tied embeddings. Every
``(1 + w)`` norm scale (q/k norms included) is drawn from U(-0.5, 0.5) instead of its default 0.
Reference numbers come from ``copy.deepcopy(model).double()``.

Run with the reference venv (torch + transformers >= 5.23)::

  python scripts/make_gemma3_fixtures.py --out tests/fixtures/gemma3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from make_reference_fixtures import forward, greedy  # same greedy/forward as Gemma 4
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

VOCAB = 512
PROMPT_LEN = 28
MIN_MARGIN = 5e-3
MIN_DISTINCT = 6  # distinct ids among the greedy tokens: rejects copy/repeat loops
MAX_NOISE = 2e-5  # max|f32 - f64| / max|f64| of the reference itself, on prompt + greedy
MAX_SEEDS = 64
L, G = "sliding_attention", "full_attention"
CONFIG = dict(
  vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
  layer_types=[L, L, L, L, L, G, L], num_attention_heads=8, num_key_value_heads=2, head_dim=16,
  query_pre_attn_scalar=24, sliding_window=8, rope_theta=1_000_000.0,
  rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
  final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
  rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
  hidden_activation="gelu_pytorch_tanh", max_position_embeddings=4096,
)
# What save_pretrained must write (transformers 5 folds the legacy rope keys into this).
ROPE_PARAMETERS = {
  G: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
  L: {"rope_type": "default", "rope_theta": 10_000.0},
}


def make_config() -> Gemma3TextConfig:
  return Gemma3TextConfig(**copy.deepcopy(CONFIG), attn_implementation="eager")


@torch.no_grad()
def randomize(model: Gemma3ForCausalLM, seed: int) -> None:
  """Re-draw every weight; move every (1 + w) norm scale away from its default w = 0."""
  gen = torch.Generator().manual_seed(seed)

  def normal(t: torch.Tensor, std: float) -> None:
    t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std)

  def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64))

  for name, p in model.named_parameters():  # the tied lm_head is yielded once (embed_tokens)
    if name.endswith("embed_tokens.weight"):
      normal(p, 0.05)  # small, so that greedy decoding does not just copy its input
    elif name == "model.norm.weight":
      uniform(p, 1.0, 3.0)  # (1 + w) in [2, 4] acts as a temperature on the logits
    elif p.ndim >= 2:
      normal(p, p.shape[-1] ** -0.5)  # nn.Linear [out, in]
    else:  # every other RMSNorm scale, q_norm and k_norm included
      uniform(p, -0.5, 0.5)


def make_prompt() -> torch.Tensor:
  """Fixed prompt: bos followed by ids in [3, VOCAB)."""
  gen = torch.Generator().manual_seed(3000)
  return torch.cat([torch.tensor([2]), torch.randint(3, VOCAB, (PROMPT_LEN - 1,), generator=gen)])


def check_saved_config(out: Path) -> None:
  """The structural fields round-trip through config.json as intended."""
  saved = json.loads((out / "config.json").read_text())
  assert saved["model_type"] == "gemma3_text", saved["model_type"]
  for key, value in CONFIG.items():
    if key != "rope_scaling" and not key.startswith("rope_"):
      assert saved.get(key) == value, f"{key}: {saved.get(key)} != {value}"
  assert saved["rope_parameters"] == ROPE_PARAMETERS, saved["rope_parameters"]


def build(out: Path) -> dict:
  config = make_config()
  prompt = make_prompt()
  for seed in range(MAX_SEEDS):
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    randomize(model, seed)
    ref = copy.deepcopy(model).double().eval()
    greedy_ids, margin = greedy(ref, prompt)
    full_ids = torch.cat([prompt, greedy_ids])
    full64 = forward(ref, full_ids)
    noise = float((forward(model, full_ids) - full64).abs().max() / full64.abs().max())
    distinct = len(set(greedy_ids.tolist()))
    print(f"seed {seed}: min_margin {margin:.3e}, f32 noise {noise:.2e}, "
          f"greedy {greedy_ids.tolist()}")
    if margin >= MIN_MARGIN and distinct >= MIN_DISTINCT and noise <= MAX_NOISE:
      break
  else:
    raise RuntimeError(f"no seed < {MAX_SEEDS} gave a usable fixture")

  logits64 = forward(ref, prompt)
  assert torch.allclose(full64[: len(prompt)], logits64, atol=1e-9, rtol=0)
  assert torch.equal(full64[len(prompt) - 1: -1].argmax(-1), greedy_ids)
  logits32 = forward(model, prompt)
  assert torch.equal(greedy(model, prompt)[0], greedy_ids), "f32 greedy path differs from f64"

  out.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(out)
  check_saved_config(out)
  reloaded = Gemma3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  want, got = model.state_dict(), reloaded.state_dict()
  assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
  reload_diff = float((forward(reloaded, prompt) - logits32).abs().max() / logits32.abs().max())
  assert reload_diff <= 1e-5, f"reload changed logits by {reload_diff:.2e} (rel)"

  ref_dtype = str(ref.dtype).removeprefix("torch.")
  # The reference's own bfloat16 logits: the yardstick for a bfloat16 reimplementation.
  logits_bf16 = forward(copy.deepcopy(model).to(torch.bfloat16), prompt).float()
  bf16_err = float((logits_bf16 - logits64).abs().max() / logits64.abs().max())
  np.savez(
    out / "reference.npz",
    prompt_ids=prompt.numpy().astype(np.int32),
    logits=logits64.numpy(),
    greedy_ids=greedy_ids.numpy().astype(np.int32),
    full_logits=full64.numpy(),
    logits_bf16=logits_bf16.numpy().astype(np.float32),
    reference_dtype=np.array(ref_dtype),
    min_margin=np.array(margin, dtype=np.float64),
    seed=np.array(seed, dtype=np.int32),
  )
  sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != "README.md"}
  return dict(seed=seed, margin=margin, noise=noise, reload=reload_diff, bf16=bf16_err,
              ref_dtype=ref_dtype, greedy=greedy_ids.tolist(), sizes=sizes,
              logit_std=float(logits64.std()))


def write_readme(out: Path, r: dict) -> None:
  lines = [
    "# Gemma 3 reference fixture",
    "",
    "A tiny random-weight `Gemma3ForCausalLM` (eager attention) with reference logits from "
    "Hugging Face transformers: hidden 64, 7 layers `LLLLLGL` (explicit `layer_types`; the "
    "last layer is local, as in gemma-3-1b), 8 query heads / 2 KV heads, head_dim 16, MLP 96, "
    "`query_pre_attn_scalar` 24, window 8, 28-token prompt, local RoPE base 1e4, global 1e6 "
    "with a linear factor 2 (global layers only), no soft-caps, tied embeddings, vocab 512.",
    "Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.05); every `(1 + w)` RMSNorm scale "
    "(q/k norms included) has w ~ U(-0.5, 0.5), the final norm w ~ U(1, 3): none is left at "
    "its default 0.",
    "",
    "Generated with a reference venv (.venv-ref: transformers and torch, versions below) by:",
    "",
    "    .venv-ref/bin/python scripts/make_gemma3_fixtures.py --out tests/fixtures/gemma3",
    "",
    f"transformers {transformers.__version__}, torch {torch.__version__}, "
    f"numpy {np.__version__}, Python {sys.version.split()[0]}.",
    "",
    "`config.json` + `model.safetensors` (float32, `save_pretrained`; transformers 5 writes "
    "`layer_types` and a per-type `rope_parameters`), `reference.npz`: `prompt_ids` [T] int32, "
    "`logits` [T, V] float64 (prompt forward), `greedy_ids` [8] int32 (greedy, full "
    "re-forward per step, no cache), `full_logits` [T+8, V] (one forward over prompt + "
    "greedy ids), `logits_bf16` [T, V] (the reference run in bfloat16 over the prompt), "
    "`reference_dtype`, `min_margin` (smallest top-1 minus top-2 gap on the greedy steps), "
    "`seed`. Reference numbers come from `copy.deepcopy(model).double()` (whose RMSNorm and "
    "RoPE tables still run in float32).",
    "",
    "| seed | min_margin | f32-vs-f64 noise | ref bf16 error | ref dtype | greedy_ids |",
    "|---|---|---|---|---|---|",
    f"| {r['seed']} | {r['margin']:.3e} | {r['noise']:.2e} | {r['bf16']:.2e} | "
    f"{r['ref_dtype']} | {r['greedy']} |",
    "",
    "Errors are max|logits - logits_f64| / max|logits_f64|. The seed is the first that gives "
    f"min_margin >= {MIN_MARGIN:g}, >= {MIN_DISTINCT} distinct greedy ids and noise <= "
    f"{MAX_NOISE:g}.",
  ]
  (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("tests/fixtures/gemma3"))
  args = parser.parse_args()
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  r = build(args.out)
  write_readme(args.out, r)
  print(json.dumps({k: v for k, v in r.items() if k != "greedy"}, indent=1))
  print(f"total {sum(r['sizes'].values()) / 2**20:.2f} MiB")


if __name__ == "__main__":
  main()

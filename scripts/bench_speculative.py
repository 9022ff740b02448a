"""Speculative decoding, measured: prompt lookup on a real checkpoint, the verification cost
model, and the MTP drafters' drafting cost relative to a target step.

  python scripts/bench_speculative.py lookup [--checkpoint PATH] [--new-tokens 128]
      [--draft-tokens 2,4,8] [--json]
  python scripts/bench_speculative.py cost [--checkpoint PATH] [--context 512]
  python scripts/bench_speculative.py mtp --preset gemma4-e4b [--context 1024]
      [--draft-tokens 2]

lookup: decoding with and without prompt-lookup drafts (`--draft ngram`) on (a) a copy-heavy
  prompt (a passage of data/alice_in_wonderland.txt, then the request to repeat it and its
  first words) and (b) free text (a story opening), greedy, and (c) the free text sampled at
  `--temperature` (seed 1). Each configuration runs twice in one process and the second run
  counts (compiled, warm); greedy drafted output is compared token for token with plain.
cost: the target's time for one call over K+1 tokens through a KV cache of `context` columns,
  against one decode step (T = 1): what a verification costs.
mtp: a random-weight target of the preset's shapes (2 and 4 layers, sliding + global,
  extrapolated linearly to the full depth; the full vocabulary) and a random-weight drafter of
  the released assistant's shapes (`gemma.inference.mtp.assistant_preset`): the time of one
  drafting round of K steps against one target decode step. Weights in float32.
Default checkpoint: the real Gemma 3 270M (scripts/gemma3_270m_path.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gemma  # noqa: E402
from gemma.inference import mtp, speculative  # noqa: E402
from gemma.inference.decode import bucket_inputs, prefill_step  # noqa: E402
from gemma.kv.cache import init_cache  # noqa: E402
from gemma.model import config as C  # noqa: E402
from gemma.model.params import init  # noqa: E402
from gemma.model.transformer import forward  # noqa: E402


def default_checkpoint() -> str:
  out = subprocess.run([sys.executable, str(ROOT / "scripts/gemma3_270m_path.py")],
                       capture_output=True, text=True, check=True)
  return out.stdout.strip()


def prompts() -> dict[str, str]:
  text = (ROOT / "data/alice_in_wonderland.txt").read_text(encoding="utf-8")
  start = text.index("Alice was beginning")
  passage = " ".join(text[start:start + 1500].split())
  copy = (f"{passage}\n\nThe passage above, repeated word for word:\n\n"
          f"{' '.join(passage.split()[:12])}")
  free = ("The old lighthouse keeper had not spoken to anyone in three years. One stormy night "
          "in November, a knock came at his door, and")
  return {"copy-heavy": copy, "free text": free}


def best_of(fn, repeats: int = 5) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def cmd_lookup(args) -> list[dict]:
  model = gemma.load(args.checkpoint or default_checkpoint(), dtype="float32")
  rows = []
  texts = prompts()
  cases = [("copy-heavy", 0.0), ("free text", 0.0), ("free text", args.temperature)]
  for name, temperature in cases:
    prompt = texts[name]
    if temperature:
      name = f"{name}, sampled T={temperature}"

    def run(draft, prompt=prompt, temperature=temperature):  # the second run is warm
      model.draft = draft
      kw = dict(max_new_tokens=args.new_tokens, temperature=temperature, seed=1)
      model.generate(prompt, **kw)
      return model.generate(prompt, **kw)

    plain = run(None)
    base = plain.decode_tokens_per_s
    print(f"[{name}] {plain.text!r}", file=sys.stderr)
    rows.append(dict(prompt=name, draft="off", draft_tokens=0, prompt_tokens=len(
        plain.prompt_ids), tokens=len(plain.token_ids), decode_tokens_per_s=base, speedup=1.0,
        acceptance_rate=0.0, tokens_per_step=1.0, identical=True))
    print(json.dumps(rows[-1]), flush=True)
    for k in args.draft_tokens:
      got = run(speculative.Ngram(tokens=k))
      rows.append(dict(prompt=name, draft="ngram", draft_tokens=k,
                       prompt_tokens=len(got.prompt_ids), tokens=len(got.token_ids),
                       decode_tokens_per_s=got.decode_tokens_per_s,
                       speedup=got.decode_tokens_per_s / base,
                       acceptance_rate=got.acceptance_rate,
                       tokens_per_step=1 + got.mean_accepted_per_step,
                       identical=got.token_ids == plain.token_ids if not temperature
                       else "n/a (sampled)"))
      print(json.dumps(rows[-1]), flush=True)
  print("\n| prompt | draft | K | decode tok/s | vs plain | kept | tokens/step | identical |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['prompt']} | {r['draft']} | {r['draft_tokens'] or '-'} | "
          f"{r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
          f"{100 * r['acceptance_rate']:.0f} % | {r['tokens_per_step']:.2f} | {r['identical']} |")
  return rows


def _cached(params, cfg, context: int, slack: int = 8):
  cache = init_cache(cfg, 1, context + slack + 1, params.embed.dtype)
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, context), dtype=np.int32)
  _, cache = prefill_step(params, *bucket_inputs(cfg, ids, np.arange(context)[None]), cache, cfg)
  return cache


def cmd_cost(args) -> list[dict]:
  model = gemma.load(args.checkpoint or default_checkpoint(), dtype="float32")
  params, cfg = model.params, model.cfg
  cache = _cached(params, cfg, args.context)
  step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, cfg, c)[0])
  rows = []
  for t in (1, 2, 3, 5, 9):
    tokens = jnp.full((1, t), 5, jnp.int32)
    pos = jnp.arange(args.context, args.context + t, dtype=jnp.int32)[None]
    s = best_of(lambda: step(params, tokens, pos, cache).block_until_ready())  # noqa: B023
    rows.append(dict(tokens=t, ms=1e3 * s))
  for r in rows:
    r["vs_one"] = r["ms"] / rows[0]["ms"]
  print(f"\n{cfg.name}, context {args.context}: one target call over T tokens")
  print("| T (= K+1) | ms | vs T = 1 |\n|---|---|---|")
  for r in rows:
    print(f"| {r['tokens']} | {r['ms']:.1f} | {r['vs_one']:.2f}x |")
  return rows


def cmd_mtp(args) -> list[dict]:
  full = C.get_preset(args.preset)
  local, glob = C.AttentionType.LOCAL, C.AttentionType.GLOBAL
  draft_cfg = mtp.assistant_preset(args.preset)
  key = jax.random.key(0)

  def measure(n: int, drafting: dict) -> float:
    """Target decode-step seconds with n layers (params freed on return); with `drafting`,
    also the drafter's round times per K."""
    cfg = dataclasses.replace(full, num_layers=n, layer_types=(local, glob) * (n // 2),
                              num_kv_shared_layers=0, double_wide_mlp=False)
    params = init(key, cfg, jnp.float32)
    cache = _cached(params, cfg, args.context)
    tok = jnp.full((1, 1), 5, jnp.int32)
    pos = jnp.full((1, 1), args.context, jnp.int32)
    step = jax.jit(lambda p, t, q, c: forward(p, t, q, cfg, c)[0])
    seconds = best_of(lambda: step(params, tok, pos, cache).block_until_ready())
    if drafting is not None:
      draft = mtp.random_drafter(draft_cfg, key)
      state = speculative.SpecState(cache=cache, last=jnp.asarray([5]), history=None,
                                    hidden=jax.random.normal(key, (1, cfg.embed_dim)),
                                    done=jnp.zeros(1, bool), bad=jnp.zeros(1, bool))
      for k in args.draft_tokens:
        d = dataclasses.replace(draft, tokens=k)
        fn = jax.jit(lambda dp, p, s, d=d: d.draft(dp, p, s, cfg)[0])
        drafting[k] = best_of(lambda: fn(draft.params, params, state).block_until_ready())  # noqa: B023
    return seconds

  drafting: dict[int, float] = {}
  times = {2: measure(2, drafting), 4: measure(4, None)}
  per_pair = times[4] - times[2]
  target = times[2] + per_pair * (full.num_layers - 2) / 2
  rows = [dict(preset=args.preset, context=args.context, draft_tokens=k,
               draft_round_ms=1e3 * t, target_step_ms=1e3 * target, ratio=t / target)
          for k, t in drafting.items()]
  print(f"\n{args.preset} target step (extrapolated from 2 and 4 layers: {1e3 * times[2]:.1f} "
        f"and {1e3 * times[4]:.1f} ms) = {1e3 * target:.1f} ms at context {args.context}")
  print("| drafter | K | drafting round ms | target step ms | drafting / target step |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {draft_cfg.text.name} (hidden {draft_cfg.text.embed_dim}, "
          f"{'centroid' if draft_cfg.ordered else 'full'} head) | {r['draft_tokens']} | "
          f"{r['draft_round_ms']:.1f} | {r['target_step_ms']:.1f} | {r['ratio']:.3f} |")
  return rows


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("mode", choices=["lookup", "cost", "mtp"])
  ap.add_argument("--checkpoint", default=None)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--draft-tokens", type=lambda s: [int(x) for x in s.split(",")],
                  default=None)
  ap.add_argument("--context", type=int, default=512)
  ap.add_argument("--temperature", type=float, default=0.8,
                  help="lookup: the sampled free-text case's temperature")
  ap.add_argument("--preset", default="gemma4-e4b")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args()
  if args.draft_tokens is None:
    args.draft_tokens = [2, 4, 8] if args.mode == "lookup" else [2, 4]
  rows = {"lookup": cmd_lookup, "cost": cmd_cost, "mtp": cmd_mtp}[args.mode](args)
  if args.json:
    print(json.dumps(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())

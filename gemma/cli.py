"""The `gemma4` command line. Flags and JSON fields here are a contract: add, never rename.

  gemma4 generate --checkpoint PATH (--prompt TEXT | --prompt-ids 2,17,5) --max-new-tokens N
                  [--temperature T] [--top-k K] [--top-p P] [--seed S]
                  [--dtype float32|bfloat16] [--json]
  gemma4 logits   --checkpoint PATH --prompt-ids 2,17,5 --out FILE.npy [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DTYPES = ("float32", "bfloat16")


def _ids(text: str) -> list[int]:
  try:
    ids = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not ids:
    raise argparse.ArgumentTypeError("empty --prompt-ids")
  return ids


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="gemma4", description="Gemma 4 in JAX")
  sub = ap.add_subparsers(dest="command", required=True)

  def common(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter/activation dtype (default: float32 on CPU, else bfloat16)")

  gen = sub.add_parser("generate", help="generate tokens from a prompt")
  common(gen)
  prompt = gen.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint)")
  prompt.add_argument("--prompt-ids", type=_ids, help="comma-separated prompt token ids")
  gen.add_argument("--max-new-tokens", type=int, required=True)
  gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
  gen.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
  gen.add_argument("--top-p", type=float, default=1.0, help="1 disables top-p")
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--json", action="store_true", help="last stdout line is a JSON object")

  lg = sub.add_parser("logits", help="save float32 logits [T, V] of one forward pass")
  common(lg)
  lg.add_argument("--prompt-ids", type=_ids, required=True)
  lg.add_argument("--out", required=True, help="output .npy file")
  return ap


def _dtype(name: str | None):
  import jax
  import jax.numpy as jnp

  if name is None:
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return jnp.dtype(name)


def _load(args):
  from gemma.checkpoint import load

  return load(args.checkpoint, _dtype(args.dtype))


def _eos_ids(cfg, checkpoint: str) -> tuple[int, ...]:
  """EOS ids of the config plus those of generation_config.json, if the checkpoint has one."""
  ids = set(cfg.eos_ids)
  gen_cfg = Path(checkpoint) / "generation_config.json"
  if gen_cfg.exists():
    eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
  return tuple(sorted(ids))


def _tokenizer(checkpoint: str):
  from gemma.tokenizer import load_tokenizer

  return load_tokenizer(checkpoint)


def cmd_generate(args) -> int:
  from gemma.decode import generate
  from gemma.sampling import Sampler

  sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  tokenizer = _tokenizer(args.checkpoint) if args.prompt is not None else None
  cfg, params = _load(args)
  prompt = tokenizer.encode(args.prompt) if tokenizer else args.prompt_ids
  bad = [i for i in prompt if not 0 <= i < cfg.vocab_size]
  if bad:
    raise ValueError(f"prompt ids out of range [0, {cfg.vocab_size}): {bad[:10]}")

  def stream(ids):
    if not args.json:
      print(tokenizer.decode(ids) if tokenizer else f"{ids[0]} ", end="", flush=True)

  result = generate(params, cfg, [prompt], args.max_new_tokens, sampler, seed=args.seed,
                    eos_ids=_eos_ids(cfg, args.checkpoint), on_token=stream)
  out = dict(
      token_ids=result.tokens[0], prompt_ids=list(prompt),
      prefill_tokens_per_s=result.prefill_tokens_per_s,
      decode_tokens_per_s=result.decode_tokens_per_s, compile_s=result.compile_s,
      dtype=str(params.embed.dtype), model=cfg.name)
  if tokenizer:
    out["text"] = tokenizer.decode(result.tokens[0])
  if args.json:
    print(json.dumps(out))
  else:
    print(f"\n[prefill {out['prefill_tokens_per_s']:.1f} tok/s, "
          f"decode {out['decode_tokens_per_s']:.1f} tok/s, compile {result.compile_s:.1f} s]")
  return 0


def cmd_logits(args) -> int:
  import jax
  import jax.numpy as jnp

  from gemma.model import forward

  cfg, params = _load(args)
  ids = args.prompt_ids
  bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
  if bad:
    raise ValueError(f"prompt ids out of range [0, {cfg.vocab_size}): {bad[:10]}")
  tokens = jnp.asarray([ids], jnp.int32)
  positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
  logits, _ = jax.jit(forward, static_argnames="cfg")(params, tokens, positions, cfg)
  np.save(args.out, np.asarray(logits[0], np.float32))
  print(f"saved logits {tuple(logits.shape[1:])} to {args.out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from gemma.checkpoint import CheckpointError

  try:
    return {"generate": cmd_generate, "logits": cmd_logits}[args.command](args)
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"gemma4: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

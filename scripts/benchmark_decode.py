"""Batch-1 decode speed of a random-weight model against the memory-bandwidth limit.

  python scripts/benchmark_decode.py [--preset gemma4-31b] [--layers 4] [--embed-dim 1024]
      [--dtype float32] [--prompt-len 64] [--new-tokens 32]

The model is `--preset` with its layer count and widths shrunk (dataclasses.replace) so that it
fits this machine; vocabulary 262144 is kept, so the tied logits matmul is realistic. The limit
is read-bandwidth (measured here, in the same run) / parameter bytes read per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma import config as C
from gemma import params as P
from gemma.decode import generate


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
  """Bytes/s of a jitted full reduction over an nbytes float32 array (best of repeats)."""
  x = jnp.ones(nbytes // 4, jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return nbytes / best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="gemma4-31b", choices=list(C.PRESETS))
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--embed-dim", type=int, default=1024)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=32)
  args = ap.parse_args()
  base = C.get_preset(args.preset)
  d = args.embed_dim
  cfg = dataclasses.replace(
      base, name=f"{args.preset}-shrunk", num_layers=args.layers,
      layer_types=C.pattern(args.layers, 6 if base.layer_types[5] is C.AttentionType.GLOBAL else 5),
      embed_dim=d, ffn_dim=4 * d if not base.use_moe else base.ffn_dim * d // base.embed_dim,
      num_kv_shared_layers=min(base.num_kv_shared_layers, args.layers // 2),
      ple_vocab_size=base.ple_vocab_size)
  dtype = jnp.dtype(args.dtype)
  print(f"model {cfg.name}: {P.count(P.abstract(cfg)) / 1e6:.1f}M params, {args.dtype}, "
        f"backend {jax.default_backend()}", flush=True)
  params = P.init(jax.random.key(0), cfg, dtype)
  prompt = list(np.random.default_rng(0).integers(3, cfg.vocab_size, args.prompt_len))
  print("compiling and running...", flush=True)
  out = generate(params, cfg, [prompt], args.new_tokens, eos_ids=())
  # bytes read per decoded token: every active weight (the whole embedding table feeds the
  # tied logits); PLE tables are only looked up, one row per token
  per_token = P.count_breakdown(cfg)["active"] * dtype.itemsize
  bw = read_bandwidth()
  limit = bw / per_token
  print(f"compile {out.compile_s:.2f} s | prefill {out.prefill_tokens_per_s:.1f} tok/s | "
        f"decode {out.decode_tokens_per_s:.2f} tok/s over {out.decode_steps} steps")
  print(f"read bandwidth {bw / 1e9:.2f} GB/s; weights {per_token / 1e9:.3f} GB/token -> "
        f"limit {limit:.2f} tok/s; decode at {out.decode_tokens_per_s / limit:.0%} of the limit")


if __name__ == "__main__":
  main()

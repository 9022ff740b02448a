"""Decode speed of a random-weight model (speed does not depend on values) against the physical
bound: bytes read per decode step / read bandwidth measured in the same run.

  python scripts/bench_decode.py --preset gemma4-e4b --quant tq4 [--kv-quant tq3.5] [--batch 1]
      [--context 1024] [--new-tokens 32] [--dtype bfloat16] [--layers N --embed-dim D] [--json]

Weights are drawn directly in their stored form (random packed codes and scales for quantized
classes, N(0, 0.02²) floats elsewhere), so a 31B model under tq4 never exists in bf16. --layers
and --embed-dim shrink the preset (dataclasses.replace) to fit a small machine; the vocabulary is
kept, so the tied LM head stays realistic. The prompt is `context` tokens; the cache holds
context + new tokens.

Bytes per step: every weight a step reads (PLE tables: one row per token; MoE: the active
experts' share) plus the KV cache read at `context` (sliding layers: their window; --kv-quant:
the stored TurboQuant codes, signs and norms, `gemma.quant.footprint.kv_cache_bytes`). With --json
the last line is one JSON object with decode_ms_per_token, tokens_per_s, bytes_per_token,
bound_tokens_per_s, read_bandwidth_gb_s, pct_of_bound and the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma.inference.decode import generate  # noqa: E402
from gemma.kv.quant import parse_kv_cache  # noqa: E402
from gemma.model import config as C  # noqa: E402
from gemma.model import params as P  # noqa: E402
from gemma.quant.footprint import kv_cache_bytes, quantized_abstract, size_report  # noqa: E402
from gemma.quant.qarray import QArray  # noqa: E402
from gemma.quant.recipes import RECIPES, get_recipe  # noqa: E402


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


def shrink(cfg: C.ModelConfig, layers: int | None, embed_dim: int | None) -> C.ModelConfig:
  """The preset with fewer layers and/or a narrower width (same structure and vocabulary)."""
  if not layers and not embed_dim:
    return cfg
  n = layers or cfg.num_layers
  d = embed_dim or cfg.embed_dim
  period = 6 if cfg.layer_types[5] is C.AttentionType.GLOBAL else 5
  small = dataclasses.replace(
      cfg, name=f"{cfg.name}-shrunk", num_layers=n, layer_types=C.pattern(n, period),
      embed_dim=d, ffn_dim=cfg.ffn_dim * d // cfg.embed_dim,
      num_kv_shared_layers=min(cfg.num_kv_shared_layers, n // 2))
  try:
    small.layers  # noqa: B018 (validates the KV-sharing sources)
  except ValueError:  # too few layers for a KV-sharing source of each kind
    small = dataclasses.replace(small, num_kv_shared_layers=0)
  return small


def random_params(cfg: C.ModelConfig, recipe, dtype, seed: int = 0):
  """Params in stored form with random values: QArrays get random codes and scales."""
  tree = quantized_abstract(cfg, recipe, dtype, float_dtype=dtype)
  names = P.leaf_names(P.abstract(cfg, dtype))
  is_q = lambda x: isinstance(x, QArray)  # noqa: E731
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_q)
  keys = iter(jax.random.split(jax.random.key(seed), 4 * len(leaves)))
  out = []
  for name, leaf in zip(names, leaves, strict=True):  # drawn on the device, leaf by leaf
    if is_q(leaf):
      table_rms = float(np.sqrt(np.mean(leaf.spec.table() ** 2)))
      fill = {}
      for field in ("codes", "scales", "qjl", "gamma"):
        s = getattr(leaf, field)
        if s is None:
          continue
        if s.dtype == jnp.uint32:
          fill[field] = jax.random.bits(next(keys), s.shape, jnp.uint32)
        else:  # weights about N(0, 0.02²)
          fill[field] = jnp.full(s.shape, 0.02 / table_rms, s.dtype)
      out.append(dataclasses.replace(leaf, **fill))
    elif P._is_scale(name):
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      out.append((0.02 * jax.random.normal(next(keys), leaf.shape, jnp.float32)).astype(
          leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def bytes_per_step(cfg: C.ModelConfig, tree, batch: int, context: int, kv_itemsize: int,
                   kv_quant: str | None = None) -> int:
  """Weights one decode step reads (PLE rows and active experts only) plus the KV cache."""
  report = size_report(tree)["classes"]
  total = sum(v["bytes"] for v in report.values())
  ple = report.get("ple_table", {"bytes": 0, "params": 0})
  per_row = ple["bytes"] / max(cfg.ple_vocab_size or 1, 1)
  experts = report.get("experts", {"bytes": 0})["bytes"]
  inactive = experts * (cfg.num_experts - cfg.top_k_experts) / max(cfg.num_experts, 1)
  weights = total - ple["bytes"] + batch * per_row - inactive
  return int(weights + kv_cache_bytes(cfg, context, batch, kv_itemsize, kv_quant))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", required=True, choices=list(C.PRESETS))
  ap.add_argument("--quant", default="bf16", choices=list(RECIPES),
                  help="weight recipe (bf16: no quantization)")
  ap.add_argument("--kv-quant", default=None, type=parse_kv_cache,
                  help="KV cache storage (default: the activation dtype)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding")
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                  help="activations and float weights (default: bfloat16 on GPU, else float32)")
  ap.add_argument("--layers", type=int, default=None, help="shrink to N layers")
  ap.add_argument("--embed-dim", type=int, default=None, help="shrink to this model width")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  for flag in ("batch", "context", "new_tokens"):
    if getattr(args, flag) < 1:
      ap.error(f"--{flag.replace('_', '-')} must be >= 1")
  dtype = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
  cfg = shrink(C.get_preset(args.preset), args.layers, args.embed_dim)
  recipe = get_recipe(args.quant)
  print(f"model {cfg.name}: {P.count(P.abstract(cfg)) / 1e9:.2f}B params, {args.quant}, "
        f"kv {args.kv_quant or dtype.name}, "
        f"{dtype.name}, backend {jax.default_backend()}", file=sys.stderr, flush=True)
  params = random_params(cfg, recipe, dtype)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(3, cfg.vocab_size, args.context)) for _ in range(args.batch)]
  out = generate(params, cfg, prompts, args.new_tokens, eos_ids=(), kv_quant=args.kv_quant)
  per_step = bytes_per_step(cfg, params, args.batch, args.context, dtype.itemsize, args.kv_quant)
  bw = read_bandwidth()
  ms = 1e3 / out.decode_tokens_per_s if out.decode_tokens_per_s else math.inf
  bound = bw / per_step
  result = dict(
      preset=args.preset, model=cfg.name, quant=args.quant, dtype=dtype.name, batch=args.batch,
      kv_quant=args.kv_quant or "none", kv_cache_bytes=out.kv_cache_bytes,
      context=args.context, decode_ms_per_token=ms,
      tokens_per_s=args.batch * out.decode_tokens_per_s, steps=out.decode_steps,
      compile_s=out.compile_s, prefill_tokens_per_s=out.prefill_tokens_per_s,
      bytes_per_token=per_step, read_bandwidth_gb_s=bw / 1e9, bound_ms_per_token=1e3 / bound,
      bound_tokens_per_s=args.batch * bound, pct_of_bound=100 * out.decode_tokens_per_s / bound,
      device=jax.devices()[0].device_kind)
  print(f"decode {ms:.2f} ms/step ({result['tokens_per_s']:.1f} tok/s, batch {args.batch}, "
        f"context {args.context}); reads {per_step / 1e9:.3f} GB/step at "
        f"{bw / 1e9:.1f} GB/s -> bound {1e3 / bound:.2f} ms/step; "
        f"{result['pct_of_bound']:.0f}% of the bound")
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())

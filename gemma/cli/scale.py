"""`gemma4 plan`: per-device bytes of weights and KV cache on a mesh, from shapes alone.

  gemma4 plan --preset gemma4-31b [--quant RECIPE] [--kv-quant KV] --mesh 1x8 --context T
              [--batch B] [--device-memory 80] [--prefill-chunk 2048] [--json]

Weights come from `abstract(cfg)` (or the recipe's quantized abstract tree); the bytes are
`gemma.parallel.memory.plan`'s (cache from `init_cache` traced with `jax.eval_shape`, both
placed by `gemma.parallel.sharding`'s rules; the working set of one prefill chunk estimated
from shapes). It also says the longest context (prompt + generated tokens) that fits. Exit
status 0 when it fits the device memory (GiB), 3 when it does not.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp

from gemma.inference.decode import DEFAULT_PREFILL_CHUNK
from gemma.kv.quant import parse_kv_cache
from gemma.model import params as P
from gemma.model.config import get_preset
from gemma.parallel import memory, sharding
from gemma.parallel.memory import GIB
from gemma.quant.footprint import quantized_abstract


def add_parsers(sub, presets, recipes) -> None:
  pl = sub.add_parser("plan", help="per-device bytes of weights, KV cache and prefill working "
                      "set on a device mesh, and the longest context that fits")
  pl.add_argument("--preset", choices=list(presets), required=True)
  pl.add_argument("--quant", choices=list(recipes), default=None)
  pl.add_argument("--kv-quant", type=parse_kv_cache, default="bf16")
  pl.add_argument("--mesh", default="1x1", help="DxM (data x model) or DxMxE")
  pl.add_argument("--devices", type=int, default=None,
                  help="devices the run will have (default: the mesh's product); a mesh that "
                  "needs another count is an error")
  pl.add_argument("--context", type=int, required=True, help="cache length in tokens")
  pl.add_argument("--batch", type=int, default=1)
  pl.add_argument("--device-memory", type=float, default=80.0, help="GiB per device (80)")
  pl.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                  help=f"prompt tokens per prefill call ({DEFAULT_PREFILL_CHUNK})")
  pl.add_argument("--ple-on-host", action="store_true",
                  help="per-layer-embedding table in host memory (counted as host bytes)")
  pl.add_argument("--json", action="store_true", help="last stdout line is a JSON object")


def plan(preset: str, mesh: str, context: int, batch: int = 1, quant: str | None = None,
         kv_quant: str = "bf16", device_memory_gib: float = 80.0,
         ple_on_host: bool = False, devices: int | None = None,
         prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> dict:
  """Per-device weight and cache bytes of a run, and whether it fits. With `ple_on_host` the
  per-layer-embedding table is host memory (`host_bytes`), not device memory. `devices`: the
  device count the run will have (default the mesh's); `replicated_axes` lists the weight axes
  the mesh does not divide (kept whole on every device of that mesh axis)."""
  if context < 1 or batch < 1 or prefill_chunk < 1:
    raise ValueError(f"context, batch and prefill chunk must be >= 1, got {context}, {batch} "
                     f"and {prefill_chunk}")
  cfg = get_preset(preset)
  sizes = sharding.mesh_axes(sharding.parse_mesh(mesh))
  if devices is not None and devices != math.prod(sizes.values()):
    raise ValueError(f"mesh {mesh} needs {math.prod(sizes.values())} devices, but --devices is "
                     f"{devices}")
  if quant:
    weights = quantized_abstract(cfg, quant, jnp.bfloat16)
  else:
    weights = P.abstract(cfg, jnp.bfloat16)
  p = memory.plan(weights, cfg, batch, context, kv_quant, sizes, ple_on_host, jnp.bfloat16,
                  prefill_chunk)
  w, c = p.weight_bytes, p.cache_bytes
  limit = int(device_memory_gib * GIB)
  largest = memory.largest_context(weights, cfg, batch, kv_quant, sizes, limit, ple_on_host,
                                   jnp.bfloat16, prefill_chunk)
  return dict(preset=preset, quant=quant or "bf16", kv_quant=kv_quant, mesh=mesh,
              devices=math.prod(sizes.values()), context=context,
              batch=batch, weight_bytes_per_device=w, cache_bytes_per_device=c,
              prefill_chunk=prefill_chunk, prefill_bytes_per_device=p.prefill_bytes,
              largest_context=largest, model_context=cfg.max_position_embeddings,
              total_bytes_per_device=p.total_bytes, device_memory_bytes=limit,
              fits=p.total_bytes <= limit,
              ple_on_host=ple_on_host, host_bytes=p.host_bytes,
              replicated_axes=sharding.undivided_axes(weights, sizes))


def explain(p: dict) -> str:
  verdict = "fits" if p["fits"] else "does NOT fit"
  weights = p["weight_bytes_per_device"] / GIB
  return (f"{p['preset']} [{p['quant']}, kv {p['kv_quant']}] on mesh {p['mesh']} "
          f"({p['devices']} devices), batch "
          f"{p['batch']} x {p['context']} tokens: per device {weights:.2f}"
          f" GiB weights + {p['cache_bytes_per_device'] / GIB:.2f} GiB KV cache + "
          f"{p['prefill_bytes_per_device'] / GIB:.2f} GiB prefill working set (chunks of "
          f"{p['prefill_chunk']}) = {p['total_bytes_per_device'] / GIB:.2f} GiB; {verdict} in "
          f"{p['device_memory_bytes'] / GIB:.0f} GiB; longest context that fits: "
          f"{p['largest_context']} tokens (the model's: {p['model_context']})"
          + (f"; PLE table in host memory: {p['host_bytes'] / GIB:.2f} GiB" if p["host_bytes"]
             else "")
          + (f"\nreplicated (the mesh does not divide them): {'; '.join(p['replicated_axes'])}"
             if p["replicated_axes"] else ""))


def cmd_plan(args) -> int:
  p = plan(args.preset, args.mesh, args.context, args.batch, args.quant, args.kv_quant,
           args.device_memory, args.ple_on_host, args.devices, args.prefill_chunk)
  print(explain(p))
  if args.json:
    print(json.dumps(p))
  return 0 if p["fits"] else 3

"""Bytes one device holds for a run: its share of the weights and of the KV cache.

The one memory planner behind `gemma4 plan` (from shapes alone) and the check that refuses a
generation run before it allocates its cache. Weights are placed by
`gemma.parallel.sharding.param_specs`, the cache (`init_cache`, traced with `jax.eval_shape`:
nothing is allocated) by `cache_specs`; with `ple_on_host` the per-layer-embedding table is
host memory, counted whole in `host_bytes` and not on the devices. Activations and XLA's
workspace are not counted.

  p = plan(abstract(cfg, jnp.bfloat16), cfg, batch=1, context=8192, kv_quant="bf16",
           sizes={"data": 1, "model": 8})
  p.weight_bytes, p.cache_bytes, p.total_bytes   # per device
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import Mesh

from gemma.kv.cache import init_cache
from gemma.model.config import ModelConfig
from gemma.parallel import sharding

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of weights and KV cache, and host bytes of an offloaded PLE table."""

  weight_bytes: int
  cache_bytes: int
  host_bytes: int = 0

  @property
  def total_bytes(self) -> int:
    return self.weight_bytes + self.cache_bytes


def plan(params, cfg: ModelConfig, batch: int, context: int, kv_quant,
         sizes: dict[str, int], ple_on_host: bool = False, cache_dtype=None) -> MemoryPlan:
  """Bytes of a run on a mesh of `sizes` ({"data": D, "model": M[, "expert": E]}; {}: one
  device).

  Args:
    params: a params tree: arrays or ShapeDtypeStructs, float or QArray leaves.
    batch, context: rows and length of the KV cache ([B, S] slots per layer).
    kv_quant: the cache format (`init_cache`'s kv_quant: None or a float/TurboQuant name).
    ple_on_host: the PLE table `ple_embed` [V_ple, L, P] lives in host memory (`host_bytes`).
    cache_dtype: dtype of a float cache (default: the embedding's dtype).
  """
  host = 0
  if ple_on_host:
    if params.ple_embed is None:
      raise ValueError(f"--ple-on-host: {cfg.name} has no per-layer embedding table")
    host = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params.ple_embed))
    params = dataclasses.replace(params, ple_embed=None)
  dtype = params.embed.dtype if cache_dtype is None else cache_dtype
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype, kv_quant))
  weights = sharding.per_device_bytes(params, sharding.param_specs(params, sizes), sizes)
  cache_bytes = sharding.per_device_bytes(cache, sharding.cache_specs(cache, sizes), sizes)
  return MemoryPlan(weights, cache_bytes, host)


def check_fits(params, cfg: ModelConfig, batch: int, max_length: int, kv_quant,
               mesh: Mesh | None = None, limit_bytes: int | None = None) -> MemoryPlan | None:
  """Refuses (ValueError), before the cache is allocated, a run whose weights + KV cache
  exceed `limit_bytes` on one device (the bytes one device holds when params and cache are
  placed on `mesh`). limit_bytes None (the backend does not say): no check, returns None."""
  if limit_bytes is None:
    return None
  sizes = dict(mesh.shape) if mesh is not None else {}
  p = plan(params, cfg, batch, max_length, kv_quant, sizes)
  if p.total_bytes > limit_bytes:
    where = f" on each of {mesh.size} devices ({'x'.join(map(str, mesh.shape.values()))})" \
        if mesh is not None else ""
    raise ValueError(
        f"this run does not fit the device{where}: {p.weight_bytes / GIB:.2f} GiB weights + "
        f"{p.cache_bytes / GIB:.2f} GiB KV cache ({batch} x {max_length} tokens, "
        f"kv {kv_quant or 'model dtype'}) > {limit_bytes / GIB:.2f} GiB; lower --max-new-tokens "
        f"or the batch, use --kv-quant or --quant, or see `gemma4 plan`")
  return p

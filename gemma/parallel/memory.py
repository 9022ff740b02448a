"""Bytes one device holds for a run: its share of the weights, of the KV cache, and the working
set of prefilling one chunk of the prompt.

The one memory planner behind `gemma4 plan` (from shapes alone) and the check that refuses a
generation run before it allocates its cache. Weights are placed by
`gemma.parallel.sharding.param_specs`, the cache (`init_cache`, traced with `jax.eval_shape`:
nothing is allocated) by `cache_specs`; with `ple_on_host` the per-layer-embedding table is
host memory, counted whole in `host_bytes` and not on the devices. `prefill_bytes` estimates
the largest live set of one prefill chunk (`prefill_working_set`: one layer's activations, its
attention buffers, the copy of its K/V view, the last position's logits); `largest_context`
solves for the longest cache that still fits.

  p = plan(abstract(cfg, jnp.bfloat16), cfg, batch=1, context=8192, kv_quant="bf16",
           sizes={"data": 1, "model": 8}, prefill_chunk=2048)
  p.weight_bytes, p.cache_bytes, p.prefill_bytes, p.total_bytes   # per device
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
  prefill_bytes: int = 0  # working set of one prefill chunk (0: not counted)

  @property
  def total_bytes(self) -> int:
    return self.weight_bytes + self.cache_bytes + self.prefill_bytes


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def prefill_working_set(cfg: ModelConfig, batch: int, chunk: int, context: int, cache,
                        act_itemsize: int, sizes: dict[str, int]) -> int:
  """Bytes one device holds, beyond weights and cache, while it prefills one chunk: the peak
  layer's live tensors (an estimate from shapes; XLA's own buffer assignment is checked against
  it in the tests).

  Args:
    chunk: prompt tokens per prefill call (padded to its power-of-two bucket); context: cache
      length; cache: the (abstract) cache, whose ring-buffer (or TurboQuant) layers a
      multi-token call copies into its K/V view; act_itemsize: bytes per activation (the
      params' float dtype).
  Counted: the residual stream and its norms (4 x [B, T, D]), per-layer embeddings, q/k/v,
  the largest view copy, one [B, T, N, H] float32 buffer per layer, attention buffers
  (blockwise: score blocks; dense: [T, S] scores and probabilities), the MLP's (or experts')
  hidden activations, the last position's float32 logits; times a 4/3 margin.
  """
  data, model = sizes.get("data", 1), sizes.get("model", 1)
  b, t, a = -(-batch // data), _pow2(chunk), act_itemsize
  n = max(1, cfg.num_heads // model)
  h = max(spec.head_dim for spec in cfg.layers)
  kv = max(1, max(spec.num_kv_heads for spec in cfg.layers) // model)
  f = max(1, max(spec.ffn_dim for spec in cfg.layers) // model)
  keys = context + t
  total = 4 * b * t * cfg.embed_dim * a  # residual stream, normed input, attention/MLP output
  if cfg.use_ple:
    total += 2 * b * t * cfg.num_layers * cfg.ple_dim * a
  total += b * t * (n + 2 * kv) * h * a  # q, k, v
  # a multi-token call into a ring buffer (or a TurboQuant cache) attends over a copy of (the
  # layer's cache ; the call's own K/V); a global layer's float cache is attended in place
  copied = [c for spec, c in zip(cfg.layers, cache.layers, strict=True)
            if c is not None and (spec.window is not None or cache.codec is not None)]
  total += max((sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(c))
                for c in copied), default=0) // (data * model)
  total += 2 * b * t * kv * h * a
  # XLA's buffer assignment keeps about 2/3 of a [B, T, N, H] float32 buffer per layer apart
  # (measured on CPU, tiny dense models, from doubling the layers: 0.66-0.69 of one per extra
  # layer; it was one before each einsum over two contracted axes ran as a 2-D matmul)
  total += sum(b * t * n * spec.head_dim * 4 for spec in cfg.layers) * 2 // 3
  if cfg.attends_blockwise(t, keys):
    blk = cfg.attention_block
    total += 3 * b * n * min(blk, t) * min(blk, keys) * 4  # score, probability and mask blocks
    if cache.codec is not None:  # query blocks over codes: <= 64·block² floats of scores
      total += 3 * 64 * blk * blk * 4  # scores, probabilities, mask
  else:
    total += 2 * b * n * t * keys * 4  # logits and probabilities [B, N, T, S]
  total += 2 * b * t * f * a  # gate and up (XLA fuses their product into one pass)
  if cfg.use_moe:
    experts = cfg.num_experts // sizes.get("expert", 1)
    # routed copies of the tokens (in and out) and the experts' hidden activations, router logits
    routed = b * t * cfg.top_k_experts
    moe = routed * (2 * cfg.embed_dim + 3 * cfg.moe_ffn_dim) * a + b * t * max(1, experts) * 4
    # a MoE layer keeps ~2 [B, T, N, H] float32 buffers per layer, not 2/3 (measured: 1.9-2.2 per
    # extra layer): its routed activations twice covers it
    total += 2 * moe
  total += 2 * b * cfg.vocab_size * 4  # last position's logits (and their soft-cap)
  # Margin for what the terms miss (fusion temporaries, layout copies). Against XLA's own buffer
  # assignment of the compiled prefill, with 4/3: 1.05-1.84 on the tests' tiny e2b / 26B-A4B /
  # 31B families (float and tq4 caches), 1.07-1.93 on the real Gemma 3 270M (chunks 512-2048,
  # contexts 4K-32K, float and tq4; 2026-12-05, after einsums over two contracted axes became
  # 2-D matmuls and XLA stopped keeping a transposed copy per layer).
  return total * 4 // 3


def _weights(params, cfg: ModelConfig, sizes: dict[str, int], ple_on_host: bool):
  """(params as placed on the devices, their bytes per device, host bytes of an offloaded PLE
  table): what does not depend on the context."""
  host = 0
  if ple_on_host:
    if params.ple_embed is None:
      raise ValueError(f"--ple-on-host: {cfg.name} has no per-layer embedding table")
    host = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params.ple_embed))
    params = dataclasses.replace(params, ple_embed=None)
  weights = sharding.per_device_bytes(params, sharding.param_specs(params, sizes), sizes)
  return params, weights, host


def _context_bytes(params, cfg: ModelConfig, batch: int, context: int, kv_quant,
                   sizes: dict[str, int], cache_dtype, prefill_chunk: int | None):
  """(KV cache bytes, prefill working set bytes) per device for a cache of `context` columns."""
  dtype = params.embed.dtype if cache_dtype is None else cache_dtype
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype, kv_quant))
  cache_bytes = sharding.per_device_bytes(cache, sharding.cache_specs(cache, sizes), sizes)
  work = 0
  if prefill_chunk is not None:
    float_dtype = jax.tree.leaves(params.final_norm)[0].dtype
    work = prefill_working_set(cfg, batch, min(prefill_chunk, context), context, cache,
                               float_dtype.itemsize, sizes)
  return cache_bytes, work


def plan(params, cfg: ModelConfig, batch: int, context: int, kv_quant,
         sizes: dict[str, int], ple_on_host: bool = False, cache_dtype=None,
         prefill_chunk: int | None = None) -> MemoryPlan:
  """Bytes of a run on a mesh of `sizes` ({"data": D, "model": M[, "expert": E]}; {}: one
  device).

  Args:
    params: a params tree: arrays or ShapeDtypeStructs, float or QArray leaves.
    batch, context: rows and length of the KV cache ([B, S] slots per layer).
    kv_quant: the cache format (`init_cache`'s kv_quant: None or a float/TurboQuant name).
    ple_on_host: the PLE table `ple_embed` [V_ple, L, P] lives in host memory (`host_bytes`).
    cache_dtype: dtype of a float cache (default: the embedding's dtype).
    prefill_chunk: prompt tokens per prefill call, whose working set is counted
      (`prefill_working_set`); None: not counted.
  """
  params, weights, host = _weights(params, cfg, sizes, ple_on_host)
  cache_bytes, work = _context_bytes(params, cfg, batch, context, kv_quant, sizes, cache_dtype,
                                     prefill_chunk)
  return MemoryPlan(weights, cache_bytes, host, work)


def largest_context(params, cfg: ModelConfig, batch: int, kv_quant, sizes: dict[str, int],
                    limit_bytes: int, ple_on_host: bool = False, cache_dtype=None,
                    prefill_chunk: int | None = None) -> int:
  """The longest cache (prompt + generated tokens) whose plan fits `limit_bytes` per device, up
  to cfg.max_position_embeddings; 0 when not even one token fits."""
  params, weights, _ = _weights(params, cfg, sizes, ple_on_host)

  def fits(n: int) -> bool:
    return weights + sum(_context_bytes(params, cfg, batch, n, kv_quant, sizes, cache_dtype,
                                        prefill_chunk)) <= limit_bytes

  lo, hi = 0, cfg.max_position_embeddings
  if fits(hi):
    return hi
  while hi - lo > 1:  # fits(lo) and not fits(hi); bytes grow with the context
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def check_fits(params, cfg: ModelConfig, batch: int, max_length: int, kv_quant,
               mesh: Mesh | None = None, limit_bytes: int | None = None,
               prefill_chunk: int | None = None) -> MemoryPlan | None:
  """Refuses (ValueError), before the cache is allocated, a run whose weights + KV cache (+ the
  working set of prefill chunks of `prefill_chunk` tokens) exceed `limit_bytes` on one device
  (the bytes one device holds when params and cache are placed on `mesh`). limit_bytes None
  (the backend does not say): no check, returns None."""
  if limit_bytes is None:
    return None
  sizes = dict(mesh.shape) if mesh is not None else {}
  p = plan(params, cfg, batch, max_length, kv_quant, sizes, prefill_chunk=prefill_chunk)
  if p.total_bytes > limit_bytes:
    where = f" on each of {mesh.size} devices ({'x'.join(map(str, mesh.shape.values()))})" \
        if mesh is not None else ""
    largest = largest_context(params, cfg, batch, kv_quant, sizes, limit_bytes,
                              prefill_chunk=prefill_chunk)
    raise ValueError(
        f"this run does not fit the device{where}: {p.weight_bytes / GIB:.2f} GiB weights + "
        f"{p.cache_bytes / GIB:.2f} GiB KV cache ({batch} x {max_length} tokens, "
        f"kv {kv_quant or 'model dtype'}) + {p.prefill_bytes / GIB:.2f} GiB prefill working set "
        f"> {limit_bytes / GIB:.2f} GiB (the longest prompt + generation that fits: {largest} "
        f"tokens); lower --max-new-tokens, the prompt or the batch, use --kv-quant, --quant or a "
        f"smaller --prefill-chunk, or see `gemma4 plan`")
  return p

"""Jitted prefill and decode steps, and a streaming generation loop over them.

Prompts of a batch are left-padded to a common length; positions come from the padding mask,
so a padded row generates exactly what it generates alone. `prefill` right-pads the chunk to a
power-of-two bucket (bounded recompiles); `decode_step` donates the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma.cache import KVCache, init_cache
from gemma.config import ModelConfig
from gemma.model import forward
from gemma.params import Params
from gemma.sampling import Sampler, sample

MIN_BUCKET = 8
GREEDY = Sampler()
_sample = jax.jit(sample, static_argnames="sampler")


def bucket_length(n: int) -> int:
  """The power-of-two chunk length (at least MIN_BUCKET) that a prompt of n tokens is padded to."""
  return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill_step(params: Params, tokens: jax.Array, positions: jax.Array, num_columns: jax.Array,
                 cache: KVCache, cfg: ModelConfig):
  """Runs a (bucket-padded) chunk through the model and the cache.

  Args:
    tokens, positions: [B, T_bucket]; columns >= num_columns are padding.
  Returns:
    (logits [B, V] float32 at the last valid column, updated cache)
  """
  return forward(params, tokens, positions, cfg, cache, num_columns=num_columns,
                 logits_at=num_columns - 1)


@functools.partial(jax.jit, static_argnames=("cfg", "sampler"), donate_argnames=("cache",))
def decode_step(params: Params, tokens: jax.Array, cache: KVCache, key: jax.Array,
                cfg: ModelConfig, sampler: Sampler):
  """One decoding step. tokens: [B] the last tokens. Returns (next [B], logits [B, V], cache)."""
  positions = cache.next_pos[:, None]
  logits, cache = forward(params, tokens[:, None], positions, cfg, cache,
                          logits_at=jnp.zeros((), jnp.int32))
  return sample(logits, key, sampler), logits, cache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to a common length. Returns (tokens [B, T] int32, positions [B, T])."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  t = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  positions = np.full((len(prompts), t), -1, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, t - len(p):] = p
    positions[row, t - len(p):] = np.arange(len(p))
  return tokens, positions


def bucket_inputs(cfg: ModelConfig, tokens: np.ndarray, positions: np.ndarray):
  """Right-pads a [B, T] chunk to its bucket. Returns (tokens, positions, num_columns) arrays."""
  t = tokens.shape[1]
  pad = ((0, 0), (0, bucket_length(t) - t))
  tokens = np.pad(tokens, pad, constant_values=cfg.pad_id)
  positions = np.pad(positions, pad, constant_values=-1)
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(t, jnp.int32)


def prefill(params: Params, cfg: ModelConfig, tokens: np.ndarray, positions: np.ndarray,
            cache: KVCache):
  """Bucket-pads a [B, T] chunk and runs `prefill_step`. Returns (logits [B, V], cache)."""
  return prefill_step(params, *bucket_inputs(cfg, tokens, positions), cache, cfg)


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # generated ids per row (stopping EOS included, nothing after it)
  prompt_tokens: int
  compile_s: float  # prefill and decode-step compilation, excluded from prefill_s and decode_s
  prefill_s: float
  decode_s: float
  decode_steps: int
  kv_cache_bytes: int = 0  # bytes of the cache allocated for this generation (every leaf)

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

  @property
  def decode_tokens_per_s(self) -> float:
    """Steady-state decode speed per row (compiled ahead of time; the first step excluded)."""
    return self.decode_steps / self.decode_s if self.decode_s else 0.0


def _signature(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((x.shape, x.dtype) for x in leaves)


def _abstract(treedef, shapes: tuple):
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])


@functools.lru_cache(maxsize=32)
def _compiled_prefill(cfg: ModelConfig, treedef, shapes: tuple):
  """Ahead-of-time compiled prefill for one argument signature (so timings exclude compiling)."""
  return prefill_step.lower(*_abstract(treedef, shapes), cfg=cfg).compile()


@functools.lru_cache(maxsize=32)
def _compiled_decode(cfg: ModelConfig, sampler: Sampler, treedef, shapes: tuple):
  """Ahead-of-time compiled decode step: one executable for every step, whatever placement the
  arrays carry (a jitted call would recompile when e.g. restored params are committed)."""
  return decode_step.lower(*_abstract(treedef, shapes), cfg=cfg, sampler=sampler).compile()


def device_memory_limit() -> int | None:
  """Bytes the first device may allocate (None where the backend does not say, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def check_memory(params: Params, cfg: ModelConfig, batch: int, max_length: int,
                 kv_quant) -> None:
  """Refuses, before allocating the cache, a run whose weights + KV cache exceed the device."""
  limit = device_memory_limit()
  if limit is None:
    return
  from gemma.quant.footprint import kv_cache_bytes

  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  cache = kv_cache_bytes(cfg, max_length, batch, jnp.dtype(params.embed.dtype).itemsize,
                         kv_quant)
  if weights + cache > limit:
    gib = 1 << 30
    raise ValueError(
        f"this run does not fit the device: {weights / gib:.2f} GiB weights + "
        f"{cache / gib:.2f} GiB KV cache ({batch} x {max_length} tokens, "
        f"kv {kv_quant or 'model dtype'}) > {limit / gib:.2f} GiB; lower --max-new-tokens or "
        f"the batch, use --kv-quant or --quant, or see `gemma4 plan`")


def check_capacity(cfg: ModelConfig, prompt_len: int, max_new_tokens: int,
                   max_length: int) -> None:
  total = prompt_len + max_new_tokens
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if total > max_length:
    raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                     f"{total} exceeds the cache length {max_length}")
  if total > cfg.max_position_embeddings:
    raise ValueError(f"prompt + max_new_tokens = {total} exceeds the model context "
                     f"{cfg.max_position_embeddings}")


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, sampler: Sampler = GREEDY, seed: int = 0,
             max_length: int | None = None, eos_ids: Sequence[int] | None = None,
             on_token: Callable[[list[int]], None] | None = None,
             kv_quant: str | None = None) -> Generation:
  """Generates up to `max_new_tokens` per prompt; a row stops at its first EOS id.

  Args:
    prompts: token ids per row (different lengths are left-padded).
    max_length: cache length; default prompt + max_new_tokens. Too small is an error raised
      before any compute.
    eos_ids: stop ids (default cfg.eos_ids); on_token: called with each step's new ids.
    kv_quant: KV cache storage (`gemma.cache.init_cache`): None, "bf16", "f32" or a TurboQuant
      width such as "tq3.5".
  """
  tokens, positions = left_pad(prompts, cfg.pad_id)
  b, t = tokens.shape
  max_length = max_length or t + max_new_tokens
  check_capacity(cfg, t, max_new_tokens, max_length)
  stop = np.asarray(sorted(set(cfg.eos_ids if eos_ids is None else eos_ids)), np.int32)
  key = jax.random.key(seed)
  check_memory(params, cfg, b, max_length, kv_quant)
  cache = init_cache(cfg, b, max_length, params.embed.dtype, kv_quant)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))

  args = (params, *bucket_inputs(cfg, tokens, positions), cache)
  t0 = time.perf_counter()
  compiled = _compiled_prefill(cfg, *_signature(args))
  step_args = (params, jnp.zeros((b,), jnp.int32), cache, key)
  compiled_step = _compiled_decode(cfg, sampler, *_signature(step_args))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits, cache = compiled(*args)
  # the first token is sampled from the prefill logits
  next_ids = jax.block_until_ready(_sample(logits, jax.random.fold_in(key, 0), sampler))
  prefill_s = time.perf_counter() - t0

  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  decode_s, steps = 0.0, 0
  for step in range(max_new_tokens):
    ids = np.asarray(next_ids)
    for row in range(b):
      if not done[row]:
        out[row].append(int(ids[row]))
    done |= np.isin(ids, stop)
    if on_token is not None:
      on_token([int(i) for i in ids])
    if done.all() or step == max_new_tokens - 1:
      break
    t0 = time.perf_counter()
    next_ids, _, cache = compiled_step(params, jnp.asarray(ids, jnp.int32), cache,
                                       jax.random.fold_in(key, step + 1))
    next_ids = jax.block_until_ready(next_ids)
    if step > 0:  # step 0 warms up (first run of the executable)
      decode_s += time.perf_counter() - t0
      steps += 1
  return Generation(tokens=out, prompt_tokens=int((positions >= 0).sum()), compile_s=compile_s,
                    prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                    kv_cache_bytes=cache_bytes)

"""Generation loops: `stream` (a generator over a cache it is given: `generate` makes a fresh
one, a chat session keeps its cache between turns), `generate` and `prompt_steps`.

With `draft` set (`gemma.inference.speculative`), tokens come from speculative rounds (draft K,
verify K + 1 in one target step) instead of one step per token; the output is the same.
The steps themselves, the checks and `Runner` live in `gemma.inference.steps` (re-exported).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma.inference import speculative
from gemma.inference.sampling import Sampler
from gemma.inference.steps import (
    DEFAULT_PREFILL_CHUNK,
    GREEDY,
    MIN_BUCKET,
    STEPS_PER_CALL,
    Generation,
    Runner,
    _check_finite,
    _compiled_decode,
    _compiled_decode_loop,
    _sample,
    _signature,
    bucket_inputs,
    bucket_length,
    check_capacity,
    check_memory,
    chunk_size,
    compile_prompt,
    decode_step,
    device_memory_limit,
    left_pad,
    prefill,
    prefill_step,
    run_prompt,
    runner,
    stop_array,
)
from gemma.kv.cache import KVCache
from gemma.model.config import ModelConfig
from gemma.model.params import Params

__all__ = ["DEFAULT_PREFILL_CHUNK", "GREEDY", "MIN_BUCKET", "Generation", "Runner",
           "bucket_inputs", "bucket_length", "check_capacity", "check_memory", "chunk_size",
           "decode_step", "device_memory_limit", "drain", "generate", "left_pad", "prefill",
           "prefill_step", "prompt_steps", "runner", "stream"]


def stream(run: Runner, cache: KVCache, tokens: np.ndarray, positions: np.ndarray,
           max_new_tokens: int, sampler: Sampler = GREEDY, seed: int = 0,
           eos_ids: Sequence[int] | None = None, prefill_chunk: int | None = None,
           draft: speculative.Draft | None = None, history: Sequence[int] | None = None):
  """Prefills [B, T] tokens onto `cache` and decodes: a generator of each step's new ids
  (list[int], one per row) whose return value is (Generation, cache).

  `prefill_chunk` (default DEFAULT_PREFILL_CHUNK) prefills the prompt in chunks of that many
  columns, each attending to the cache before it and to itself: compiled once per chunk size
  (and once for the tail), with attention buffers of one chunk against the cache instead of the
  whole prompt against itself. The returned cache holds the prompt and every generated token
  but the last one of each row (sampled, not yet fed back): a chat session prefills it with the
  next turn.

  `draft` decodes by speculative rounds (`gemma.inference.speculative.stream`; the cache needs
  `draft.tokens` columns of slack: `Runner.new_cache(..., slack=)`); `history` is what the cache
  already holds before `tokens` (batch 1: a chat session's transcript), for prompt lookup.
  """
  if draft is not None:
    return (yield from speculative.stream(run, cache, tokens, positions, max_new_tokens, sampler,
                                          seed, eos_ids, prefill_chunk, draft, history))
  cfg, place = run.cfg, run.place
  b = tokens.shape[0]
  stop = stop_array(cfg, eos_ids)
  key = place(jax.random.key(seed))
  t0 = time.perf_counter()
  chunks, compiled = compile_prompt(run, cache, tokens, positions, prefill_chunk)
  advance = _advance(run, cache, key, stop, sampler)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits, cache = run_prompt(chunks, compiled, cache)
  # the first token is sampled from the prefill logits
  next_ids = jax.block_until_ready(_sample(logits, jax.random.fold_in(key, 0), sampler))
  prefill_s = time.perf_counter() - t0

  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  _check_finite(logits, done, 0)
  decode_s, steps, emitted, columns = 0.0, 0, 0, [np.asarray(next_ids)]
  while True:
    for ids in columns:
      for row in range(b):
        if not done[row]:
          out[row].append(int(ids[row]))
      done |= np.isin(ids, stop)
      emitted += 1
      yield [int(i) for i in ids]
      if done.all() or emitted == max_new_tokens:
        break
    if done.all() or emitted == max_new_tokens:
      break
    t0 = time.perf_counter()
    # the first call runs one step: it warms up (first run of the executable), untimed
    columns, cache = advance(columns[-1], cache, emitted - 1, done,
                             1 if emitted == 1 else max_new_tokens - emitted)
    if emitted > 1:
      decode_s += time.perf_counter() - t0
      steps += len(columns)
  result = Generation(tokens=out, prompt_tokens=int((positions >= 0).sum()), compile_s=compile_s,
                      prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                      kv_cache_bytes=sum(x.nbytes for x in jax.tree.leaves(cache)))
  return result, cache


def _advance(run: Runner, cache: KVCache, key: jax.Array, stop: np.ndarray, sampler: Sampler):
  """Compiles the decoding steps of a run; returns advance(ids [B], cache, step, done [B], want)
  -> (new token columns, each [B], cache): up to `want` steps after generation step `step`,
  from `STEPS_PER_CALL` per device call (`steps.decode_loop`; a row's stop id or non-finite
  logits end it early: that is raised, naming the step) down to one per call with the
  per-layer-embedding table on the host (its rows are sent for each step's tokens)."""
  cfg, params, place, with_rows = run.cfg, run.params, run.place, run.with_rows
  b = cache.next_pos.shape[0]
  zeros = place(jnp.zeros((b,), jnp.int32))
  if run.ple_on_host:
    compiled_step = _compiled_decode(cfg, sampler, *_signature(
        (with_rows(params, np.zeros((b, 1), np.int32)), zeros, cache, key)))

    def advance(ids, cache, step, done, want):
      next_ids, logits, cache = compiled_step(with_rows(params, ids[:, None]),
                                              place(jnp.asarray(ids, jnp.int32)), cache,
                                              place(jax.random.fold_in(key, step + 1)))
      next_ids = jax.block_until_ready(next_ids)
      _check_finite(logits, done, step + 1)
      return [np.asarray(next_ids)], cache
    return advance

  n = STEPS_PER_CALL
  scalar = place(jnp.zeros((), jnp.int32))
  stop_ids = place(jnp.asarray(stop))
  compiled = _compiled_decode_loop(cfg, sampler, n, *_signature(
      (params, zeros, cache, key, scalar, scalar, stop_ids, place(jnp.zeros((b,), bool)))))

  def advance(ids, cache, step, done, want):
    new, ran, bad, cache = compiled(params, place(jnp.asarray(ids, jnp.int32)), cache, key,
                                    place(jnp.asarray(step, jnp.int32)),
                                    place(jnp.asarray(min(want, n), jnp.int32)), stop_ids,
                                    place(jnp.asarray(done)))
    new, ran, bad = np.asarray(new), int(ran), int(bad)
    if bad >= 0:
      raise FloatingPointError(
          f"non-finite logits (NaN or inf) at generation step {step + bad + 1}: the weights or "
          "the KV cache hold non-finite values")
    return [new[:, i] for i in range(ran)], cache
  return advance


def drain(steps, on_token: Callable[[list[int]], None] | None = None):
  """Runs a `stream` generator to its end, calling `on_token` with each step's ids; returns the
  generator's return value."""
  while True:
    try:
      ids = next(steps)
    except StopIteration as end:
      return end.value
    if on_token is not None:
      on_token(ids)


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, sampler: Sampler = GREEDY, seed: int = 0,
             max_length: int | None = None, eos_ids: Sequence[int] | None = None,
             on_token: Callable[[list[int]], None] | None = None,
             kv_quant: str | None = None, mesh: Mesh | None = None,
             ple_on_host: bool = False, prefill_chunk: int | None = None,
             draft: speculative.Draft | None = None) -> Generation:
  """Generates up to `max_new_tokens` per prompt; a row stops at its first EOS id.

  Args:
    prompts: token ids per row (different lengths are left-padded).
    max_length: cache length; default prompt + max_new_tokens. Too small is an error raised
      before any compute.
    eos_ids: stop ids (default cfg.eos_ids); on_token: called with each step's new ids.
    kv_quant: KV cache storage (`gemma.kv.cache.init_cache`): None, "bf16", "f32" or a
      TurboQuant width such as "tq3.5".
    mesh: a `jax.sharding.Mesh` (`gemma.parallel.sharding.make_mesh("2x4")`): params and cache
      are sharded over it (tensor parallel on `model`, rows / FSDP on `data`).
    ple_on_host: keep the per-layer-embedding table in host memory and send each step only its
      tokens' rows (`gemma.parallel.host_ple`).
    prefill_chunk: prefill the prompt in chunks of this many tokens (`stream`; default
      DEFAULT_PREFILL_CHUNK).
    draft: speculative decoding (`gemma.inference.speculative`): `speculative.Ngram(tokens=K)`
      (prompt lookup) or an MTP drafter (`gemma.inference.mtp.load_drafter`); the tokens are
      those decoding without it produces (greedy: identical; sampling: the same distribution).
  """
  run = runner(params, cfg, mesh, ple_on_host)
  steps = prompt_steps(run, prompts, max_new_tokens, sampler, seed, max_length, eos_ids,
                       kv_quant, prefill_chunk, draft)
  return drain(steps, on_token)[0]


def prompt_steps(run: Runner, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampler: Sampler = GREEDY, seed: int = 0, max_length: int | None = None,
                 eos_ids: Sequence[int] | None = None, kv_quant=None,
                 prefill_chunk: int | None = None, draft: speculative.Draft | None = None):
  """The `stream` generator of prompts (left-padded) on a fresh cache of `max_length` columns
  (default prompt + max_new_tokens; checked before any compute)."""
  tokens, positions = left_pad(prompts, run.cfg.pad_id)
  b, t = tokens.shape
  max_length = max_length or t + max_new_tokens
  check_capacity(run.cfg, t, max_new_tokens, max_length)
  if draft is not None:
    speculative.check_compatible(draft, run)
  cache = run.new_cache(b, max_length, kv_quant, prefill_chunk,
                        slack=0 if draft is None else draft.tokens)
  return stream(run, cache, tokens, positions, max_new_tokens, sampler, seed, eos_ids,
                prefill_chunk, draft)

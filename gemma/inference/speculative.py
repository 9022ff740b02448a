"""Speculative decoding: draft K tokens, verify them in one target step, keep what the target
would have generated.

A round, on the device: the drafter proposes K tokens per row (`Ngram`: prompt lookup;
`gemma.inference.mtp.Mtp`: Gemma 4's released MTP assistant reading the target's KV cache);
the target runs once over [last token, K drafts] at their positions through the KV cache
(logits [B, K+1, V]); drafts are accepted left to right; the cache is rolled back past the
rejected columns (`gemma.kv.cache.rollback`: positions only, so float and TurboQuant caches, ring
buffers included, need no special case). Several rounds run per device call
(`lax.while_loop`, `rounds`), so the host is touched once per call; the tokens still stream.

Acceptance keeps the target's output exactly:
  greedy: draft i+1 is kept iff it equals the target's argmax after draft i; the round emits the
    target's argmax at every kept column plus the first disagreeing one, i.e. exactly the
    tokens plain greedy decoding produces.
  sampling (temperature, top-k, top-p): drafts are deterministic proposals (q = one-hot), so
    the standard rule (Leviathan et al. 2023, Chen et al. 2023) keeps draft d with probability
    p(d) and otherwise samples from the residual p with d removed (renormalized); after K kept
    drafts a bonus token is sampled from p. Every emitted token is distributed as the target's
    p given what precedes it.
A batch advances by the same number of columns: the smallest count kept by a running row (a
row that kept more emits the same drafts, still exact; the next round redrafts the rest). A stop
id ends a row's acceptance, so the cache never holds tokens after a finished turn.

A round whose prompt lookup finds no match in any row runs a plain one-token step instead
(`lax.cond`): free text pays only the lookup, not a K+1-column verification.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma.inference import mtp
from gemma.inference.lookup import lookup
from gemma.inference.sampling import Sampler, probabilities
from gemma.inference.steps import (
    Generation,
    Runner,
    _abstract,
    _sample,
    _signature,
    compile_prompt,
    run_prompt,
    stop_array,
)
from gemma.kv.cache import KVCache, rollback
from gemma.model.config import ModelConfig
from gemma.model.params import Params, pytree_dataclass
from gemma.model.transformer import forward


@dataclasses.dataclass(frozen=True)
class Ngram:
  """Prompt-lookup drafting (`gemma.inference.lookup`): K tokens continuing the latest earlier
  occurrence of the last n tokens, n from `max_ngram` down to `min_ngram`."""

  tokens: int = 4  # K drafts per round
  max_ngram: int = 3
  min_ngram: int = 2
  rounds: int = 4  # rounds per device call
  params: Any = dataclasses.field(default=None, compare=False, repr=False)
  name = "ngram"
  needs_hidden = False
  always_drafts = False  # a round without a match falls back to one plain step

  def __post_init__(self):
    _check_draft(self)
    if not 1 <= self.min_ngram <= self.max_ngram:
      raise ValueError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got "
                       f"{self.min_ngram}, {self.max_ngram}")

  def propose(self, draft_params, params: Params, state: SpecState, cfg: ModelConfig):
    """(drafts [B, K] int32, found [B] bool)."""
    del draft_params, params, cfg
    return lookup(state.history, state.cache.length, self.tokens, self.max_ngram,
                  self.min_ngram)


def _check_draft(draft) -> None:
  if not (isinstance(draft.tokens, int) and draft.tokens >= 1):
    raise ValueError(f"draft tokens must be an integer >= 1, got {draft.tokens!r}")
  if not (isinstance(draft.rounds, int) and draft.rounds >= 1):
    raise ValueError(f"rounds per call must be an integer >= 1, got {draft.rounds!r}")


@pytree_dataclass
class SpecState:
  """What the rounds carry on the device."""

  cache: KVCache  # holds every column but `last`'s
  last: jax.Array  # [B] int32 the newest token (emitted, not yet in the cache)
  history: jax.Array  # [B, C] int32 token per cache column (< 0: none), `last` at cache.length
  hidden: jax.Array | None  # [B, D] the target's final hidden state that predicted `last`
  done: jax.Array  # [B] bool: the row emitted a stop id
  bad: jax.Array  # [B] bool: the row's logits held NaN or inf


@pytree_dataclass
class RoundStats:
  steps: jax.Array  # [] int32 target steps (verifications or plain steps)
  drafted: jax.Array  # [] int32 draft tokens proposed to running rows (summed over rows)
  accepted: jax.Array  # [] int32 of which kept (summed over rows)


def accept(logits: jax.Array, drafts: jax.Array, key: jax.Array,
           sampler: Sampler) -> tuple[jax.Array, jax.Array]:
  """The acceptance rule for deterministic drafts.

  Args:
    logits: [B, k+1, V] the target's logits after the last token and after each draft.
    drafts: [B, k] int32.
  Returns:
    (out [B, k+1] int32, kept [B] int32): a row emits out[:, :kept+1] (the kept drafts, then
    the target's token at the first rejection, or the bonus token after k kept drafts); a row
    may also stop earlier, after any prefix of them.
  """
  b, k = drafts.shape
  if sampler.greedy:
    # [B, k+1] what plain greedy decoding emits after each column
    out = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keep = drafts == out[:, :k]
    return out, jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)
  key_u, key_s = jax.random.split(key)
  # [B, k+1, V] the target's sampling distribution at each column
  p = probabilities(logits, sampler)
  p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  keep = jax.random.uniform(key_u, (b, k)) < p_draft
  kept = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)
  # [B, k+1, V] residual: p without the draft (the bonus column keeps p)
  padded = jnp.pad(drafts, ((0, 0), (0, 1)), constant_values=-1)
  resid = jnp.where(jax.nn.one_hot(padded, p.shape[-1], dtype=jnp.bool_), 0.0, p)
  fix = jax.random.categorical(key_s, jnp.log(resid), axis=-1).astype(jnp.int32)
  col = jnp.arange(k + 1)[None, :]
  return jnp.where(col < kept[:, None], padded, fix), kept


def _verify(params: Params, state: SpecState, drafts: jax.Array, key: jax.Array,
            stop: jax.Array, remaining: jax.Array, cfg: ModelConfig, sampler: Sampler,
            hidden: bool):
  """One target step over [last, drafts] and the acceptance. drafts: [B, k] (k may be 0).

  Returns (new state, emitted [B, k+1] int32 (the first n+1 are new tokens), n [] int32).
  """
  cache = state.cache
  k = drafts.shape[1]
  # [] drafts this round may use: one token of the budget is the target's own
  usable = jnp.clip(remaining - 1, 0, k).astype(jnp.int32)
  # [B, k+1] tokens and their positions; columns past `usable` are padding (not written)
  tokens = jnp.concatenate([state.last[:, None], drafts], axis=1)
  col = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
  positions = jnp.where(col <= usable, cache.next_pos[:, None] + col, -1)
  logits, new_cache, *h = forward(params, tokens, positions, cfg, cache, num_columns=usable + 1,
                                  return_hidden=hidden)
  running = ~state.done
  finite = jnp.all(jnp.isfinite(logits) | (col > usable)[..., None], axis=(1, 2))
  bad = state.bad | (running & ~finite)
  out, kept = accept(logits, drafts, key, sampler)
  # [B] cut after a stop id
  is_stop = jnp.isin(out, stop)
  first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), k)
  kept = jnp.minimum(kept, first_stop)
  # [] columns kept by every running row, within the budget (n + 1 tokens are emitted)
  n = jnp.minimum(jnp.min(jnp.where(running, kept, k)), usable).astype(jnp.int32)
  emitted = jnp.arange(k + 1)[None, :] <= n
  done = state.done | jnp.any(is_stop & emitted, axis=1)
  new_cache = rollback(new_cache, cache.length + n + 1, cache.next_pos + n + 1)
  history = jax.lax.dynamic_update_slice(state.history, out, (0, cache.length + 1))
  new_hidden = jax.lax.dynamic_index_in_dim(h[0], n, axis=1, keepdims=False) if hidden else None
  new = SpecState(cache=new_cache, last=jax.lax.dynamic_index_in_dim(out, n, 1, False),
                  history=history, hidden=new_hidden, done=done, bad=bad)
  return new, out, n, usable


def _round(params, draft_params, state: SpecState, key, stop, remaining, cfg, sampler, draft):
  """One round: draft, verify (or, without any prompt-lookup match, one plain step).
  Returns (state, emitted [B, K+1], n, stats of this round)."""
  k = draft.tokens
  drafts, found = draft.propose(draft_params, params, state, cfg)
  running = ~state.done
  verify = functools.partial(_verify, params, state, key=key, stop=stop, remaining=remaining,
                             cfg=cfg, sampler=sampler, hidden=draft.needs_hidden)

  def speculate():
    new, out, n, usable = verify(drafts)
    rows = jnp.sum(running).astype(jnp.int32)
    return new, out, n, RoundStats(jnp.ones((), jnp.int32), rows * usable, rows * n)

  def plain():
    new, out, n, _ = verify(drafts[:, :0])
    zero = jnp.zeros((), jnp.int32)
    return new, jnp.pad(out, ((0, 0), (0, k))), n, RoundStats(jnp.ones((), jnp.int32), zero, zero)

  if draft.always_drafts:
    return speculate()
  return jax.lax.cond(jnp.any(found & running), speculate, plain)


def _rounds(params: Params, draft_params, state: SpecState, key: jax.Array, stop: jax.Array,
            budget: jax.Array, cfg: ModelConfig, sampler: Sampler, draft):
  """Up to `draft.rounds` rounds while tokens remain (`budget`) and a row runs.

  Returns (state, tokens [B, rounds·(K+1)] int32 of which the first `count` columns are new,
  count [] int32, RoundStats summed over the rounds)."""
  b = state.last.shape[0]
  width = draft.tokens + 1
  zero = jnp.zeros((), jnp.int32)

  def cond(carry):
    state, _, count, _, r = carry
    return (r < draft.rounds) & (count < budget) & ~jnp.all(state.done | state.bad)

  def body(carry):
    state, buf, count, stats, r = carry
    new, out, n, st = _round(params, draft_params, state, jax.random.fold_in(key, r), stop,
                             budget - count, cfg, sampler, draft)
    buf = jax.lax.dynamic_update_slice(buf, out, (0, count))
    stats = jax.tree.map(jnp.add, stats, st)
    return new, buf, count + n + 1, stats, r + 1

  buf = jnp.zeros((b, draft.rounds * width), jnp.int32)
  carry = (state, buf, zero, RoundStats(zero, zero, zero), zero)
  state, buf, count, stats, _ = jax.lax.while_loop(cond, body, carry)
  return state, buf, count, stats


rounds_step = jax.jit(_rounds, static_argnames=("cfg", "sampler", "draft"),
                      donate_argnames=("state",))


@functools.lru_cache(maxsize=16)
def _compiled_rounds(cfg: ModelConfig, sampler: Sampler, draft, treedef, shapes: tuple):
  args = _abstract(treedef, shapes)
  return rounds_step.lower(*args, cfg=cfg, sampler=sampler, draft=draft).compile()


Draft = Any  # `Ngram` or `gemma.inference.mtp.Mtp`: tokens, rounds, name, params, propose()


def check_compatible(draft, run: Runner) -> None:
  """Refuses, before any compute, a drafter that cannot serve this target (a drafter's own
  `check(cfg)`: vocabulary, hidden size, attention layout), and placements speculative decoding
  does not run on (a mesh, the PLE table on the host)."""
  if run.mesh is not None or run.ple_on_host:
    raise ValueError("speculative decoding runs on one device with the PLE table in device "
                     "memory: drop --mesh / --ple-on-host, or --draft")
  check = getattr(draft, "check", None)
  if check is not None:
    check(run.cfg)


DEFAULT_TOKENS = {"ngram": 4, "mtp": 2}


def check_draft_spec(draft, tokens: int | None) -> None:
  """Refuses a bad --draft / --draft-tokens before any weight is read."""
  if tokens is not None and (draft is None or not isinstance(tokens, int) or tokens < 1):
    raise ValueError(f"--draft-tokens must be an integer >= 1 and needs --draft, got {tokens!r}")
  if isinstance(draft, str) and draft != "ngram" and not Path(draft).exists():
    raise FileNotFoundError(f"--draft {draft}: neither 'ngram' nor an existing drafter "
                            "checkpoint")


def make_draft(draft, tokens: int | None = None, dtype=jnp.float32):
  """The drafter of a --draft value: None, "ngram" (`Ngram`), the path of a Gemma 4 MTP
  assistant checkpoint (`gemma.inference.mtp.load_drafter`), or a drafter (returned as it is,
  with `tokens` applied). `check_compatible` checks it against a target."""
  check_draft_spec(draft, tokens)
  if draft is None:
    return None
  if draft == "ngram":
    return Ngram(tokens=tokens or DEFAULT_TOKENS["ngram"])
  if isinstance(draft, str | Path):
    return mtp.load_drafter(draft, tokens or DEFAULT_TOKENS["mtp"], dtype)
  return draft if tokens is None else dataclasses.replace(draft, tokens=tokens)


def initial_history(tokens: np.ndarray, positions: np.ndarray, first: np.ndarray,
                    columns: int, before: Sequence[int] | None = None) -> np.ndarray:
  """[B, columns] int32: the tokens of each cache column (-1 where none: padding, unwritten),
  `before` (a chat session's earlier transcript, batch 1) first, then the prompt, then the first
  generated token."""
  before = list(before or [])
  b, t = tokens.shape
  hist = np.full((b, columns), -1, np.int32)
  hist[:, :len(before)] = before
  hist[:, len(before):len(before) + t] = np.where(positions >= 0, tokens, -1)
  hist[:, len(before) + t] = first
  return hist


def stream(run: Runner, cache: KVCache, tokens: np.ndarray, positions: np.ndarray,
           max_new_tokens: int, sampler: Sampler, seed: int, eos_ids: Sequence[int] | None,
           prefill_chunk: int | None, draft, history: Sequence[int] | None = None):
  """`gemma.inference.decode.stream` by speculative rounds: the same generator (one list of ids
  per generated column) and return value (Generation with the draft statistics, cache).

  `cache` needs `draft.tokens` columns of slack (`Runner.new_cache(..., slack=)`), and must hold
  exactly `history` (default nothing) before `tokens`."""
  check_compatible(draft, run)
  cfg = run.cfg
  b = tokens.shape[0]
  held = len(history or [])
  if held != int(cache.length):
    raise ValueError(f"the cache holds {int(cache.length)} columns but history has {held}")
  stop_np = stop_array(cfg, eos_ids)
  stop = jnp.asarray(stop_np)
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  chunks, compiled = compile_prompt(run, cache, tokens, positions, prefill_chunk,
                                    hidden=draft.needs_hidden)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits, *hidden, cache = run_prompt(chunks, compiled, cache)
  first = np.asarray(_sample(logits, jax.random.fold_in(key, 0), sampler))
  prefill_s = time.perf_counter() - t0
  columns = cache.max_length + draft.tokens + 2
  state = SpecState(
      cache=cache, last=jnp.asarray(first),
      history=jnp.asarray(initial_history(tokens, positions, first, columns, history)),
      hidden=hidden[0] if draft.needs_hidden else None, done=jnp.zeros((b,), bool),
      bad=~jnp.all(jnp.isfinite(logits), axis=-1))
  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  stats = np.zeros(3, np.int64)
  decode_s, generated, call = 0.0, 0, 0
  ids = first[:, None]
  step = None  # the rounds' executable: one signature for the whole run
  while True:
    if bool(np.asarray(state.bad).any()):
      rows = np.flatnonzero(np.asarray(state.bad)).tolist()
      raise FloatingPointError(f"non-finite logits (NaN or inf) after {generated} generated "
                               f"tokens (rows {rows}): the weights or the KV cache hold "
                               "non-finite values")
    for col in range(ids.shape[1]):
      for row in range(b):
        if not done[row]:
          out[row].append(int(ids[row, col]))
      done |= np.isin(ids[:, col], stop_np)
      generated += 1
      yield [int(i) for i in ids[:, col]]
    if done.all() or generated >= max_new_tokens:
      break
    args = (run.params, draft.params, state, jax.random.fold_in(key, call + 1), stop,
            jnp.asarray(max_new_tokens - generated, jnp.int32))
    if step is None:
      t1 = time.perf_counter()
      step = _compiled_rounds(cfg, sampler, draft, *_signature(args))
      compile_s += time.perf_counter() - t1
    t1 = time.perf_counter()
    state, buf, count, st = step(*args)
    count = int(count)
    ids = np.asarray(buf)[:, :count]
    decode_s += time.perf_counter() - t1
    stats += [int(st.steps), int(st.drafted), int(st.accepted)]
    call += 1
  result = Generation(tokens=out, prompt_tokens=int((positions >= 0).sum()), compile_s=compile_s,
                      prefill_s=prefill_s, decode_s=decode_s, decode_steps=generated - 1,
                      kv_cache_bytes=sum(x.nbytes for x in jax.tree.leaves(state.cache)),
                      draft=draft.name, draft_tokens=draft.tokens, target_steps=int(stats[0]),
                      drafted=int(stats[1]), accepted=int(stats[2]))
  return result, state.cache


__all__ = ["DEFAULT_TOKENS", "Draft", "Ngram", "RoundStats", "SpecState", "accept",
           "check_compatible", "check_draft_spec", "initial_history", "make_draft",
           "rounds_step", "stream"]

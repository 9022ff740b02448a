"""The jitted prefill and decode steps and what runs them: bucketing, ahead-of-time compiled
executables per argument signature, the memory and capacity checks, and `Runner` (params placed
once, with the placement of each step's small inputs).

Prompts of a batch are left-padded to a common length; positions come from the padding mask,
so a padded row generates exactly what it generates alone. `prefill` right-pads the chunk to a
power-of-two bucket (bounded recompiles); `decode_step` donates the cache.

On a device mesh params and cache are placed by `gemma.parallel.sharding`, the small inputs
are replicated, and the steps are compiled with the cache's shardings pinned on their outputs,
so the cache never moves between steps. The loops over these steps are `gemma.inference.decode`
(one token per step) and `gemma.inference.speculative` (draft and verify).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma.inference.sampling import Sampler, sample
from gemma.kv.cache import KVCache, init_cache
from gemma.model.config import ModelConfig
from gemma.model.params import Params
from gemma.model.transformer import forward
from gemma.parallel import host_ple, memory, sharding

MIN_BUCKET = 8
GREEDY = Sampler()
_sample = jax.jit(sample, static_argnames="sampler")
_finite_rows = jax.jit(lambda logits: jnp.isfinite(logits).all(axis=-1))  # [B, V] -> [B] bool


def stop_array(cfg: ModelConfig, eos_ids: Sequence[int] | None) -> np.ndarray:
  """The sorted stop ids [S] int32 of a run: `eos_ids`, or the config's."""
  return np.asarray(sorted(set(cfg.eos_ids if eos_ids is None else eos_ids)), np.int32)


def _check_finite(logits: jax.Array, done: np.ndarray, step: int) -> None:
  """Stops generation whose logits hold NaN or inf (a row still running), naming the step."""
  bad = ~np.asarray(_finite_rows(logits)) & ~done
  if bad.any():
    raise FloatingPointError(
        f"non-finite logits (NaN or inf) at generation step {step} (rows "
        f"{np.flatnonzero(bad).tolist()}): the weights or the KV cache hold non-finite values")


# Prompt tokens per prefill call by default: compiled once per chunk size, no chunk padded beyond
# its own tail, and a working set independent of the prompt's length (`gemma.parallel.memory`).
DEFAULT_PREFILL_CHUNK = 2048


def chunk_size(prefill_chunk: int | None) -> int:
  """Prompt tokens per prefill call: `prefill_chunk`, or DEFAULT_PREFILL_CHUNK for None."""
  chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
  if chunk < 1:
    raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
  return chunk


def bucket_length(n: int) -> int:
  """The power-of-two chunk length (at least MIN_BUCKET) that a prompt of n tokens is padded to."""
  return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def _prefill(params: Params, tokens: jax.Array, positions: jax.Array, num_columns: jax.Array,
             cache: KVCache, cfg: ModelConfig, hidden: bool = False):
  """Runs a (bucket-padded) chunk through the model and the cache.

  Args:
    tokens, positions: [B, T_bucket]; columns >= num_columns are padding.
    hidden: also return the final-normed hidden state [B, D] at the last valid column.
  Returns:
    (logits [B, V] float32 at the last valid column[, hidden], updated cache)
  """
  out = forward(params, tokens, positions, cfg, cache, num_columns=num_columns,
                logits_at=num_columns - 1, return_hidden=hidden)
  return (out[0], out[2], out[1]) if hidden else out


def _decode(params: Params, tokens: jax.Array, cache: KVCache, key: jax.Array,
            cfg: ModelConfig, sampler: Sampler):
  """One decoding step. tokens: [B] the last tokens. Returns (next [B], logits [B, V], cache)."""
  positions = cache.next_pos[:, None]
  logits, cache = forward(params, tokens[:, None], positions, cfg, cache,
                          logits_at=jnp.zeros((), jnp.int32))
  return sample(logits, key, sampler), logits, cache


# Decoding steps per device call of `decode_loop`: the host sees tokens (streaming, stop and
# finiteness checks) once per call instead of once per token.
STEPS_PER_CALL = 8


def _decode_loop(params: Params, tokens: jax.Array, cache: KVCache, key: jax.Array,
                 step: jax.Array, limit: jax.Array, stop: jax.Array, done: jax.Array,
                 cfg: ModelConfig, sampler: Sampler, n: int):
  """Up to `limit` (<= n) decoding steps in one call (`lax.while_loop`), each exactly
  `_decode`'s with key `fold_in(key, step + i + 1)` for its i-th step; it ends early once every
  row has stopped or a running row's logits are not finite.

  Args:
    tokens: [B] the last tokens (emitted, not yet fed); step: generation steps done before.
    stop: [S] stop ids; done: [B] rows already stopped.
  Returns:
    (new tokens [B, n] (columns >= steps are 0), steps run, the step index i whose logits held
    NaN or inf in a running row (its token is not valid) or -1, cache)
  """
  b = tokens.shape[0]

  def cond(carry):
    i, _, _, done, _, bad = carry
    return (i < limit) & ~done.all() & (bad < 0)

  def body(carry):
    i, ids, cache, done, out, bad = carry
    logits, cache = forward(params, ids[:, None], cache.next_pos[:, None], cfg, cache,
                            logits_at=jnp.zeros((), jnp.int32))
    nxt = sample(logits, jax.random.fold_in(key, step + i + 1), sampler)
    bad = jnp.where((jnp.isfinite(logits).all(axis=-1) | done).all(), bad, i)
    out = out.at[:, i].set(nxt)
    return i + 1, nxt, cache, done | jnp.isin(nxt, stop), out, bad

  zero = jnp.zeros((), jnp.int32)
  init = (zero, tokens, cache, done, jnp.zeros((b, n), jnp.int32), zero - 1)
  i, _, cache, _, out, bad = jax.lax.while_loop(cond, body, init)
  return out, i, bad, cache


prefill_step = jax.jit(_prefill, static_argnames=("cfg", "hidden"), donate_argnames=("cache",))
decode_step = jax.jit(_decode, static_argnames=("cfg", "sampler"), donate_argnames=("cache",))
decode_loop = jax.jit(_decode_loop, static_argnames=("cfg", "sampler", "n"),
                      donate_argnames=("cache",))


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
  draft: str | None = None  # speculative decoding's drafter ("ngram", "mtp"), None: off
  draft_tokens: int = 0  # K drafts per round
  target_steps: int = 0  # target forward passes while decoding (verifications + plain steps)
  drafted: int = 0  # draft tokens proposed to running rows (summed over rows)
  accepted: int = 0  # of which kept

  @property
  def acceptance_rate(self) -> float:
    """Kept draft tokens / proposed draft tokens (0 without drafts)."""
    return self.accepted / self.drafted if self.drafted else 0.0

  @property
  def mean_accepted_per_step(self) -> float:
    """Kept draft tokens per target step, per row: each step also emits one token of the
    target's own, so a step yields 1 + this many tokens."""
    rows = max(len(self.tokens), 1)
    return self.accepted / (self.target_steps * rows) if self.target_steps else 0.0

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

  @property
  def decode_tokens_per_s(self) -> float:
    """Steady-state decode speed per row (compiled ahead of time; the first step excluded)."""
    return self.decode_steps / self.decode_s if self.decode_s else 0.0


def _signature(args) -> tuple:
  """(treedef, ((shape, dtype, mesh sharding or None) per leaf)): the key of one executable."""
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((x.shape, x.dtype, _mesh_sharding(x)) for x in leaves)


def _mesh_sharding(x) -> NamedSharding | None:
  s = getattr(x, "sharding", None)
  return s if isinstance(s, NamedSharding) else None


def _abstract(treedef, shapes: tuple):
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d, sharding=sh)
                                      for s, d, sh in shapes])


def _replicate(x, sharding: NamedSharding):
  """x (array or PRNG key) replicated on the mesh; also across processes (a typed key cannot be
  device_put to devices of other processes, its raw data can)."""
  if getattr(x, "sharding", None) == sharding:
    return x
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_replicate(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  return jax.device_put(x, sharding)


def _jitted(fn, default, static: tuple[str, ...], cache, n_small: int):
  """`default` (the plain jitted step), or, when the cache lives on a mesh, a jit of `fn` whose
  outputs are n_small replicated arrays and the cache with its input shardings."""
  shardings = [x.sharding for x in jax.tree.leaves(cache)]
  if not shardings or not all(isinstance(s, NamedSharding) for s in shardings):
    return default
  replicated = NamedSharding(shardings[0].mesh, PartitionSpec())
  out = (*(replicated,) * n_small, jax.tree.map(lambda x: x.sharding, cache))
  return jax.jit(fn, static_argnames=static, donate_argnames=("cache",), out_shardings=out)


@functools.lru_cache(maxsize=32)
def _compiled_prefill(cfg: ModelConfig, treedef, shapes: tuple, hidden: bool = False):
  """Ahead-of-time compiled prefill for one argument signature (so timings exclude compiling)."""
  args = _abstract(treedef, shapes)
  step = _jitted(_prefill, prefill_step, ("cfg", "hidden"), args[-1], n_small=1 + hidden)
  return step.lower(*args, cfg=cfg, hidden=hidden).compile()


@functools.lru_cache(maxsize=32)
def _compiled_decode(cfg: ModelConfig, sampler: Sampler, treedef, shapes: tuple):
  """Ahead-of-time compiled decode step: one executable for every step, whatever placement the
  arrays carry (a jitted call would recompile when e.g. restored params are committed)."""
  args = _abstract(treedef, shapes)
  step = _jitted(_decode, decode_step, ("cfg", "sampler"), args[2], n_small=2)
  return step.lower(*args, cfg=cfg, sampler=sampler).compile()


@functools.lru_cache(maxsize=32)
def _compiled_decode_loop(cfg: ModelConfig, sampler: Sampler, n: int, treedef, shapes: tuple):
  """Ahead-of-time compiled `decode_loop` of up to n steps per call."""
  args = _abstract(treedef, shapes)
  step = _jitted(_decode_loop, decode_loop, ("cfg", "sampler", "n"), args[2], n_small=3)
  return step.lower(*args, cfg=cfg, sampler=sampler, n=n).compile()


def compile_prompt(run: Runner, cache: KVCache, tokens: np.ndarray, positions: np.ndarray,
                   prefill_chunk: int | None, hidden: bool = False):
  """A prompt [B, T] cut into chunks of `prefill_chunk` (inputs placed, host-PLE rows attached)
  and one ahead-of-time executable per chunk signature (a full chunk and the tail's bucket).
  Returns (chunks, executables) for `run_prompt`."""
  cfg, chunk = run.cfg, chunk_size(prefill_chunk)
  chunks = []  # (params with PLE rows, tokens, positions, num_columns) per chunk
  for i in range(0, tokens.shape[1], chunk):
    inputs = bucket_inputs(cfg, tokens[:, i:i + chunk], positions[:, i:i + chunk])
    chunks.append((run.with_rows(run.params, inputs[0]), *map(run.place, inputs)))
  compiled = {}
  for args in chunks:
    sig = _signature((*args, cache))
    if sig not in compiled:
      compiled[sig] = _compiled_prefill(cfg, *sig, hidden)
  return chunks, compiled


def run_prompt(chunks, compiled, cache: KVCache):
  """Prefills `compile_prompt`'s chunks onto `cache`, one after the other. Returns (logits
  [B, V] of the last column[, hidden [B, D]], cache)."""
  for args in chunks:
    *out, cache = compiled[_signature((*args, cache))](*args, cache)
  return (*out, cache)


def device_memory_limit() -> int | None:
  """Bytes this process's first device may allocate (None where the backend does not say, e.g.
  CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def check_memory(params: Params, cfg: ModelConfig, batch: int, max_length: int,
                 kv_quant, mesh: Mesh | None = None, prefill_chunk: int | None = None) -> None:
  """Refuses, before allocating the cache, a run whose weights + KV cache + prefill working set
  (chunks of `prefill_chunk`, default DEFAULT_PREFILL_CHUNK) exceed one device
  (`gemma.parallel.memory.check_fits`, the planner `gemma4 plan` uses too)."""
  memory.check_fits(params, cfg, batch, max_length, kv_quant, mesh, device_memory_limit(),
                    chunk_size(prefill_chunk))


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


@dataclasses.dataclass
class Runner:
  """Params placed for a run, and how each step's inputs are placed: what `generate` and a chat
  session (`gemma.inference.session`) share. Build with `runner`."""

  params: Params
  cfg: ModelConfig
  mesh: Mesh | None = None
  with_rows: Callable = lambda p, _: p  # attaches host-PLE rows for the step's tokens
  place: Callable = lambda x: x  # small inputs: replicated on the mesh
  ple_on_host: bool = False

  def new_cache(self, batch: int, max_length: int, kv_quant,
                prefill_chunk: int | None = None, slack: int = 0) -> KVCache:
    """An empty cache, checked against device memory (with the prefill working set of chunks
    of `prefill_chunk`) and placed on the mesh; `slack` extra slots per buffer for speculative
    decoding's rolled-back columns (`gemma.kv.cache.init_cache`)."""
    check_memory(self.params, self.cfg, batch, max_length + slack, kv_quant, self.mesh,
                 prefill_chunk)
    cache = init_cache(self.cfg, batch, max_length, self.params.embed.dtype, kv_quant, slack)
    return cache if self.mesh is None else sharding.shard_cache(cache, self.mesh)

  def grow_cache(self, cache: KVCache, max_length: int, kv_quant,
                 prefill_chunk: int | None = None, slack: int = 0) -> KVCache:
    """`cache` with room for `max_length` columns (+ `slack`): buffers that grow get the old
    slots first (a buffer that grows has never wrapped: it was as long as the whole cache)."""
    if max_length + slack <= cache.max_length:
      return cache
    batch = cache.next_pos.shape[0]
    new = self.new_cache(batch, max_length, kv_quant, prefill_chunk, slack)
    layers = jax.tree.map(
        lambda o, n: o if o.shape == n.shape else n.at[:, :o.shape[1]].set(o),
        cache.layers, new.layers)
    return dataclasses.replace(new, layers=layers, length=cache.length, next_pos=cache.next_pos,
                               codec=cache.codec)


def runner(params: Params, cfg: ModelConfig, mesh: Mesh | None = None,
           ple_on_host: bool = False) -> Runner:
  """Places params for generation: the per-layer-embedding table in host memory with
  `ple_on_host`, every leaf sharded on `mesh` (`gemma.parallel.sharding`)."""
  replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
  run = Runner(params, cfg, mesh)
  if ple_on_host:
    params, table = host_ple.offload(params, cfg.ple_vocab_size, replicated)
    run.params, run.with_rows, run.ple_on_host = params, table.attach, True
  if mesh is not None:
    run.params = sharding.shard_params(run.params, mesh)
    run.place = functools.partial(_replicate, sharding=replicated)
  return run

"""Perplexity of a text, and how closely a (quantized) model follows a reference model.

The token stream is cut into windows of `context` tokens (BOS + `context - 1` text tokens) that
start every `stride` text tokens (HF-style strided / sliding-window perplexity). The first window
scores all of its text tokens; every later one scores only its last `stride` (the tokens the
previous window did not reach), so every text token is predicted exactly once, from at least
`context - 1 - stride` (first window: fewer) and at most `context - 1` tokens of history. The
default stride `context - 1` gives non-overlapping windows: one forward per `context - 1` tokens
and the least history; a smaller stride costs about `(context - 1) / stride` times the compute
for more history per token. Per predicted token we accumulate

  nll    -log q(target)                          (perplexity = exp(mean nll))
  kl     KL(p_ref || q) = Σ_v p_ref(v) (log p_ref(v) - log q(v))
  agree  argmax p_ref == argmax q

where q is the evaluated model and p_ref the reference (the same model without `--quant`, for
which KL is exactly 0 and agreement exactly 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma.io.formats.common import progress
from gemma.kv.cache import init_cache
from gemma.model.config import ModelConfig
from gemma.model.params import Params
from gemma.model.transformer import forward


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Per-token means over `tokens` predicted tokens in `windows` windows."""

  perplexity: float
  reference_perplexity: float
  mean_kl: float
  top1_agreement: float
  tokens: int
  windows: int
  seconds: float


def check_stride(context: int, stride: int | None) -> int:
  """The effective stride (None: `context - 1`, non-overlapping windows); ValueError if bad."""
  if context < 2:
    raise ValueError(f"context must be >= 2 (BOS + one scored token), got {context}")
  if stride is None:
    return context - 1
  if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)):
    raise ValueError(f"stride must be an integer, got {stride!r}")
  if not 1 <= stride <= context - 1:
    raise ValueError(f"stride must be in [1, context - 1] = [1, {context - 1}] text tokens "
                     f"between window starts, got {stride}")
  return int(stride)


def make_windows(ids: list[int], context: int, bos_id: int,
                 stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a token stream into BOS-led windows of `context` tokens starting every `stride` text
  tokens (None: `context - 1`, non-overlapping). `scored_mask` says which tokens each scores.

  Returns:
    tokens [W, context] int32 (the last window zero-padded) and
    positions [W, context] int32 (-1 on padding).
  """
  stride = check_stride(context, stride)
  if not ids:
    raise ValueError("the text has no tokens")
  span = context - 1  # text tokens per window
  count = 1 + max(0, -(-(len(ids) - span) // stride))
  tokens = np.zeros((count, context), np.int32)
  positions = np.full((count, context), -1, np.int32)
  for w in range(count):
    chunk = ids[w * stride:w * stride + span]
    tokens[w, 0], tokens[w, 1:1 + len(chunk)] = bos_id, chunk
    positions[w, :1 + len(chunk)] = np.arange(1 + len(chunk))
  return tokens, positions


def scored_mask(positions: np.ndarray, stride: int | None = None) -> np.ndarray:
  """[W, context] bool: which tokens of `make_windows(..., stride)`'s windows are scored.

  The first window scores all its text tokens, each later one its last `stride` slots (those the
  previous window did not cover); never BOS or padding. Every text token is scored exactly once.
  """
  context = positions.shape[1]
  stride = check_stride(context, stride)
  slot = np.arange(context)[None, :]
  first = np.arange(len(positions))[:, None] == 0
  return (positions >= 1) & (first | (slot >= context - stride))


@functools.partial(jax.jit, static_argnames=("cfg", "kv_quant"))
def log_probs(params: Params, tokens: jax.Array, positions: jax.Array,
              cfg: ModelConfig, kv_quant: str | None = None) -> jax.Array:
  """[1, T-1, V] float32 log-probabilities of the tokens after each of a window's first T-1.

  kv_quant: attend through a KV cache of that kind (`gemma.kv.cache.init_cache`): every token then
  sees the stored (e.g. TurboQuant) keys and values of all earlier tokens and of itself, exactly
  as in streaming decode.
  """
  cache = None
  if kv_quant is not None:  # one slot: the window attends to its own stored K/V
    cache = init_cache(cfg, tokens.shape[0], 1, params.embed.dtype, kv_quant)
  logits, _ = forward(params, tokens, positions, cfg, cache)
  return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)


@jax.jit
def window_sums(lq: jax.Array, lp: jax.Array, tokens: jax.Array, positions: jax.Array,
                scored: jax.Array | None = None) -> jax.Array:
  """Sums over the scored tokens of one window.

  Args:
    lq, lp: [1, T-1, V] `log_probs` of the evaluated and of the reference model.
    tokens, positions: [1, T] the window (from `make_windows`).
    scored: [1, T] bool, the tokens to score (from `scored_mask`); None: every non-padding
      token after the first.
  Returns:
    [5] float32: (count, nll, reference nll, kl, top-1 agreements).
  """
  scored = positions[:, 1:] >= 0 if scored is None else scored[:, 1:]
  mask = scored.astype(jnp.float32)  # [1, T-1]
  targets = tokens[:, 1:, None]
  nll = -jnp.take_along_axis(lq, targets, axis=-1)[..., 0]
  ref_nll = -jnp.take_along_axis(lp, targets, axis=-1)[..., 0]
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
  agree = (jnp.argmax(lp, -1) == jnp.argmax(lq, -1)).astype(jnp.float32)
  return jnp.stack([jnp.sum(mask), *(jnp.sum(x * mask) for x in (nll, ref_nll, kl, agree))])


def evaluate_many(models: dict[str, Params], cfg: ModelConfig, ids: list[int], context: int,
                  reference: Params | None = None, bos_id: int | None = None,
                  show_progress: bool = True, kv_quants: dict[str, str | None] | None = None,
                  reference_kv_quant: str | None = None, stride: int | None = None,
                  reference_cfg: ModelConfig | None = None) -> dict[str, EvalResult]:
  """`evaluate` for several models against one reference, run once per window.

  Args:
    models: name -> params (float or quantized) of the models to evaluate.
    cfg: their config; `context` may not exceed cfg.max_position_embeddings.
    ids: the text's token ids (without BOS).
    context: window length in tokens, BOS included.
    reference: the reference model (None: each model is its own reference, KL = 0).
    reference_cfg: the reference's config when it differs from `cfg` (another checkpoint of the
      same vocabulary, e.g. a float model against a GGUF quantized elsewhere).
    kv_quants: name -> KV cache kind of that model (`init_cache`'s kv_quant; default none).
    reference_kv_quant: the reference model's KV cache kind.
    stride: text tokens between window starts, in [1, context - 1] (None: context - 1, i.e.
      non-overlapping windows); each window after the first scores only its last `stride`.
  """
  kv_quants = kv_quants or {}
  reference_cfg = reference_cfg or cfg
  if reference_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"the reference's vocabulary ({reference_cfg.vocab_size}) differs from the "
                     f"model's ({cfg.vocab_size})")
  stride = check_stride(context, stride)
  if context > cfg.max_position_embeddings:
    raise ValueError(f"context {context} exceeds the model's {cfg.max_position_embeddings}")
  bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
  if bad:
    raise ValueError(f"token ids out of range [0, {cfg.vocab_size}): {bad[:10]}")
  tokens, positions = make_windows(ids, context, cfg.bos_id if bos_id is None else bos_id,
                                   stride)
  scored = scored_mask(positions, stride)
  sums = {name: np.zeros(5, np.float64) for name in models}
  seconds = dict.fromkeys(models, 0.0)
  for w in range(len(tokens)):
    t, p = jnp.asarray(tokens[w:w + 1]), jnp.asarray(positions[w:w + 1])
    m = jnp.asarray(scored[w:w + 1])
    lp = None if reference is None else log_probs(reference, t, p, reference_cfg,
                                                  reference_kv_quant)
    for name, params in models.items():
      t0 = time.perf_counter()
      lq = log_probs(params, t, p, cfg, kv_quants.get(name))
      sums[name] += np.asarray(window_sums(lq, lq if lp is None else lp, t, p, m), np.float64)
      seconds[name] += time.perf_counter() - t0
      del lq
    if show_progress:
      progress(w + 1, len(tokens), "eval windows")
  out = {}
  for name, (count, nll, ref_nll, kl, agree) in sums.items():
    out[name] = EvalResult(
        perplexity=math.exp(nll / count), reference_perplexity=math.exp(ref_nll / count),
        mean_kl=kl / count, top1_agreement=agree / count, tokens=int(count),
        windows=len(tokens), seconds=seconds[name])
  return out


def evaluate(params: Params, cfg: ModelConfig, ids: list[int], context: int,
             reference: Params | None = None, bos_id: int | None = None,
             show_progress: bool = True, kv_quant: str | None = None,
             stride: int | None = None, reference_cfg: ModelConfig | None = None) -> EvalResult:
  """Perplexity of `params` on `ids` and its KL / top-1 agreement against `reference`.

  Args:
    params: the model to evaluate (float or quantized).
    cfg: its config; `context` may not exceed cfg.max_position_embeddings.
    ids: the text's token ids (without BOS).
    context: window length in tokens, BOS included.
    reference: the reference model (None: `params` itself, so KL = 0 and agreement = 1); it
      always runs with the plain cache.
    kv_quant: KV cache of the evaluated model (`gemma.kv.cache.init_cache`), e.g. "tq3.5".
    stride: text tokens between window starts, in [1, context - 1] (None: context - 1,
      non-overlapping windows; smaller: more history per scored token, more compute).
    reference_cfg: the reference's config when it is another checkpoint (same vocabulary).
  """
  return evaluate_many({"": params}, cfg, ids, context, reference, bos_id, show_progress,
                       kv_quants={"": kv_quant}, stride=stride, reference_cfg=reference_cfg)[""]


NEEDLE_ANSWER = "7 4 1 9"
NEEDLE = f" The secret code of the white rabbit is {NEEDLE_ANSWER}. Remember it."
NEEDLE_QUESTION = ("\n\nQuestion: what is the secret code of the white rabbit?\nAnswer: The "
                   "secret code of the white rabbit is")


def needle_prompt(tokenizer, text_ids: list[int], tokens: int) -> list[int]:
  """A needle-in-a-haystack prompt of exactly `tokens` ids: BOS, the text's first tokens with
  NEEDLE at half depth, then NEEDLE_QUESTION (a greedy answer should start with NEEDLE_ANSWER)."""
  needle = tokenizer.encode(NEEDLE, add_bos=False)
  question = tokenizer.encode(NEEDLE_QUESTION, add_bos=False)
  hay = tokens - 1 - len(needle) - len(question)
  if hay < 16 or hay > len(text_ids):
    raise ValueError(f"a needle prompt of {tokens} tokens does not fit the needle, the question "
                     f"and the {len(text_ids)}-token text")
  half = hay // 2
  return [tokenizer.bos_id, *text_ids[:half], *needle, *text_ids[half:hay], *question]

"""Token sampling: greedy, temperature, top-k, top-p. Pure and seeded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Sampling settings (hashable, static under jit). temperature 0 means greedy."""

  temperature: float = 0.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off

  def __post_init__(self):
    if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
      raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
    if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

  @classmethod
  def of(cls, temperature: float = 0.0, top_k: int | None = None,
         top_p: float | None = None) -> Sampler:
    """The sampler of the API's keywords (None: off)."""
    return cls(temperature=temperature, top_k=0 if top_k is None else top_k,
               top_p=1.0 if top_p is None else top_p)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filtered_logits(logits: jax.Array, sampler: Sampler) -> jax.Array:
  """Logits [..., V] of the distribution `sample` draws from (temperature, top-k, top-p
  applied; excluded tokens at the float32 minimum). Not for greedy samplers."""
  logits = logits.astype(jnp.float32) / sampler.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampler.top_k:
    k = min(sampler.top_k, logits.shape[-1])
    # [..., 1] the k-th largest logit; ties with it are kept
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sampler.top_p < 1:
    # [..., V] descending
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < sampler.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def probabilities(logits: jax.Array, sampler: Sampler) -> jax.Array:
  """The distribution [..., V] float32 that `sample` draws from (one-hot argmax when greedy)."""
  if sampler.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filtered_logits(logits, sampler), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sampler: Sampler) -> jax.Array:
  """Draws one token per row. logits: [B, V] float32 -> [B] int32."""
  if sampler.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filtered_logits(logits, sampler), axis=-1).astype(jnp.int32)

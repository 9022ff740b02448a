"""Prompt lookup: model-free drafts from the context itself.

The draft continues the most recent earlier occurrence of the context's last n tokens (n from
`max_ngram` down to `min_ngram`, the longest match first). When the match is closer than K
tokens back, the continuation runs into the suffix itself and is extended with the same period
(a repeated phrase keeps repeating). Works with any checkpoint: nothing but token ids is read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lookup(history: jax.Array, end: jax.Array, k: int, max_ngram: int = 3,
           min_ngram: int = 1) -> tuple[jax.Array, jax.Array]:
  """Drafts k tokens per row by prompt lookup.

  Args:
    history: [B, C] int32 token per column, < 0 where a column holds no token (left padding).
    end: [] int32 column of each row's last token (the draft continues after it).
    k: draft length; max_ngram >= min_ngram >= 1: n-gram sizes tried, longest first.
  Returns:
    (drafts [B, k] int32, found [B] bool: a row without any match drafts its last token).
  """
  b, c = history.shape
  col = jnp.arange(c)
  best = jnp.full((b,), -1, jnp.int32)  # column where the chosen match ends
  for n in range(max_ngram, min_ngram - 1, -1):
    # [B, n] the last n tokens
    suffix = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(end - n + 1, 0), n, axis=1)
    usable = (end >= n - 1) & jnp.all(suffix >= 0, axis=1)
    # [B, C] column j ends an occurrence: history[j - m] == suffix[n - 1 - m] for m < n
    match = (col < end)[None, :] & (col >= n - 1)[None, :] & usable[:, None]
    for m in range(n):
      match &= jnp.roll(history, m, axis=1) == suffix[:, n - 1 - m, None]
    latest = jnp.max(jnp.where(match, col, -1), axis=1)
    best = jnp.where((best < 0) & (latest >= 0), latest, best)
  found = best >= 0
  # [B, k] continuation after the match, periodic once it reaches the end
  period = jnp.maximum(end - best, 1)
  idx = jnp.where(found[:, None], best[:, None] + 1 + jnp.arange(k)[None, :] % period[:, None],
                  end)
  return jnp.take_along_axis(history, idx, axis=1).astype(jnp.int32), found

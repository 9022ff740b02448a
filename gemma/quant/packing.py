"""Bit packing of b-bit codes (b = 1..8) into uint32 (or uint8) words along one axis, b bits each.

A b-bit code is split into bit planes of power-of-two widths, widest first: 3 = 2 + 1,
5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1 (1, 2, 4 and 8 are one plane). A plane of width w holds
32/w codes per uint32 word, code j of a word in bits [j·w, (j+1)·w) (little-endian), plane 0 holding
the low bits. Planes are concatenated along the packed axis, so n codes take n·b/32 words and
every plane unpacks with shifts and masks only (no code straddles a word).

  codes [..., n, ...] (axis) -> words [..., n·b/word_bits, ...]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def planes(bits: int) -> tuple[int, ...]:
  """Plane widths of a b-bit code, widest first (plane 0 holds the low bits)."""
  if not 1 <= bits <= 8:
    raise ValueError(f"bits={bits} must be in 1..8")
  return tuple(w for w in (8, 4, 2, 1) if bits & w)


def packed_length(n: int, bits: int, word_bits: int = 32) -> int:
  """Words that n codes of `bits` bits take; raises unless every plane fills whole words."""
  total = 0
  for w in planes(bits):
    per_word = word_bits // w
    if n % per_word:
      raise ValueError(f"cannot pack {n} codes of {bits} bits into {word_bits}-bit words: "
                       f"a {w}-bit plane needs a multiple of {per_word}")
    total += n // per_word
  return total


def _word_dtype(word_bits: int):
  if word_bits not in (8, 32):
    raise ValueError(f"word_bits={word_bits}; expected 8 (uint8) or 32 (uint32)")
  return jnp.uint8 if word_bits == 8 else jnp.uint32


@functools.partial(jax.jit, static_argnames=("bits", "axis", "word_bits"))
def pack(codes: jax.Array, bits: int, axis: int = -1, word_bits: int = 32) -> jax.Array:
  """Packs integer codes in [0, 2^bits) along `axis` into uint32 (or uint8) words."""
  dtype = _word_dtype(word_bits)
  x = jnp.moveaxis(codes, axis, -1)
  n = x.shape[-1]
  packed_length(n, bits, word_bits)
  x = x.astype(jnp.uint32)
  out, shift = [], 0
  for w in planes(bits):
    per_word = word_bits // w
    # [..., n / per_word, per_word] codes of this plane, shifted into place within each word
    v = ((x >> shift) & ((1 << w) - 1)).reshape(*x.shape[:-1], n // per_word, per_word)
    offsets = jnp.arange(per_word, dtype=jnp.uint32) * w
    out.append(jnp.sum(v << offsets, axis=-1, dtype=jnp.uint32).astype(dtype))
    shift += w
  return jnp.moveaxis(jnp.concatenate(out, axis=-1), -1, axis)


@functools.partial(jax.jit, static_argnames=("bits", "n", "axis", "dtype"))
def unpack(words: jax.Array, bits: int, n: int, axis: int = -1,
           dtype=jnp.uint8) -> jax.Array:
  """Inverse of `pack`: n codes along `axis` from words (uint32 or uint8)."""
  word_bits = jnp.iinfo(words.dtype).bits
  if packed_length(n, bits, word_bits) != words.shape[axis]:
    raise ValueError(f"{words.shape[axis]} words along axis {axis} do not hold {n} codes "
                     f"of {bits} bits")
  y = jnp.moveaxis(words, axis, -1).astype(jnp.uint32)
  codes = jnp.zeros((*y.shape[:-1], n), jnp.uint32)
  start, shift = 0, 0
  for w in planes(bits):
    per_word = word_bits // w
    m = n // per_word
    offsets = jnp.arange(per_word, dtype=jnp.uint32) * w
    # [..., m, per_word] -> [..., n]
    v = (y[..., start:start + m, None] >> offsets) & ((1 << w) - 1)
    codes = codes | (v.reshape(*y.shape[:-1], n) << shift)
    start, shift = start + m, shift + w
  return jnp.moveaxis(codes.astype(dtype), -1, axis)

"""Codebook values of packed b-bit codes in registers, without a gather (Triton has none).

`lookup(code, table, bits)` maps int32 codes to float32 `table[code]`; `lookup_field(v, offset,
table, bits)` does the same for the b-bit field at bit `offset` of uint32 words, reading it in
place (the decode kernel's path: no shift, no int-to-float conversion where the table allows).

Formulations, cheapest first: an affine int-to-float conversion when the table is an arithmetic
progression (int baselines); Horner in u² when it is an odd polynomial of u = code - (2^b - 1)/2
(the "poly" codebooks); otherwise a binary select tree over the code's bits, halved for
antisymmetric tables (the Lloyd-Max codebooks of symmetric laws).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _affine(table: tuple[float, ...]):
  """(start, step) when table[i] = start + i·step exactly, else None."""
  t = np.asarray(table, np.float64)
  if t.size < 2:
    return None
  step = t[1] - t[0]
  return (float(t[0]), float(step)) if np.array_equal(t, t[0] + step * np.arange(t.size)) else None


def _odd_poly(table: tuple[float, ...]):
  """Coefficients (a1, a3, a5) when table[i] = Σ a_k u^k, u = i - (n - 1)/2, to float32
  rounding (the "poly" codebooks), else None."""
  t = np.asarray(table, np.float64)
  u = np.arange(t.size) - (t.size - 1) / 2
  powers = np.stack([u, u ** 3, u ** 5], axis=1)[:, :max(1, min(3, t.size // 2))]
  coef = np.linalg.lstsq(powers, t, rcond=None)[0]
  scale = np.max(np.abs(t))
  if scale == 0 or np.max(np.abs(powers @ coef - t)) > 1e-6 * scale:
    return None
  return tuple(float(c) for c in coef)


def lookup(code: jax.Array, table: tuple[float, ...], bits: int) -> jax.Array:
  """float32 table[code] for int32 codes, without a gather (Triton has none).

  Arithmetic progressions (int grids): one int-to-float conversion and an FMA. Odd polynomials in
  u = code - (2^b - 1)/2 ("poly" codebooks): Horner in u² (2-3 FMAs). Otherwise a binary select
  tree over the code's bits (2^b - 1 selects).
  """
  affine = _affine(table)
  if affine is not None:
    return affine[0] + affine[1] * code.astype(jnp.float32)
  poly = _odd_poly(table)
  if poly is not None:
    u = code.astype(jnp.float32) - (len(table) - 1) / 2
    u2, v = u * u, jnp.float32(poly[-1])
    for c in reversed(poly[:-1]):
      v = v * u2 + c
    return v * u
  vals = [jnp.float32(v) for v in table]
  for bit in range(bits):  # pairs (2i, 2i+1) differ in this bit: one select per pair
    on = ((code >> bit) & 1) == 1
    vals = [jnp.where(on, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
  return vals[0]


_MAGIC = 0x4B000000  # float32 2^23: OR-ing an integer i < 2^23 into its mantissa gives 2^23 + i


def lookup_field(v: jax.Array, offset: int, table: tuple[float, ...], bits: int) -> jax.Array:
  """float32 table[field] for the b-bit field at bit `offset` of uint32 words `v`, read in place.

  Polynomial tables: the field becomes a float without an int-to-float conversion: OR-ing it,
  moved to bit o' in 1..16 of the word (or of the word >> 15), into the mantissa of 2^23 gives
  2^23 + c·2^o' exactly, and one subtraction gives (c - center)·2^o'; Horner then runs on that
  value with coefficients pre-scaled by powers of two, so every rounding step is the one `lookup`
  does, scaled by 2^k: the results are bit-identical. Affine tables convert the shifted field
  (I2F of a small integer is cheaper there); select trees test the field's bits where they are.
  """
  mask = (1 << bits) - 1
  affine, poly = _affine(table), _odd_poly(table)
  if affine is not None:  # int-to-float conversion of the shifted field (cheapest here)
    return lookup(((v >> offset) & mask).astype(jnp.int32), table, bits)
  if poly is None:
    return _select_tree(v, offset, table, bits)
  # Fields move to bits 1..16 (bit 0 stays clear so that (c - center)·2^o, center = (2^b - 1)/2,
  # is an integer and 2^23 + center·2^o a float32); (word | 2^23's bits) & (2^23's bits | field
  # mask) = 2^23's bits | field: one AND per field, the shift and OR once per word and half (CSE).
  half, o = (v >> 15, offset - 15) if offset >= 16 else (v << 1, offset + 1)
  half = half | jnp.uint32(_MAGIC)
  f = jax.lax.bitcast_convert_type(half & jnp.uint32(_MAGIC | mask << o), jnp.float32)
  center = (len(table) - 1) / 2
  u = f - jnp.float32(2.0 ** 23 + center * 2.0 ** o)  # (c - center)·2^o, exact
  u2, v = u * u, jnp.float32(poly[-1] * 2.0 ** (-o * (2 * len(poly) - 1)))
  for k, c in reversed(list(enumerate(poly[:-1]))):
    v = v * u2 + jnp.float32(c * 2.0 ** (-o * (2 * k + 1)))
  return v * u


def _select_tree(v, offset, table, bits):
  """table[field] by selects on the field's bits in the word. Antisymmetric tables (t[n-1-i] =
  -t[i], the Lloyd-Max codebooks of symmetric laws) select |t| over the low bits, flipped by the
  top bit (XNOR: negative codes count down), then the sign: 2^(b-1) - 1 selects and a multiply
  instead of 2^b - 1 selects."""
  t = np.asarray(table, np.float32)
  half = len(table) // 2
  sym = bits >= 2 and np.array_equal(t[::-1], -t)
  if sym:  # low bits XNOR top bit, for every field of the word at once (CSE across fields)
    low = sum(1 << (f + bits - 1) for f in range(0, 32, bits))  # top bit of each field
    flip = ((~v & jnp.uint32(low)) >> (bits - 1)) * jnp.uint32(half - 1)
    v, vals = v ^ flip, [jnp.float32(x) for x in t[half:]]
  else:
    vals = [jnp.float32(x) for x in t]
  for bit in range(bits - 1 if sym else bits):
    on = (v & jnp.uint32(1 << (offset + bit))) != 0
    vals = [jnp.where(on, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
  if sym:
    top = (v & jnp.uint32(1 << (offset + bits - 1))) != 0
    return vals[0] * jnp.where(top, jnp.float32(1), jnp.float32(-1))
  return vals[0]

"""4-bit codebook lookup by byte permutes: two uint32 words of codes -> 16 bfloat16 values, packed
in pairs as the tensor cores read them, in 2.5 instructions per weight, no float arithmetic.

For antisymmetric tables (t[15 - i] = -t[i]: every TurboQuant 4-bit codebook, Lloyd-Max or
"poly"), a code is a sign (its top bit) and an index j into the 8 magnitudes m[j] = t[8 + j]:
j = low 3 bits for positive codes, 7 - low bits (low bits XNOR top bit) for negative ones. The
bf16 bits of the 8 magnitudes are two 8-byte tables (high bytes, low bytes), and PTX `prmt`
picks 4 bytes out of 8 by 3-bit selectors in one instruction: 4 weights per `prmt` and table.

One asm instance takes words wa, wb (the same column, consecutive rows; any two words are
correct, `pack=2` hands it consecutive elements) and returns, for each of the 8 fields s, the
uint32 (bf16(t[wa.s]) | bf16(t[wb.s]) << 16): per pair of words 8 ops of XNOR, 4 `prmt`s that
put the selectors of (wa.s, wa.s+1, wb.s, wb.s+1) side by side, 4 for their sign flags;
per 4 weights 2 table `prmt`s and 2 ops of sign (a `prmt` whose sign replication turns a flag
into a byte mask, and an AND-OR); per field 1 `prmt` that builds the pair: 40 for 16 weights (the
compiled decode loop: 1.6 PRMT per weight, 4.8 SASS instructions per weight in all).

`decode_pairs` is the asm (GPU); `decode_pairs_reference` is the same op sequence in jnp, with
`prmt` as the PTX ISA defines it (default mode: nibble i of the selector picks byte i of d from
the 8 bytes {b, a}; its bit 3 replicates the picked byte's sign bit), for interpret mode and
tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_INTERLEAVE = (0x5140, 0x7362)  # bytes (a0, b0, a1, b1) and (a2, b2, a3, b3) of words a, b
_PAIR = (0x6240, 0x7351)  # (lo byte e, hi byte e, lo byte 2+e, hi byte 2+e) for e = 0, 1
_SELECT = (0x40, 0x51, 0x62, 0x73)  # low 16 bits: byte m of a, byte m of b (fields 2m, 2m + 1)
# sign masks from {g << 4, g}: byte i = 0xFF where the field's flag (bit 3 of its nibble) is set,
# by prmt's sign replication (the flag of a low nibble is bit 7 of g << 4)
_SIGN = (0xD9C8, 0xFBEA)


def antisymmetric4(table) -> bool:
  t = np.asarray(table, np.float32)
  return t.size == 16 and np.array_equal(t[::-1], -t) and bool(np.all(t[8:] > 0))


def constants(table) -> tuple[int, int, int, int]:
  """(TH0, TH1, TL0, TL1): high and low bytes of bf16(m[j]), m[j] = t[8 + j], byte j % 4 of
  word j // 4."""
  mags = np.asarray(table, np.float32)[8:].astype(jnp.bfloat16).view(np.uint16)  # numpy, RNE
  hi, lo = (mags >> 8).astype(np.uint64), (mags & 0xFF).astype(np.uint64)
  word = lambda b, k: int(sum(int(b[4 * k + i]) << (8 * i) for i in range(4)))  # noqa: E731
  return word(hi, 0), word(hi, 1), word(lo, 0), word(lo, 1)


def prmt(a, b, sel):
  """PTX `prmt.b32 d, a, b, sel` (default mode) on uint32 arrays or ints."""
  a, b, sel = (jnp.asarray(v, jnp.uint32) for v in (a, b, sel))
  d = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape, sel.shape), jnp.uint32)
  for i in range(4):
    nib = (sel >> (4 * i)) & 0xF
    k = nib & 7
    byte = jnp.where(k < 4, a >> (8 * (k & 3)), b >> (8 * (k & 3))) & 0xFF
    byte = jnp.where((nib & 8) != 0, jnp.where((byte & 0x80) != 0, 0xFF, 0), byte)
    d = d | (byte.astype(jnp.uint32) << (8 * i))
  return d


def decode_pairs_reference(wa, wb, consts) -> list[jax.Array]:
  """The 8 packed bf16 pairs of `decode_pairs`, computed in jnp by the same operations."""
  th0, th1, tl0, tl1 = consts
  ts, js = [], []
  for w in (wa, wb):
    t = ~w & jnp.uint32(0x88888888)  # negative codes: bit 3 of their nibble
    f = (t >> 3) * jnp.uint32(7)  # flips the low bits of negative codes
    ts.append(t)
    js.append((w ^ f) & jnp.uint32(0x77777777))
  gs = [prmt(ts[0], ts[1], sel) for sel in _INTERLEAVE]  # sign flags, bytes a, b side by side
  out = []
  for m in range(4):
    x = prmt(js[0], js[1], _SELECT[m])  # nibbles (a.s, a.s+1, b.s, b.s+1), s = 2m
    g = gs[m // 2]
    h, lo = prmt(th0, th1, x), prmt(tl0, tl1, x)
    h = h | (prmt(g << 4, g, _SIGN[m % 2]) & jnp.uint32(0x80808080))
    out += [prmt(lo, h, sel) for sel in _PAIR]
  return out


def _asm(consts, field: int) -> str:
  """PTX for one field's pair ($0) from words $1, $2. The 8 fields' asm blocks repeat the XNOR,
  interleave and table steps they share; ptxas, which sees the inlined PTX, computes them once
  (jax 0.11.2's Pallas lowering takes one result per inline asm op)."""
  th0, th1, tl0, tl1 = (f"{c:#x}" for c in consts)
  m, e = divmod(field, 2)
  lines = ["{", ".reg .b32 ta, tb, fa, fb, ja, jb, x, g, g4, h, l, p;"]
  for w, t, f, j in (("$1", "ta", "fa", "ja"), ("$2", "tb", "fb", "jb")):
    lines += [f"not.b32 {t}, {w};", f"and.b32 {t}, {t}, 0x88888888;",
              f"shr.u32 {f}, {t}, 3;", f"mul.lo.u32 {f}, {f}, 7;",
              f"xor.b32 {j}, {w}, {f};", f"and.b32 {j}, {j}, 0x77777777;"]
  lines += [f"prmt.b32 x, ja, jb, {_SELECT[m]:#x};",
            f"prmt.b32 g, ta, tb, {_INTERLEAVE[m // 2]:#x};", "shl.b32 g4, g, 4;",
            f"prmt.b32 h, {th0}, {th1}, x;", f"prmt.b32 l, {tl0}, {tl1}, x;",
            f"prmt.b32 p, g4, g, {_SIGN[m % 2]:#x};", "and.b32 p, p, 0x80808080;",
            "or.b32 h, h, p;", f"prmt.b32 $0, l, h, {_PAIR[e]:#x};", "}"]
  return "\n".join(lines)


def decode_pairs(v: jax.Array, table) -> list[jax.Array]:
  """The 8 fields of uint32 words v [R, C] as bfloat16 [R, C] each (field s: table[(v >> 4s) &
  15]), through the `prmt` asm (Pallas Triton kernels on CUDA only)."""
  from jax.experimental.pallas import triton as pltriton
  consts = constants(table)
  out = jax.ShapeDtypeStruct(v.shape, jnp.bfloat16)
  return [pltriton.elementwise_inline_asm(_asm(consts, s), args=[v], constraints="=r,r,r",
                                          pack=2, result_shape_dtypes=[out])[0]
          for s in range(8)]


def decode_fields_reference(v: jax.Array, table) -> list[jax.Array]:
  """`decode_pairs` in jnp through `decode_pairs_reference` (rows paired 2r, 2r + 1)."""
  pairs = decode_pairs_reference(v[0::2], v[1::2], constants(table))
  out = []
  for p in pairs:
    lo = jax.lax.bitcast_convert_type((p & 0xFFFF).astype(jnp.uint16), jnp.bfloat16)
    hi = jax.lax.bitcast_convert_type((p >> 16).astype(jnp.uint16), jnp.bfloat16)
    out.append(jnp.stack([lo, hi], axis=1).reshape(v.shape))
  return out

"""Decode attention over a TurboQuant KV cache, scored against the codes (no key is dequantized).

Two kernels per part of a head's channels (a part is one TurboQuant instance of n channels):
  tq_scores  s[g, t] = ‖k_t‖ · (⟨q̂_g, c[code_t]⟩ + √(π/2)/n · γ_t · ⟨q̃_g, sign_t⟩)
             with q̂ = Π q (rotated once per query) and q̃ = S q̂ (QJL projection, keys only)
  tq_mix     o[g] = Σ_t p[g, t] · ‖v_t‖ · c[code_t]      (rotated domain; the caller applies Πᵀ)
The softmax between them (masks, soft-cap) is one small XLA op on [B, K, G, S] scores.

Notation: B rows, S cache slots, K KV heads, G queries per KV head (GQA group × query columns),
n channels of the part (a multiple of 32), W packed words per vector.
  q, qp   [B, K, G, n]     float32
  codes   [B, S, K, W]     uint32, lane-major packed (below); signs [B, S, K, n/32] at 1 bit
  norm    [B, S, K]        ‖x‖ per vector (float16 or float32); gamma [B, S, K] ‖residual‖
  probs   [B, K, G, S]     softmax weights
  table   tuple of 2^b floats: the centroid of each code (static)

Lane-major packing (`pack_lanes`): with w0 the widest bit plane (3 bits = a 2-bit plane + a
1-bit plane), L = 32 / w0 lanes and m0 = n / L, channel c = l·m0 + i sits in lane l of base word
i. A plane of width w <= w0 holds (w0 / w) sub-groups of L lanes per word: base word i lives in
word i mod m_w of the plane (m_w = n·w/32) at bit ((i div m_w)·L + l)·w. So one shift and mask per
lane yields the codes of channels l·m0 + [0, m0) for every slot at once, the query is read as
q.reshape(L, m0), and no reshape of packed data happens in the kernel.

`*_reference` compute the same in plain jnp (unpack, gather, einsum) with the same signature.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.codebook_matmul import lookup, planes

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- packing
def lane_count(bits: int) -> int:
  """Lanes L per base word: 32 / (widest bit plane)."""
  return 32 // planes(bits)[0]


def packed_words(n: int, bits: int) -> int:
  """Words W of one n-channel vector at `bits` bits; ValueError unless n is a multiple of 32."""
  if n % 32 or n <= 0:
    raise ValueError(f"a TurboQuant KV part needs a positive multiple of 32 channels, got {n}")
  return n * bits // 32


def _plane_layout(bits: int, n: int):
  """[(plane width w, first word, words m_w, sub-groups w0 / w)] of a part, widest plane first."""
  w0, out, start = planes(bits)[0], [], 0
  for w in planes(bits):
    out.append((w, start, n * w // 32, w0 // w))
    start += n * w // 32
  return out


@functools.partial(jax.jit, static_argnames="bits")
def pack_lanes(codes: jax.Array, bits: int) -> jax.Array:
  """Integer codes [..., n] in [0, 2^bits) -> uint32 words [..., n·bits/32] (lane-major)."""
  n = codes.shape[-1]
  packed_words(n, bits)
  lanes, m0 = lane_count(bits), n // lane_count(bits)
  x = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], lanes, m0)  # [..., L, m0]
  out, shift = [], 0
  for w, _, mw, groups in _plane_layout(bits, n):
    v = ((x >> shift) & ((1 << w) - 1)).reshape(*x.shape[:-1], groups, mw)  # [..., L, h, m_w]
    # bit offset of (lane l, sub-group h): (h·L + l)·w
    offs = (jnp.arange(groups, dtype=jnp.uint32)[None, :] * lanes
            + jnp.arange(lanes, dtype=jnp.uint32)[:, None]) * w  # [L, h]
    out.append(jnp.sum(v << offs[:, :, None], axis=(-3, -2), dtype=jnp.uint32))
    shift += w
  return jnp.concatenate(out, axis=-1)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack_lanes(words: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `pack_lanes`: uint32 words [..., W] -> int32 codes [..., n]."""
  if words.shape[-1] != packed_words(n, bits):
    raise ValueError(f"{words.shape[-1]} words do not hold {n} codes of {bits} bits")
  lanes = lane_count(bits)
  code, shift = jnp.zeros((*words.shape[:-1], lanes, n // lanes), jnp.uint32), 0
  for w, start, mw, groups in _plane_layout(bits, n):
    v = words[..., start:start + mw]  # [..., m_w]
    offs = (jnp.arange(groups, dtype=jnp.uint32)[None, :] * lanes
            + jnp.arange(lanes, dtype=jnp.uint32)[:, None]) * w  # [L, h]
    c = (v[..., None, None, :] >> offs[:, :, None]) & ((1 << w) - 1)  # [..., L, h, m_w]
    code = code | (c.reshape(code.shape) << shift)
    shift += w
  return code.reshape(*words.shape[:-1], n).astype(jnp.int32)


def qjl_scale(n: int) -> float:
  """√(π/2)/n: the QJL inner-product estimator's constant for n sign bits."""
  return math.sqrt(math.pi / 2) / n


# ----------------------------------------------------------------------------- kernel helpers
def _lane_codes(words: dict, layout, lanes: int, lane: int, group: int, m_h: int):
  """int32 codes [bs, m_h] of lane `lane`, base words [group·m_h, (group+1)·m_h)."""
  code, shift = None, 0
  for p, (w, _, mw, _) in enumerate(layout):
    base = group * m_h
    sub = base // mw  # sub-group of this plane holding these base words
    c = ((words[p, (base % mw) // m_h] >> ((sub * lanes + lane) * w)) & ((1 << w) - 1))
    c = c.astype(jnp.int32) << shift
    code = c if code is None else code | c
    shift += w
  return code


def _load_words(ref, b, rows, k, layout, m_h: int):
  """{(plane, chunk): uint32 [bs, m_h]}: every plane's words in chunks of m_h."""
  out = {}
  for p, (_, start, mw, _) in enumerate(layout):
    for c in range(mw // m_h):
      out[p, c] = ref[b, rows, k, pl.ds(start + c * m_h, m_h)]
  return out


def _finest(bits: int, n: int) -> tuple[int, int, int]:
  """(L, groups H, m_h): lanes, chunks of the base words that every plane can address, chunk."""
  layout = _plane_layout(bits, n)
  groups = max(g for _, _, _, g in layout)
  lanes = lane_count(bits)
  return lanes, groups, (n // lanes) // groups


def _check(name, q, codes, norm, bits, table):
  if q.ndim != 4 or codes.ndim != 4 or norm.ndim != 3:
    raise ValueError(f"{name}: expected q/probs [B,K,G,*], codes [B,S,K,W], norm [B,S,K]; got "
                     f"{q.shape}, {codes.shape}, {norm.shape}")
  if codes.dtype != jnp.uint32:
    raise ValueError(f"{name}: codes must be uint32, got {codes.dtype}")
  if len(table) != 2 ** bits:
    raise ValueError(f"{name}: table has {len(table)} entries for {bits} bits")
  b, s, k, _ = codes.shape
  if norm.shape != (b, s, k) or q.shape[:2] != (b, k):
    raise ValueError(f"{name}: shapes disagree: q/probs {q.shape}, codes {codes.shape}, "
                     f"norm {norm.shape}")


def _tiles(g: int, s: int, block_s):
  """Slot tile; NotImplementedError for shapes the Triton kernels do not take."""
  if g > 16 or g & (g - 1):
    raise NotImplementedError(f"G={g} queries per KV head: the kernel takes powers of two <= 16")
  bs = block_s or 64
  while bs > 16 and s % bs:
    bs //= 2
  if s % bs or bs & (bs - 1):
    raise NotImplementedError(f"S={s} slots have no power-of-two tile >= 16")
  return bs


# ----------------------------------------------------------------------------- scores
def _scores_kernel(q_ref, qp_ref, codes_ref, signs_ref, norm_ref, gamma_ref, o_ref, *, bits,
                   table, n, bs, with_qjl):
  b, k, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(j * bs, bs)
  layout = _plane_layout(bits, n)
  lanes, groups, m_h = _finest(bits, n)
  words = _load_words(codes_ref, b, rows, k, layout, m_h)
  acc = None
  for h in range(groups):
    for lane in range(lanes):
      val = lookup(_lane_codes(words, layout, lanes, lane, h, m_h), table, bits)
      qv = q_ref[b, k, :, lane, pl.ds(h * m_h, m_h)]  # [G, m_h]
      part = jnp.sum(qv[:, None, :] * val[None, :, :], axis=-1)  # [G, bs]
      acc = part if acc is None else acc + part
  norm = norm_ref[b, rows, k].astype(jnp.float32)[None, :]  # [1, bs]
  if with_qjl:
    mq = n // 32
    sw = signs_ref[b, rows, k, pl.ds(0, mq)]  # [bs, n/32]
    dot = None
    for lane in range(32):
      sgn = (((sw >> lane) & 1).astype(jnp.float32) * 2 - 1)  # [bs, n/32]
      qv = qp_ref[b, k, :, lane, pl.ds(0, mq)]  # [G, n/32]
      part = jnp.sum(qv[:, None, :] * sgn[None, :, :], axis=-1)
      dot = part if dot is None else dot + part
    gamma = gamma_ref[b, rows, k].astype(jnp.float32)[None, :]
    acc = acc + qjl_scale(n) * gamma * dot
  o_ref[...] = acc * norm


_STATIC = ("bits", "table", "block_s", "splits", "interpret", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=_STATIC)
def tq_scores(q, qp, codes, signs, norm, gamma, *, bits: int, table, block_s=None, splits=None,
              interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """Attention logits of G queries per KV head against one quantized key part. See module doc.

  Args:
    q: [B, K, G, n] rotated queries Π q. qp: [B, K, G, n] S Π q, or None without a QJL stage.
    codes: [B, S, K, n·bits/32]; signs: [B, S, K, n/32] or None; norm, gamma: [B, S, K].
    bits: code width of `codes`; table: 2^bits centroids. splits: unused (mix only).
  Returns:
    [B, K, G, S] float32 (unscaled).
  Raises:
    NotImplementedError when G is not a power of two <= 16 or S has no tile (XLA then runs).
  """
  del splits
  table = tuple(float(t) for t in table)
  _check("tq_scores", q, codes, norm, bits, table)
  bsz, s, kh, _ = codes.shape
  g, n = q.shape[2], q.shape[3]
  packed_words(n, bits)
  bs = _tiles(g, s, block_s)
  lanes = lane_count(bits)
  q5 = q.astype(jnp.float32).reshape(bsz, kh, g, lanes, n // lanes)
  with_qjl = qp is not None
  qp5 = (qp.astype(jnp.float32).reshape(bsz, kh, g, 32, n // 32) if with_qjl
         else jnp.zeros((1, 1, 1, 32, 1), jnp.float32))
  signs = signs if with_qjl else jnp.zeros((1, 1, 1, 1), jnp.uint32)
  gamma = gamma if with_qjl else jnp.zeros((1, 1, 1), jnp.float32)
  kernel = functools.partial(_scores_kernel, bits=bits, table=table, n=n, bs=bs,
                             with_qjl=with_qjl)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((bsz, kh, g, s), jnp.float32),
      grid=(bsz, kh, s // bs), in_specs=[pl.no_block_spec] * 6,
      out_specs=pl.BlockSpec((None, None, g, bs), lambda b, k, j: (b, k, 0, j)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=f"tq_scores_{bits}b")(q5, qp5, codes, signs, norm, gamma)


@functools.partial(jax.jit, static_argnames=_STATIC)
def tq_scores_reference(q, qp, codes, signs, norm, gamma, *, bits: int, table, block_s=None,
                        splits=None, interpret: bool = False, num_warps: int = 4,
                        num_stages: int = 2):
  """`tq_scores` in plain jnp (tile arguments ignored)."""
  del block_s, splits, interpret, num_warps, num_stages
  table = tuple(float(t) for t in table)
  _check("tq_scores", q, codes, norm, bits, table)
  n = q.shape[-1]
  # [B, S, K, n] centroids of the codes (rotated domain, unit norm)
  c = jnp.asarray(table, jnp.float32)[unpack_lanes(codes, bits, n)]
  out = jnp.einsum("bkgc,bskc->bkgs", q.astype(jnp.float32), c, precision=_HIGHEST)
  if qp is not None:
    sgn = unpack_lanes(signs, 1, n).astype(jnp.float32) * 2 - 1
    dot = jnp.einsum("bkgc,bskc->bkgs", qp.astype(jnp.float32), sgn, precision=_HIGHEST)
    out = out + qjl_scale(n) * jnp.transpose(gamma.astype(jnp.float32), (0, 2, 1))[:, :, None] * dot
  return out * jnp.transpose(norm.astype(jnp.float32), (0, 2, 1))[:, :, None]


# ----------------------------------------------------------------------------- mix
def _mix_kernel(p_ref, codes_ref, norm_ref, o_ref, *, bits, table, n, bs, blocks_per_split,
                n_blocks):
  b, k, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layout = _plane_layout(bits, n)
  lanes, groups, m_h = _finest(bits, n)
  g = o_ref.shape[0]
  first = sp * blocks_per_split
  last = jnp.minimum(first + blocks_per_split, n_blocks)

  def body(blk, accs):
    rows = pl.ds(blk * bs, bs)
    # [G, bs] softmax weights times value norms
    pn = p_ref[b, k, :, rows].astype(jnp.float32) * norm_ref[b, rows, k].astype(
        jnp.float32)[None, :]
    words = _load_words(codes_ref, b, rows, k, layout, m_h)
    out = []
    for h in range(groups):
      for lane in range(lanes):
        val = lookup(_lane_codes(words, layout, lanes, lane, h, m_h), table, bits)
        out.append(accs[len(out)] + jnp.sum(pn[:, :, None] * val[None, :, :], axis=1))
    return tuple(out)

  zeros = tuple(jnp.zeros((g, m_h), jnp.float32) for _ in range(groups * lanes))
  accs = jax.lax.fori_loop(first, last, body, zeros)
  for h in range(groups):
    for lane in range(lanes):
      o_ref[:, lane, pl.ds(h * m_h, m_h)] = accs[h * lanes + lane]


@functools.partial(jax.jit, static_argnames=_STATIC)
def tq_mix(probs, codes, norm, *, bits: int, table, block_s=None, splits=None,
           interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """Σ_t probs[..., t] · ‖v_t‖ · c[code_t] over one quantized value part (rotated domain).

  Args:
    probs: [B, K, G, S]; codes: [B, S, K, n·bits/32]; norm: [B, S, K].
    splits: programs per (row, KV head) over S (partial sums added by one XLA reduction);
      default: enough for >= 128 programs.
  Returns:
    [B, K, G, n] float32 (apply Πᵀ to return to the value's basis).
  """
  table = tuple(float(t) for t in table)
  _check("tq_mix", probs, codes, norm, bits, table)
  bsz, s, kh, words = codes.shape
  g = probs.shape[2]
  n = words * 32 // bits
  bs = _tiles(g, s, block_s)
  n_blocks = s // bs
  if splits is None:
    splits = 1
    while splits * 2 <= n_blocks and bsz * kh * splits < 128:
      splits *= 2
  splits = max(1, min(splits, n_blocks))
  per_split = -(-n_blocks // splits)
  lanes = lane_count(bits)
  kernel = functools.partial(_mix_kernel, bits=bits, table=table, n=n, bs=bs,
                             blocks_per_split=per_split, n_blocks=n_blocks)
  parts = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, bsz, kh, g, lanes, n // lanes), jnp.float32),
      grid=(bsz, kh, splits), in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.BlockSpec((None, None, None, g, lanes, n // lanes),
                             lambda b, k, sp: (sp, b, k, 0, 0, 0)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=f"tq_mix_{bits}b")(probs, codes, norm)
  return jnp.sum(parts, axis=0).reshape(bsz, kh, g, n)


@functools.partial(jax.jit, static_argnames=_STATIC)
def tq_mix_reference(probs, codes, norm, *, bits: int, table, block_s=None, splits=None,
                     interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """`tq_mix` in plain jnp (tile arguments ignored)."""
  del block_s, splits, interpret, num_warps, num_stages
  table = tuple(float(t) for t in table)
  _check("tq_mix", probs, codes, norm, bits, table)
  n = codes.shape[-1] * 32 // bits
  c = jnp.asarray(table, jnp.float32)[unpack_lanes(codes, bits, n)]  # [B, S, K, n]
  w = probs.astype(jnp.float32) * jnp.transpose(norm.astype(jnp.float32), (0, 2, 1))[:, :, None]
  return jnp.einsum("bkgs,bskc->bkgc", w, c, precision=_HIGHEST)


def bytes_read(s: int, n: int, key_bits: int, value_bits: int, norm_itemsize: int = 2) -> int:
  """HBM bytes of one decode step's cache reads per (row, KV head) for one part: key codes and
  signs, value codes, norms (TurboQuant_prod keys: key_bits - 1 code bits + 1 sign bit)."""
  return s * (n * (key_bits + value_bits) // 8 + 3 * norm_itemsize)

"""Memory-efficient attention over float keys/values: blockwise online softmax (flash attention).

The score matrix is never materialized: queries are taken in blocks, keys in blocks, and each
query block keeps a running maximum m, normalizer (sum of weights) and weighted sum acc while
it walks the key blocks, so memory is linear in the context. Masks come from positions alone (as
in the model's dense attention): key s is visible to query t iff k_pos[s] >= 0 and
0 <= q_pos[t] - k_pos[s] (< window). A key block that no query of the block can see (by the
interval of its valid positions) is skipped, so causal prefill does about half the work and a
sliding-window layer only the blocks inside its window, whatever the order of the keys (ring
buffers included).

Notation: B rows, T queries, S keys, K KV heads, G query heads per KV head, H head size.
  q      [B, T, K, G, H]    any float dtype
  k, v   [B, S, K, H]
  q_pos  [B, T] int32 (< 0: padding, attends to nothing and gets 0)
  k_pos  [B, S] int32 (< 0: never attended)
  out    [B, T, K, G, H]    float32
Scores are softcap(q·k · scale) in float32; probabilities are cast to v's dtype before they
weight the values (as the dense path does), accumulation is float32.

Three implementations, one signature:
  flash_attention            the Pallas (Triton) forward kernel; grid (B, K, row blocks) where a
                             row is one (query, head of the group) pair, so the G heads that share
                             a KV head read each key block once.
  flash_attention_reference  the same algorithm in plain jnp (`lax.map` over query blocks,
                             `lax.scan` over key blocks): the XLA path, CPU's memory-efficient
                             attention.
Both are differentiable with a blockwise backward pass (recomputing probabilities from the
saved log-sum-exp, FlashAttention-2 style), so training memory is linear in the context too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Finite so that fully masked rows stay NaN-free (the model's dense attention uses the same).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_BIG = 2 ** 30  # larger than any position

_STATIC = ("scale", "window", "cap", "block_q", "block_k", "block_rows", "block_keys",
           "interpret", "num_warps", "num_stages")


def _check(q, k, v, q_pos, k_pos):
  if q.ndim != 5 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"flash_attention: expected q [B,T,K,G,H] and k, v [B,S,K,H]; got q "
                     f"{q.shape}, k {k.shape}, v {v.shape}")
  b, t, kh, _, h = q.shape
  if k.shape[0] != b or k.shape[2:] != (kh, h):
    raise ValueError(f"flash_attention: q {q.shape} and k {k.shape} disagree on B, K or H")
  if q_pos.shape != (b, t) or k_pos.shape != k.shape[:2]:
    raise ValueError(f"flash_attention: positions q_pos {q_pos.shape} / k_pos {k_pos.shape} do "
                     f"not match q {q.shape} / k {k.shape}")


def _pad_axis(x, axis: int, multiple: int, value=0):
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _softcap(s, cap):
  return s if cap is None else cap * jnp.tanh(s / cap)


def _visible(qp, kp, window):
  """qp [..., T, 1], kp [..., 1, S] -> bool mask."""
  delta = qp - kp
  mask = (kp >= 0) & (delta >= 0)
  if window is not None:
    mask &= delta < window
  return mask


def _interval(pos):
  """(min, max) of the valid (>= 0) positions; (BIG, -1) when there are none."""
  valid = pos >= 0
  return (jnp.min(jnp.where(valid, pos, _BIG)), jnp.max(jnp.where(valid, pos, -1)))


def _may_see(q_lo, q_hi, k_lo, k_hi, window):
  """Whether some query in [q_lo, q_hi] may see some key in [k_lo, k_hi] (conservative)."""
  live = (k_lo <= q_hi) & (q_lo <= q_hi) & (k_lo <= k_hi)
  if window is not None:
    live &= q_lo - k_hi < window
  return live


# ----------------------------------------------------------------------------- jnp blocks
# Blocks are sliced in place (no padded or transposed copy of K/V): block j starts at
# min(j·blk, N - blk), so the last block may overlap the one before it. Keys of an overlap are
# masked (position -1) so each key counts once; queries of an overlap are computed twice and
# written twice with the same values (the backward pass masks them instead, as it adds).
def _starts(n: int, blk: int) -> jax.Array:
  """[ceil(n / blk)] int32 block starts, the last one clamped to n - blk."""
  return jnp.minimum(jnp.arange(-(-n // blk), dtype=jnp.int32) * blk, n - blk)


def _block(x, start, blk):
  return lax.dynamic_slice_in_dim(x, start, blk, axis=1)


def _fresh(pos, j, start, blk):
  """Positions of block j with the slots an earlier block already covered set to -1."""
  first = j * blk - start  # slots before this are the previous block's
  return jnp.where(jnp.arange(blk) >= first, pos, -1)


def _scores(qi, kj, qpi, kpj, scale, window, cap):
  """Block logits [B, K, G, bq, bk] float32 after soft-capping, and the mask [B, 1, 1, bq, bk]."""
  raw = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  mask = _visible(qpi[:, None, None, :, None], kpj[:, None, None, None, :], window)
  return _softcap(raw, cap), mask


def _key_intervals(k_pos, bk):
  """Per key block: its start, and the (min, max) of its fresh valid positions."""
  starts = _starts(k_pos.shape[1], bk)
  fresh = jax.vmap(lambda j, st: _fresh(_block(k_pos, st, bk), j, st, bk))(
      jnp.arange(starts.shape[0]), starts)
  lo, hi = jax.vmap(_interval)(fresh)
  return starts, lo, hi


def _forward_blocks(q, k, v, q_pos, k_pos, scale, window, cap, bq, bk):
  """Blockwise forward in jnp. Returns out [B, T, K, G, H] float32, lse [B, T, K, G] float32
  (0 for rows that see nothing)."""
  b, t, kh, g, h = q.shape
  k_starts, k_lo, k_hi = _key_intervals(k_pos, bk)

  def query_block(i, outs):
    out_all, lse_all = outs
    qs = jnp.minimum(i * bq, t - bq)
    qi, qpi = _block(q, qs, bq), _block(q_pos, qs, bq)
    q_lo, q_hi = _interval(qpi)

    def step(carry, xs):
      j, ks, lo, hi = xs

      def update(carry):
        m, norm, acc = carry
        kpj = _fresh(_block(k_pos, ks, bk), j, ks, bk)
        vj = _block(v, ks, bk)
        s, mask = _scores(qi, _block(k, ks, bk), qpi, kpj, scale, window, cap)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        # [B, K, G, bq, H]
        pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(vj.dtype), vj,
                        preferred_element_type=jnp.float32)
        return m_new, norm * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

      return lax.cond(_may_see(q_lo, q_hi, lo, hi, window), update, lambda c: c, carry), None

    init = (jnp.full((b, kh, g, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32), jnp.zeros((b, kh, g, bq, h), jnp.float32))
    js = jnp.arange(k_starts.shape[0])
    (m, norm, acc), _ = lax.scan(step, init, (js, k_starts, k_lo, k_hi))
    seen = norm > 0
    safe = jnp.where(seen, norm, 1.0)
    out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(safe), 0.0)
    # [B, bq, K, G, H], [B, bq, K, G] written at the block's rows
    out_all = lax.dynamic_update_slice_in_dim(out_all, jnp.einsum("bkgqh->bqkgh", out), qs, 1)
    lse_all = lax.dynamic_update_slice_in_dim(lse_all, jnp.einsum("bkgq->bqkg", lse), qs, 1)
    return out_all, lse_all

  outs = (jnp.zeros((b, t, kh, g, h), jnp.float32), jnp.zeros((b, t, kh, g), jnp.float32))
  return lax.fori_loop(0, -(-t // bq), query_block, outs)


def _backward_blocks(q, k, v, q_pos, k_pos, out, lse, dout, scale, window, cap, bq, bk):
  """Blockwise gradients (dq, dk, dv) from the saved output and log-sum-exp: for each key block,
  a scan over the query blocks that can see it recomputes the probabilities."""
  t = q.shape[1]
  # [B, T, K, G] rowwise Σ dout·out
  delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)
  k_starts, k_lo, k_hi = _key_intervals(k_pos, bk)
  q_starts = _starts(t, bq)
  # each query row once: rows an earlier block covered get position -1 in the clamped block
  q_fresh = jax.vmap(lambda i, st: _fresh(_block(q_pos, st, bq), i, st, bq))(
      jnp.arange(q_starts.shape[0]), q_starts)
  q_lo, q_hi = jax.vmap(_interval)(q_fresh)

  def key_block(carry, xs):
    dq, dk_all, dv_all = carry
    j, ks, lo, hi = xs
    kj, vj = _block(k, ks, bk), _block(v, ks, bk)
    kpj = _fresh(_block(k_pos, ks, bk), j, ks, bk)

    def query_block(carry, ys):
      qs, qpi, qlo, qhi = ys

      def grads(carry):
        dq, dk, dv = carry
        qi, doi = _block(q, qs, bq), _block(dout, qs, bq)
        # [B, K, G, bq]
        lsei = jnp.einsum("bqkg->bkgq", _block(lse, qs, bq))
        di = jnp.einsum("bqkg->bkgq", _block(delta, qs, bq))
        sc, mask = _scores(qi, kj, qpi, kpj, scale, window, cap)
        # [B, K, G, bq, bk]
        p = jnp.where(mask, jnp.exp(sc - lsei[..., None]), 0.0)
        dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(vj.dtype), doi,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - di[..., None])
        if cap is not None:
          ds = ds * (1.0 - jnp.square(sc / cap))
        ds = ds * scale
        dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, qi, preferred_element_type=jnp.float32)
        dqi = jnp.einsum("bkgqs,bskh->bqkgh", ds, kj, preferred_element_type=jnp.float32)
        dq = lax.dynamic_update_slice_in_dim(dq, _block(dq, qs, bq) + dqi, qs, 1)
        return dq, dk, dv

      return lax.cond(_may_see(qlo, qhi, lo, hi, window), grads, lambda c: c, carry), None

    zeros = jnp.zeros(kj.shape, jnp.float32)
    (dq, dk, dv), _ = lax.scan(query_block, (dq, zeros, zeros), (q_starts, q_fresh, q_lo, q_hi))
    # masked (already covered) keys of a clamped block add 0
    dk_all = lax.dynamic_update_slice_in_dim(dk_all, _block(dk_all, ks, bk) + dk, ks, 1)
    dv_all = lax.dynamic_update_slice_in_dim(dv_all, _block(dv_all, ks, bk) + dv, ks, 1)
    return (dq, dk_all, dv_all), None

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
          jnp.zeros(v.shape, jnp.float32))
  js = jnp.arange(k_starts.shape[0])
  (dq, dk, dv), _ = lax.scan(key_block, init, (js, k_starts, k_lo, k_hi))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.lru_cache(maxsize=256)
def _differentiable(kernel: tuple | None, scale, window, cap, bq, bk):
  """A custom-VJP attention whose forward is the Pallas kernel (`kernel`: its static arguments
  as sorted (name, value) pairs) or, with kernel None, the jnp blocks; returns (out, lse). The
  backward is the blockwise jnp pass."""
  if kernel is None:
    forward = functools.partial(_forward_blocks, scale=scale, window=window, cap=cap, bq=bq,
                                bk=bk)
  else:
    forward = functools.partial(_kernel_forward, scale=scale, window=window, cap=cap,
                                **dict(kernel))

  @jax.custom_vjp
  def attention(q, k, v, q_pos, k_pos):
    return forward(q, k, v, q_pos, k_pos)[0]

  def fwd(q, k, v, q_pos, k_pos):
    out, lse = forward(q, k, v, q_pos, k_pos)
    return out, (q, k, v, q_pos, k_pos, out, lse)

  def bwd(res, dout):
    q, k, v, q_pos, k_pos, out, lse = res
    dq, dk, dv = _backward_blocks(q, k, v, q_pos, k_pos, out, lse, dout, scale, window, cap,
                                  bq, bk)
    return dq, dk, dv, None, None

  attention.defvjp(fwd, bwd)
  return attention


def _block_sizes(t, s, block_q, block_k):
  bq = min(block_q or 512, t)
  bk = min(block_k or 512, s)
  return bq, bk


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_attention_reference(q, k, v, q_pos, k_pos, *, scale: float, window: int | None = None,
                              cap: float | None = None, block_q: int | None = None,
                              block_k: int | None = None, block_rows=None, block_keys=None,
                              interpret: bool = False, num_warps=None, num_stages: int = 2):
  """`flash_attention` in plain jnp: the XLA path (kernel tile arguments ignored).

  block_q, block_k: queries and keys per block (default 512, at most T and S).
  """
  del block_rows, block_keys, interpret, num_warps, num_stages
  _check(q, k, v, q_pos, k_pos)
  bq, bk = _block_sizes(q.shape[1], k.shape[1], block_q, block_k)
  return _differentiable(None, scale, window, cap, bq, bk)(
      q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32))


# ----------------------------------------------------------------------------- Pallas kernel
def _forward_kernel(q_ref, qpos_ref, k_ref, v_ref, kpos_ref, o_ref, lse_ref, *, scale, window,
                    cap, bk, n_kblocks, s):
  """One (row, KV head, block of M rows): walks every key block (the last one clamped to end at
  S, its already covered keys masked), skipping invisible ones."""
  b, kh = pl.program_id(0), pl.program_id(1)
  q = q_ref[...]  # [M, H]
  qp = qpos_ref[...]  # [M]
  q_lo, q_hi = _interval(qp)
  m_rows = q.shape[0]

  def body(j, carry):
    start = jnp.minimum(j * bk, s - bk)
    keys = pl.ds(start, bk)
    kp = _fresh(kpos_ref[b, keys], j, start, bk)  # [bk]
    k_lo, k_hi = _interval(kp)

    def update(carry):
      m, norm, acc = carry
      kj = k_ref[b, keys, kh, :]  # [bk, H]
      vj = v_ref[b, keys, kh, :]
      s = jnp.dot(q, kj.T, preferred_element_type=jnp.float32)  # [M, bk]
      s = _softcap(s * scale, cap)
      mask = _visible(qp[:, None], kp[None, :], window)
      s = jnp.where(mask, s, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.dot(p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)  # [M, H]
      return m_new, norm * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    return lax.cond(_may_see(q_lo, q_hi, k_lo, k_hi, window), update, lambda c: c, carry)

  init = (jnp.full((m_rows,), MASK_VALUE, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, norm, acc = lax.fori_loop(0, n_kblocks, body, init)
  seen = norm > 0
  safe_l = jnp.where(seen, norm, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


def _kernel_tiles(s, h, block_rows, block_keys):
  """(M, bk): power-of-two row and key tiles >= 16 (smaller for H = 512: the accumulator lives in
  registers); NotImplementedError for head sizes the kernel does not take."""
  if h % 16 or h & (h - 1) or h > 512:
    raise NotImplementedError(f"head size {h}: the kernel takes powers of two in [16, 512]")
  m = block_rows or (32 if h >= 512 else 64)
  bk = block_keys or (32 if h >= 512 else 64)
  for name, x in (("block_rows", m), ("block_keys", bk)):
    if x < 16 or x & (x - 1):
      raise NotImplementedError(f"{name}={x}: the kernel takes powers of two >= 16")
  while bk > 16 and bk > s:
    bk //= 2
  if s < bk:
    raise NotImplementedError(f"S={s} keys: the kernel needs at least {bk}")
  return m, bk


def _kernel_forward(q, k, v, q_pos, k_pos, *, scale, window, cap, block_rows, block_keys,
                    interpret, num_warps, num_stages):
  """(out [B, T, K, G, H] float32, lse [B, T, K, G]) from the Pallas kernel; block_rows and
  block_keys are `_kernel_tiles`' resolved tiles."""
  b, t, kh, g, h = q.shape
  m, bk = block_rows, block_keys
  # rows r = t·G + g of one KV head: [B, K, T·G, H]; each row's query position
  rows = jnp.einsum("btkgh->bktgh", q).reshape(b, kh, t * g, h)
  row_pos = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)  # [B, T·G]
  rows, row_pos = _pad_axis(rows, 2, m), _pad_axis(row_pos, 1, m, -1)
  s = k.shape[1]
  n_rows, n_kblocks = rows.shape[2], -(-s // bk)
  kernel = functools.partial(_forward_kernel, scale=scale, window=window, cap=cap, bk=bk,
                             n_kblocks=n_kblocks, s=s)
  out, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, kh, n_rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, n_rows), jnp.float32)),
      grid=(b, kh, n_rows // m),
      in_specs=[pl.BlockSpec((None, None, m, h), lambda i, j, r: (i, j, r, 0)),
                pl.BlockSpec((None, m), lambda i, j, r: (i, r)),
                pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
      out_specs=(pl.BlockSpec((None, None, m, h), lambda i, j, r: (i, j, r, 0)),
                 pl.BlockSpec((None, None, m), lambda i, j, r: (i, j, r))),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or (8 if h >= 512 else 4),
                                              num_stages=num_stages),
      interpret=interpret, name="flash_attention")(rows, row_pos, k, v,
                                                     k_pos.astype(jnp.int32))
  out = jnp.einsum("bktgh->btkgh", out[:, :, :t * g].reshape(b, kh, t, g, h))
  lse = jnp.einsum("bktg->btkg", lse[:, :, :t * g].reshape(b, kh, t, g))
  return out, lse


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_attention(q, k, v, q_pos, k_pos, *, scale: float, window: int | None = None,
                    cap: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, block_rows: int | None = None,
                    block_keys: int | None = None, interpret: bool = False,
                    num_warps: int | None = None, num_stages: int = 2):
  """Masked, soft-capped grouped-query attention without the [T, S] score matrix.

  Args:
    q: [B, T, K, G, H]; k, v: [B, S, K, H]; q_pos [B, T], k_pos [B, S] int (see module doc).
    scale: multiplier of q·k; window: sliding window including self, or None; cap: logit
      soft-cap, or None.
    block_q, block_k: the backward pass's (jnp) blocks. block_rows, block_keys: the kernel's
      tiles ((query, head) rows and keys; default 64, 32 for H = 512).
  Returns:
    [B, T, K, G, H] float32.
  Raises:
    NotImplementedError for head sizes or tiles the kernel does not take (dispatch then runs
    `flash_attention_reference`).
  """
  _check(q, k, v, q_pos, k_pos)
  block_rows, block_keys = _kernel_tiles(k.shape[1], q.shape[-1], block_rows, block_keys)
  bq, bk = _block_sizes(q.shape[1], k.shape[1], block_q, block_k)
  kernel = tuple(sorted(dict(block_rows=block_rows, block_keys=block_keys, interpret=interpret,
                           num_warps=num_warps, num_stages=num_stages).items()))
  return _differentiable(kernel, scale, window, cap, bq, bk)(
      q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32))

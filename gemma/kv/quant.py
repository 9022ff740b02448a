"""TurboQuant KV cache: keys with TurboQuant_prod (unbiased scores), values with TurboQuant_mse.

Each key/value head vector [H] is split into parts; each part is its own TurboQuant instance of
n = H / parts channels with one norm per vector (float16), a Haar rotation Π [n, n] and, for keys,
a QJL projection S [n, n] with orthogonal rows (`qjl_projection`; shared by all layers with that
n: `Codec`).
  keys:   code = Q_{b-1}(Π k/‖k‖), γ = ‖r‖ of the residual r = Π k/‖k‖ - c[code], signs = sign(S r)
          (S Πᵀ has the law of S, so this is Algorithm 2 of the paper in the rotated basis).
  values: code = Q_b(Π v/‖v‖).
Widths: tq2, tq3, tq4 quantize every channel at b bits. The fractional widths split each head's
channels into halves: the outlier half (the H/2 channels with the largest mean square over the
first call's valid tokens, per row and KV head, chosen separately for keys and values and then
fixed: `choose_outliers`) at one bit more: tq2.5 = 3 + 2 bits, tq3.5 = 4 + 3 bits. (The paper's
2.5-bit setup uses 32 of 128 channels at 3 bits; equal halves keep every part a power of two and
give exactly the nominal code bits.) Sign bits count in the key width: prod at b bits = b - 1 code
bits + 1 sign bit per channel.

Fixed per row and KV head at the first call (like the outliers), before quantizing: keys and
values are centered (the mean μ is subtracted; ⟨q, μ_k⟩ is added back to every score and μ_v to
the output, exact because softmax weights sum to 1), and keys are scaled per channel by w with
w² = rms(q)/rms(k) while queries are divided by w (scores unchanged; `query_scale`). Gemma keys
carry a large common component and loud channels the queries hardly read; both steps stop them
from taking the bits (measured in docs/BENCHMARKS.md).

Optionally (`sink`, `recent`; names "tqX+sN+rM"), positions < N and the newest M tokens are also
kept in bfloat16 and attended exactly (StreamingLLM's attention sink and KIVI's/QJL's recent
buffer); every key is read from exactly one copy (`QuantView.visible`). Every token is still
quantized when it arrives, so the codes serve it once it is M positions old.

Attention never rebuilds a key: the query is permuted, rotated (q̂ = Π q) and projected (S q̂)
once, and scored against the codes (`QuantView.scores`); values are mixed in the rotated basis and
rotated back once per query (`QuantView.mix`). Both go through `pallas_kernels.registry`
("tq_scores", "tq_mix"): the Pallas kernels on a GPU, plain jnp elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma.kv.view import (
    FloatKV,
    FloatView,
    attend_query_blocks,
    causal_mask,
    drop_stale,
    update_float,
)
from gemma.model.params import pytree_dataclass
from gemma.quant import codebook
from gemma.quant.rotation import gaussian_np, haar_np
from pallas_kernels import registry
from pallas_kernels.tq_attention import pack_lanes, packed_words, qjl_scale, unpack_lanes

_HI = jax.lax.Precision.HIGHEST
NORM_DTYPE = jnp.float16
EXACT_DTYPE = jnp.bfloat16  # the recent window's and sink's K/V (as in a bf16 cache)
_F16_MAX = float(jnp.finfo(jnp.float16).max)


@dataclasses.dataclass(frozen=True)
class KVQuant:
  """A KV-cache width: bits per channel of each part (outlier part first)."""

  name: str
  key_bits: tuple[int, ...]  # TurboQuant_prod bits (b - 1 code bits + 1 sign bit)
  value_bits: tuple[int, ...]  # TurboQuant_mse bits
  seed: int = 0
  center: bool = True  # subtract a per-(row, KV head) mean vector before quantizing
  key_method: str = "prod"  # "prod" (TurboQuant_prod) or "mse" (ablation: biased, lower variance)
  query_scaling: bool = True  # store k ⊙ w and score q ⊘ w, w² = rms(q) / rms(k) per channel
  qjl_rows: str = "orthogonal"  # S of the QJL stage: "orthogonal" (√n·Haar) or "gaussian"
  recent: int = 0  # also keep the newest `recent` tokens in bfloat16 and attend to those exactly
  sink: int = 0  # also keep positions < `sink` (the attention sink, BOS) in bfloat16

  def __post_init__(self):
    if self.recent < 0 or self.sink < 0:
      raise ValueError(f"recent window and sink must be >= 0 tokens, got {self.recent}, "
                       f"{self.sink}")
    if self.key_method not in ("prod", "mse"):
      raise ValueError(f"key_method must be 'prod' or 'mse', got {self.key_method!r}")
    if self.qjl_rows not in ("orthogonal", "gaussian"):
      raise ValueError(f"qjl_rows must be 'orthogonal' or 'gaussian', got {self.qjl_rows!r}")

  @property
  def key_qjl(self) -> bool:
    return self.key_method == "prod"

  def key_code_bits(self, bits: int) -> int:
    """Codebook bits of a key part of `bits` bits (prod spends one on the QJL sign)."""
    return bits - 1 if self.key_qjl else bits

  @property
  def parts(self) -> int:
    return len(self.key_bits)

  @property
  def bits(self) -> float:
    """Mean code bits per channel of keys and values (norms excluded)."""
    return (sum(self.key_bits) + sum(self.value_bits)) / (2 * self.parts)


KV_QUANTS = {
    "tq2": KVQuant("tq2", (2,), (2,)),
    "tq2.5": KVQuant("tq2.5", (3, 2), (3, 2)),
    "tq3": KVQuant("tq3", (3,), (3,)),
    "tq3.5": KVQuant("tq3.5", (4, 3), (4, 3)),
    "tq4": KVQuant("tq4", (4,), (4,)),
}
WIDTHS = tuple(KV_QUANTS)  # the widths; the ablations below add suffixes
# Ablations: keys with TurboQuant_mse at the same widths (biased scores, lower variance), and the
# paper's scheme as written (no centering, no query scaling, Gaussian QJL rows).
_BASE = dict(KV_QUANTS)
KV_QUANTS.update({f"{k}-mse": dataclasses.replace(v, name=f"{k}-mse", key_method="mse")
                  for k, v in _BASE.items()})
KV_QUANTS.update({f"{k}-paper": dataclasses.replace(v, name=f"{k}-paper", center=False,
                                                    query_scaling=False, qjl_rows="gaussian")
                  for k, v in _BASE.items()})
FLOAT_CACHES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
CHOICES = (*FLOAT_CACHES, *KV_QUANTS)  # the values of --kv-quant


# Suffixes of a TurboQuant width: "+rN" keeps the newest N tokens also in bfloat16 (`recent`),
# "+sN" positions < N (the attention sink; `sink`): "tq3.5+s1+r128".
EXACT_SUFFIXES = {"r": "recent", "s": "sink"}


def get_kv_quant(name: str | KVQuant) -> KVQuant:
  """A TurboQuant width by name: one of KV_QUANTS, optionally with "+sN" (positions < N kept in
  bfloat16) and "+rN" (the newest N tokens kept in bfloat16); ValueError naming the problem."""
  if isinstance(name, KVQuant):
    return name
  base, *extras = name.split("+")
  if base not in KV_QUANTS:
    raise ValueError(f"unknown KV-cache quantization {name!r}; valid: {', '.join(CHOICES)}; "
                     "a TurboQuant width may add +sN (positions < N also kept in bfloat16: the "
                     "attention sink) and +rN (the newest N tokens too), e.g. tq3.5+s1+r128")
  fields = {}
  for extra in extras:
    key, count = EXACT_SUFFIXES.get(extra[:1]), extra[1:]
    if key is None or key in fields or not count.isdigit() or int(count) < 1:
      raise ValueError(f"{name!r}: after the width, each of +sN (sink) and +rN (recent window) "
                       f"may appear once with N a positive number of tokens; got '+{extra}'")
    fields[key] = int(count)
  return dataclasses.replace(KV_QUANTS[base], name=name, **fields) if fields else KV_QUANTS[base]


def parse_kv_cache(name: str) -> str:
  """argparse `type` of --kv-quant: a float cache or a valid TurboQuant width name."""
  if name not in FLOAT_CACHES:
    try:
      get_kv_quant(name)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return name


@functools.lru_cache(maxsize=64)
def centroids(bits: int, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(centroids, boundaries) of the Lloyd-Max codebook for coordinates of unit vectors in R^n."""
  c, b = codebook.sphere_codebook(bits, n, "beta")
  return tuple(float(x) for x in c), tuple(float(x) for x in b)


def part_dims(spec: KVQuant, head_dim: int, layer: int | None = None) -> int:
  """Channels n of each part of a head of `head_dim`; ValueError when it cannot be packed."""
  n = head_dim // spec.parts
  if head_dim % spec.parts or n % 32:
    where = "" if layer is None else f" (layer {layer})"
    raise ValueError(f"--kv-quant {spec.name} needs head_dim divisible by {32 * spec.parts}; "
                     f"head_dim is {head_dim}{where}")
  return n


# ----------------------------------------------------------------------------- codec
@pytree_dataclass
class Codec:
  """Rotations and projections shared by every layer, one set per part size n (in `dims`)."""

  spec: KVQuant = dataclasses.field(metadata=dict(static=True))
  dims: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  key_rot: tuple[jax.Array, ...]  # Π [n, n] per dim
  key_proj: tuple[jax.Array, ...]  # S [n, n] per dim, i.i.d. N(0, 1)
  value_rot: tuple[jax.Array, ...]  # Π [n, n] per dim

  def mats(self, n: int):
    i = self.dims.index(n)
    return self.key_rot[i], self.key_proj[i], self.value_rot[i]


def qjl_projection(spec: KVQuant, n: int) -> np.ndarray:
  """S [n, n] of the QJL stage, scaled so that √(π/2)/n · ⟨S y, sign(S r)⟩ is unbiased for ⟨y, r̂⟩.

  "gaussian": i.i.d. N(0, 1) (Algorithm 2 as written). "orthogonal": √n·Haar, rows orthogonal
  (the QJL paper's variant, which it found "almost always improves" results; on Gemma 3 270M it
  cuts the tq3.5 perplexity loss about threefold). A row uniform on the sphere of radius √n gives
  E sign(s·r)(s·y) = √n·E|u₁|·⟨r̂, y⟩ with E|u₁| = Γ(n/2) / (√π Γ((n+1)/2)) instead of the
  Gaussian √(2/π); the ratio is folded into S (signs are unchanged), so the kernels keep √(π/2)/n.
  """
  seed = 1_000_003 * spec.seed + n
  if spec.qjl_rows == "gaussian":
    return gaussian_np(seed, n)
  e_abs = math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(math.pi)
  return haar_np(seed + 7, n) / (e_abs * math.sqrt(math.pi / 2))


def make_codec(spec: KVQuant, dims) -> Codec:
  dims = tuple(sorted(set(dims)))
  seed = 1_000_003 * spec.seed
  as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return Codec(spec=spec, dims=dims,
               key_rot=tuple(as32(haar_np(seed + 2 * n, n)) for n in dims),
               key_proj=tuple(as32(qjl_projection(spec, n)) for n in dims),
               value_rot=tuple(as32(haar_np(seed + 2 * n + 1, n)) for n in dims))


# ----------------------------------------------------------------------------- stored form
@pytree_dataclass
class PartCodes:
  """One part of quantized vectors: [B, S, K, ...] (S = slots)."""

  codes: jax.Array  # [B, S, K, n·b/32] uint32, lane-major packed
  norm: jax.Array  # [B, S, K] float16 ‖x_part‖
  signs: jax.Array | None = None  # [B, S, K, n/32] uint32 QJL signs (keys)
  gamma: jax.Array | None = None  # [B, S, K] float16 ‖residual‖ (keys)


@pytree_dataclass
class QuantLayerCache:
  k: tuple[PartCodes, ...]
  v: tuple[PartCodes, ...]
  pos: jax.Array  # [B, S] int32 absolute position per slot, -1 if none
  k_perm: jax.Array | None = None  # [B, K, H] int32 channel order (outliers first); None: 1 part
  v_perm: jax.Array | None = None
  k_mean: jax.Array | None = None  # [B, K, H] float32 subtracted before quantizing; None: off
  v_mean: jax.Array | None = None
  k_scale: jax.Array | None = None  # [B, K, H] float32 w: keys are stored as k ⊙ w; None: off
  recent: FloatKV | None = None  # the newest spec.recent tokens in bfloat16 (a ring); None: off
  sink: FloatKV | None = None  # positions < spec.sink in bfloat16 (slot = position); None: off


def _zeros_part(b, s, k, n, bits, qjl) -> PartCodes:
  codes = jnp.zeros((b, s, k, packed_words(n, bits)), jnp.uint32)
  norm = jnp.zeros((b, s, k), NORM_DTYPE)
  if not qjl:
    return PartCodes(codes, norm)
  return PartCodes(codes, norm, jnp.zeros((b, s, k, n // 32), jnp.uint32),
                   jnp.zeros((b, s, k), NORM_DTYPE))


def init_layer(spec: KVQuant, batch: int, slots: int, kv_heads: int, head_dim: int,
               layer: int | None = None, slack: int = 0) -> QuantLayerCache:
  """An empty layer of `slots` slots; the recent window gets `slack` extra slots (for columns a
  speculative step writes and rolls back: `gemma.kv.cache.rollback`)."""
  n = part_dims(spec, head_dim, layer)
  k = tuple(_zeros_part(batch, slots, kv_heads, n, spec.key_code_bits(b), spec.key_qjl)
            for b in spec.key_bits)
  v = tuple(_zeros_part(batch, slots, kv_heads, n, b, False) for b in spec.value_bits)
  # fresh arrays per field: a donated cache may not hold one buffer twice
  shape = (batch, kv_heads, head_dim)
  perm = lambda: (jnp.broadcast_to(jnp.arange(head_dim, dtype=jnp.int32), shape) + 0  # noqa: E731
                  if spec.parts > 1 else None)
  mean = lambda: jnp.zeros(shape, jnp.float32) if spec.center else None  # noqa: E731
  def exact(n):  # a bfloat16 buffer of n slots
    shape = (batch, n, kv_heads, head_dim)
    return FloatKV(k=jnp.zeros(shape, EXACT_DTYPE), v=jnp.zeros(shape, EXACT_DTYPE),
                   pos=jnp.full(shape[:2], -1, jnp.int32)) if n else None

  return QuantLayerCache(k=k, v=v, pos=jnp.full((batch, slots), -1, jnp.int32), k_perm=perm(),
                         v_perm=perm(), k_mean=mean(), v_mean=mean(),
                         k_scale=jnp.ones(shape, jnp.float32) if spec.query_scaling else None,
                         recent=exact(min(spec.recent + slack, slots) if spec.recent else 0),
                         sink=exact(spec.sink))


# ----------------------------------------------------------------------------- quantize
def token_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean over valid tokens. x: [B, T, K, H]; valid: [B, T] bool -> [B, K, H] float32."""
  w = valid.astype(jnp.float32)
  total = jnp.einsum("btkh,bt->bkh", x.astype(jnp.float32), w)
  return total / jnp.maximum(jnp.sum(w, axis=1), 1)[:, None, None]


def query_scale(q: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
  """Per-channel w with w² = rms(q_c) / rms(k_c) (over valid tokens and the GQA group).

  Scores are unchanged (⟨q ⊘ w, k ⊙ w⟩ = ⟨q, k⟩), but an isotropic error on k ⊙ w costs
  (Σ_c |q_c| |k_c|)² instead of ‖q‖² ‖k‖² in score variance: channels the queries ignore stop
  taking bits from the ones they read. q: [B, T, K, G, H]; k: [B, T, K, H] -> [B, K, H] float32.
  """
  rq = jnp.sqrt(jnp.mean(jax.vmap(token_mean, (3, None))(jnp.square(q.astype(jnp.float32)),
                                                         valid), axis=0))
  rk = jnp.sqrt(token_mean(jnp.square(k.astype(jnp.float32)), valid))
  floor = 1e-6 * (jnp.mean(rq, -1, keepdims=True) + jnp.mean(rk, -1, keepdims=True))
  return jnp.sqrt((rq + floor) / (rk + floor))


def choose_outliers(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Channel order per (row, KV head), largest mean square over valid tokens first.

  x: [B, T, K, H] (already centered when centering is on); valid: [B, T] bool.
  Returns [B, K, H] int32 (the first H/parts channels are the outliers).
  """
  energy = token_mean(jnp.square(x.astype(jnp.float32)), valid)
  return jnp.argsort(-energy, axis=-1, stable=True).astype(jnp.int32)


def _permute(x: jax.Array, perm: jax.Array | None) -> jax.Array:
  """x [B, T, K, (G,) H] in the channel order perm [B, K, H]."""
  if perm is None:
    return x
  idx = perm[:, None, :, None, :] if x.ndim == 5 else perm[:, None]
  return jnp.take_along_axis(x, idx, axis=-1)


def _unit(x):
  norm = jnp.linalg.norm(x, axis=-1)
  return x / jnp.where(norm > 0, norm, 1)[..., None], norm


def quantize_part(x: jax.Array, bits: int, rot: jax.Array, proj: jax.Array | None) -> PartCodes:
  """TurboQuant of vectors x [..., n]: mse at `bits` code bits, and QJL signs if proj is given."""
  n = x.shape[-1]
  u, norm = _unit(x.astype(jnp.float32))
  y = jnp.einsum("...j,ij->...i", u, rot, precision=_HI)  # Π u
  cents, bounds = centroids(bits, n)
  idx = jnp.searchsorted(jnp.asarray(bounds, jnp.float32), y, method="compare_all")
  to16 = lambda a: jnp.minimum(a, _F16_MAX).astype(NORM_DTYPE)  # noqa: E731
  codes = pack_lanes(idx, bits)
  if proj is None:
    return PartCodes(codes, to16(norm))
  r = y - jnp.asarray(cents, jnp.float32)[idx]
  signs = pack_lanes((jnp.einsum("...j,ij->...i", r, proj, precision=_HI) >= 0), 1)
  return PartCodes(codes, to16(norm), signs, to16(jnp.linalg.norm(r, axis=-1)))


def _code_bits(spec: KVQuant, keys: bool) -> list[int]:
  return [spec.key_code_bits(b) for b in spec.key_bits] if keys else list(spec.value_bits)


def _part_args(spec: KVQuant, codec: Codec, n: int, keys: bool):
  """(code bits per part, rotation, QJL projection or None) of keys or values."""
  rot_k, proj, rot_v = codec.mats(n)
  if keys:
    return _code_bits(spec, True), rot_k, proj if spec.key_qjl else None
  return _code_bits(spec, False), rot_v, None


def quantize(x: jax.Array, perm, codec: Codec, keys: bool):
  """Keys or values [B, T, K, H] -> one PartCodes per part."""
  x = _permute(x, perm)
  n = x.shape[-1] // codec.spec.parts
  bits, rot, proj = _part_args(codec.spec, codec, n, keys)
  return tuple(quantize_part(x[..., p * n:(p + 1) * n], b, rot, proj) for p, b in enumerate(bits))


def dequantize_part(part: PartCodes, bits: int, rot: jax.Array, proj: jax.Array | None):
  """x̃ [..., n] float32: ‖x‖ Πᵀ (c[code] + √(π/2)/n · γ · Sᵀ signs)."""
  n = rot.shape[0]
  cents, _ = centroids(bits, n)
  y = jnp.asarray(cents, jnp.float32)[unpack_lanes(part.codes, bits, n)]
  if proj is not None:
    sgn = unpack_lanes(part.signs, 1, n).astype(jnp.float32) * 2 - 1
    y = y + qjl_scale(n) * part.gamma.astype(jnp.float32)[..., None] * jnp.einsum(
        "...i,ij->...j", sgn, proj, precision=_HI)
  return part.norm.astype(jnp.float32)[..., None] * jnp.einsum("...i,ij->...j", y, rot,
                                                               precision=_HI)


# ----------------------------------------------------------------------------- the view
@dataclasses.dataclass(frozen=True)
class QuantView:
  """What queries attend to in a quantized cache (also the KV-shared layers' view)."""

  k: tuple[PartCodes, ...]
  v: tuple[PartCodes, ...]
  pos: jax.Array  # [B, S]
  k_perm: jax.Array | None
  v_perm: jax.Array | None
  k_mean: jax.Array | None
  v_mean: jax.Array | None
  k_scale: jax.Array | None
  codec: Codec
  recent: FloatView | None = None  # the newest tokens in bfloat16: after the codes' slots
  sink: FloatView | None = None  # the first tokens in bfloat16: after the recent window's slots

  @property
  def kv_heads(self) -> int:
    return self.k[0].norm.shape[2]

  def visible(self, q_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S (+ R) (+ P)] bool: which slots each query reads, every key from one copy.

    Positions < spec.sink come from the sink buffer (slots after the recent window's), keys
    fewer than spec.recent positions back from the recent window (slots after the codes'), the
    rest from the codes."""
    spec = self.codec.spec
    # [B, T, S]
    mask = causal_mask(q_pos, self.pos, window) & (self.pos[:, None, :] >= spec.sink)
    masks = [mask]
    if self.recent is not None:
      mask &= q_pos[:, :, None] - self.pos[:, None, :] >= spec.recent
      masks = [mask, self.recent.visible(q_pos, min(spec.recent, window or spec.recent))
               & (self.recent.pos[:, None, :] >= spec.sink)]
    if self.sink is not None:
      masks.append(self.sink.visible(q_pos, window))
    return jnp.concatenate(masks, axis=-1)

  def _n(self, head_dim: int) -> int:
    return head_dim // self.codec.spec.parts

  def scores(self, q: jax.Array) -> jax.Array:
    """Logits ⟨q, k̃⟩ from the codes. q: [B, T, K, G, H] -> [B, K, G, T, S] float32."""
    b, t, kh, g, h = q.shape
    n = self._n(h)
    code_bits, rot, proj = _part_args(self.codec.spec, self.codec, n, True)
    qs = q.astype(jnp.float32)
    if self.k_scale is not None:
      qs = qs / self.k_scale[:, None, :, None, :]
    # [B, K, T, G, H] -> per part [B, K, T·G, n]
    qs = jnp.transpose(_permute(qs, self.k_perm), (0, 2, 1, 3, 4))
    total = 0
    for p, (bits, part) in enumerate(zip(code_bits, self.k, strict=True)):
      qr = jnp.einsum("bktgj,ij->bktgi", qs[..., p * n:(p + 1) * n], rot, precision=_HI)
      qp = None
      if proj is not None:
        qp = jnp.einsum("bktgj,ij->bktgi", qr, proj, precision=_HI).reshape(b, kh, t * g, n)
      s = registry.call("tq_scores", qr.reshape(b, kh, t * g, n), qp, part.codes, part.signs,
                        part.norm, part.gamma, bits=bits, table=centroids(bits, n)[0])
      total = total + s
    # [B, K, T, G, S] -> [B, K, G, T, S]
    total = jnp.transpose(total.reshape(b, kh, t, g, -1), (0, 1, 3, 2, 4))
    if self.k_mean is not None:  # ⟨q, μ_k⟩: the same for every key of a query
      total = total + jnp.einsum("btkgh,bkh->bkgt", q.astype(jnp.float32), self.k_mean,
                                 precision=_HI)[..., None]
    exact = [v.scores(q) for v in (self.recent, self.sink) if v is not None]
    return jnp.concatenate([total, *exact], axis=-1) if exact else total

  def mix(self, probs: jax.Array) -> jax.Array:
    """Σ_s probs · ṽ_s. probs: [B, K, G, T, S (+ R) (+ P)] -> [B, T, K, G, H] float32."""
    exact_out, start = 0, self.pos.shape[1]
    for view in (self.recent, self.sink):
      if view is not None:
        end = start + view.pos.shape[1]
        exact_out = exact_out + view.mix(probs[..., start:end])
        start = end
    probs = probs[..., :self.pos.shape[1]]
    b, kh, g, t, s = probs.shape
    p = jnp.transpose(probs, (0, 1, 3, 2, 4)).reshape(b, kh, t * g, s).astype(jnp.float32)
    outs = []
    for bits, part in zip(self.codec.spec.value_bits, self.v, strict=True):
      n = part.codes.shape[-1] * 32 // bits
      _, _, rot = self.codec.mats(n)
      o = registry.call("tq_mix", p, part.codes, part.norm, bits=bits,
                        table=centroids(bits, n)[0])
      outs.append(jnp.einsum("bxi,ij->bxj", o.reshape(b, -1, n), rot, precision=_HI))
    # [B, K, T, G, H] in the stored channel order -> the model's order
    out = jnp.concatenate(outs, axis=-1).reshape(b, kh, t, g, -1)
    out = jnp.transpose(out, (0, 2, 1, 3, 4))
    if self.v_perm is not None:
      inverse = jnp.argsort(self.v_perm, axis=-1)
      out = _permute(out, inverse)
    if self.v_mean is not None:  # Σ_s probs · μ_v over the codes' slots (all of them: μ_v)
      # [B, K, G, T] -> [B, T, K, G, 1]
      mass = jnp.transpose(jnp.sum(probs, axis=-1), (0, 3, 1, 2))[..., None]
      out = out + mass * self.v_mean[:, None, :, None, :]
    return out + exact_out

  def attend_blocks(self, q: jax.Array, q_pos: jax.Array, *, window: int | None, scale: float,
                    cap: float | None, block: int, dense) -> jax.Array:
    """`dense(q, q_pos)` (scores on the codes, softmax, mix) over blocks of queries sized so the
    score buffer stays under 64·block² floats: linear in the context, codes never dequantized.
    q: [B, T, K, G, H] -> [B, T, K, G, H]."""
    del window, scale, cap
    b, _, kh, g, _ = q.shape
    keys = self.pos.shape[1] + sum(v.pos.shape[1] for v in (self.recent, self.sink)
                                   if v is not None)
    return attend_query_blocks(dense, q, q_pos, 64 * block ** 2 // (b * kh * g * keys))

  def dequantized(self):
    """(k̃, ṽ) [B, S, K, H] float32: the reference the attention on codes must match."""
    spec = self.codec.spec

    def rebuild(parts, perm, mean, scale, keys):
      n = parts[0].codes.shape[-1] * 32 // _code_bits(spec, keys)[0]
      bits, rot, proj = _part_args(spec, self.codec, n, keys)
      x = jnp.concatenate([dequantize_part(pc, b, rot, proj)
                           for pc, b in zip(parts, bits, strict=True)], axis=-1)
      x = x if perm is None else _permute(x, jnp.argsort(perm, axis=-1))
      x = x if scale is None else x / scale[:, None]
      return x if mean is None else x + mean[:, None]

    return (rebuild(self.k, self.k_perm, self.k_mean, self.k_scale, True),
            rebuild(self.v, self.v_perm, self.v_mean, None, False))


def store_sink(buf: FloatKV, k: jax.Array, v: jax.Array, positions: jax.Array,
               num_columns: jax.Array) -> FloatKV:
  """Writes the K/V [B, T, K, H] of positions < P into slot = position of the sink buffer
  [B, P, ...] (written once, so a multi-token call may read the updated buffer)."""
  p = buf.pos.shape[1]
  col = jnp.arange(k.shape[1])[None, :]
  keep = (positions >= 0) & (positions < p) & (col < num_columns)
  # [B, T] slot per column; P (out of range) drops the write
  slots = jnp.where(keep, positions, p)
  rows = jnp.broadcast_to(jnp.arange(k.shape[0])[:, None], slots.shape)
  put = lambda old, new: old.at[rows, slots].set(new.astype(old.dtype), mode="drop")  # noqa: E731
  return FloatKV(put(buf.k, k), put(buf.v, v), put(buf.pos, positions.astype(jnp.int32)))


def _concat(old, new):
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), old, new)


def update_and_view(cache: QuantLayerCache, codec: Codec, k: jax.Array, v: jax.Array,
                    positions: jax.Array, start: jax.Array, num_columns: jax.Array, write,
                    q: jax.Array | None = None):
  """Quantizes this call's K/V [B, T, K, H], stores them, returns (QuantView, new cache).

  A row's first call (no key of it stored yet: the first prefill chunk that holds its tokens)
  fixes, per row and KV head, the mean vectors (centering), the key scaling and the outlier
  channels from its valid tokens; with a prompt prefilled in chunks, from the first chunk only.
  Every query attends to quantized keys and values, its own column's included, so a prefill
  equals the same tokens decoded one by one.
  `write(old_leaves, new_leaves, start, num_columns)` scatters slot-major leaves. q: this call's
  queries [B, T, K, G, H] (for query scaling; None keeps the cache's scale).
  """
  spec = codec.spec
  recent_view = recent = sink_view = sink = None
  if cache.recent is not None:
    recent_view, recent = update_float(cache.recent, k, v, positions, start, num_columns)
  if cache.sink is not None:
    sink = store_sink(cache.sink, k, v, positions, num_columns)
    sink_view = FloatView(sink.k, sink.v, sink.pos)
  valid = (positions >= 0) & (jnp.arange(k.shape[1])[None, :] < num_columns)
  # [B, 1, 1]: rows with nothing stored yet (every call of a left-padded row's padding counts)
  first = jnp.all(cache.pos < 0, axis=1)[:, None, None]
  k_mean, v_mean = cache.k_mean, cache.v_mean
  if spec.center:
    k_mean = jnp.where(first, token_mean(k, valid), k_mean)
    v_mean = jnp.where(first, token_mean(v, valid), v_mean)
    k, v = k - k_mean[:, None], v - v_mean[:, None]
  k_scale = cache.k_scale
  if spec.query_scaling and q is not None:
    k_scale = jnp.where(first, query_scale(q, k, valid), k_scale)
  if k_scale is not None:
    k = k * k_scale[:, None]
  k_perm, v_perm = cache.k_perm, cache.v_perm
  if spec.parts > 1:
    k_perm = jnp.where(first, choose_outliers(k, valid), k_perm)
    v_perm = jnp.where(first, choose_outliers(v, valid), v_perm)
  fixed = dict(k_perm=k_perm, v_perm=v_perm, k_mean=k_mean, v_mean=v_mean, k_scale=k_scale)
  new = QuantLayerCache(k=quantize(k, k_perm, codec, True), v=quantize(v, v_perm, codec, False),
                        pos=positions.astype(jnp.int32), **fixed)
  slot_major = lambda c: (c.k, c.v, c.pos)  # noqa: E731
  stored = QuantLayerCache(*write(slot_major(cache), slot_major(new), start, num_columns),
                           **fixed, recent=recent, sink=sink)
  old = (cache.k, cache.v, drop_stale(cache.pos, new.pos, num_columns))
  src = stored if k.shape[1] == 1 else QuantLayerCache(*_concat(old, slot_major(new)), **fixed)
  return QuantView(k=src.k, v=src.v, pos=src.pos, codec=codec, recent=recent_view,
                   sink=sink_view, **fixed), stored


def vector_bytes(spec: KVQuant, head_dim: int) -> int:
  """Stored bytes of one key plus one value head vector (codes, signs, float16 norms)."""
  n = head_dim // spec.parts
  itemsize = jnp.dtype(NORM_DTYPE).itemsize
  # prod: b - 1 code bits + 1 sign bit per channel, norm and γ; mse: b code bits and the norm
  keys = sum(n * b // 8 + (2 if spec.key_qjl else 1) * itemsize for b in spec.key_bits)
  values = sum(n * b // 8 + itemsize for b in spec.value_bits)
  return keys + values


def codec_bytes(spec: KVQuant, head_dims) -> int:
  """Bytes of the shared rotations/projections (3 float32 [n, n] per part size)."""
  return sum(3 * n * n * 4 for n in {h // spec.parts for h in head_dims})


def bits_per_channel(spec: KVQuant, head_dim: int) -> float:
  """Stored bits per K/V channel including norms (vs 16 for a bf16 cache)."""
  return 8 * vector_bytes(spec, head_dim) / (2 * head_dim)

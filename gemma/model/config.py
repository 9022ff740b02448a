"""Model configuration: one frozen, hashable dataclass, the four released presets, HF parsing.

Per-layer differences (attention type, head sizes, KV-sharing source, FFN width) are data:
`ModelConfig.layers` derives one `LayerSpec` per layer, and the model code only reads those.
Ablations are `dataclasses.replace(cfg, ...)`; the config is passed to `jax.jit` as static.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Mapping
from typing import Any


class AttentionType(enum.Enum):
  """Attention kind of a layer; the values are the Hugging Face `layer_types` spellings."""

  LOCAL = "sliding_attention"
  GLOBAL = "full_attention"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding of one attention type.

  kind: "default" rotates the first `partial_rotary_factor * head_dim` dims contiguously (HF
  default RoPE); "proportional" (Gemma 4 global p-RoPE) rotates the first
  `int(partial_rotary_factor * head_dim // 2)` frequency pairs with denominators over the full
  head_dim and leaves the other pairs unrotated. Frequencies are divided by `factor`.
  """

  theta: float = 10_000.0
  kind: str = "default"
  partial_rotary_factor: float = 1.0
  factor: float = 1.0

  def __post_init__(self):
    if self.kind not in ("default", "proportional", "linear"):
      raise ValueError(f"unknown rope kind {self.kind!r}; expected default|proportional|linear")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Everything that differs between layers, derived once from the config."""

  index: int
  attention: AttentionType
  head_dim: int  # H of this layer (global layers use global_head_dim)
  num_kv_heads: int  # K of this layer
  k_eq_v: bool  # V is the raw K projection (no v projection weight)
  ffn_dim: int  # F of this layer (E2B's KV-shared layers are double wide)
  kv_source: int  # layer whose K/V this layer attends to (== index unless KV-shared)
  window: int | None  # sliding window (None for global layers)

  @property
  def shares_kv(self) -> bool:
    return self.kv_source != self.index


ATTENTION_IMPLS = ("auto", "dense", "blockwise")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Gemma text decoder. Field names follow the paper notation (see gemma/model/notation.py)."""

  name: str
  vocab_size: int
  embed_dim: int  # D
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K on local layers
  head_dim: int  # H on local layers
  ffn_dim: int  # F (dense MLP; the shared dense MLP on MoE models)
  layer_types: tuple[AttentionType, ...]
  sliding_window: int
  rope_local: RopeConfig = RopeConfig(theta=10_000.0)
  rope_global: RopeConfig = RopeConfig(theta=1_000_000.0, kind="proportional",
                                       partial_rotary_factor=0.25)
  global_head_dim: int | None = None  # None: same as head_dim
  num_global_kv_heads: int | None = None  # only used when k_eq_v
  k_eq_v: bool = False  # global layers take V from the raw K projection
  num_kv_shared_layers: int = 0
  double_wide_mlp: bool = False  # KV-shared layers use 2F
  ple_dim: int = 0  # P, per-layer embedding width (0: no PLE)
  ple_vocab_size: int = 0
  num_experts: int = 0  # E (0: no MoE block)
  top_k_experts: int = 0
  moe_ffn_dim: int = 0  # I
  final_softcap: float | None = 30.0
  attn_softcap: float | None = None
  query_pre_attn_scalar: float | None = None  # None: attention scale 1.0 (Gemma 4)
  rms_eps: float = 1e-6
  norm_plus_one: bool = False  # Gemma 2/3 RMSNorm multiplies by (1 + w)
  use_v_norm: bool = True
  use_layer_scalar: bool = True
  max_position_embeddings: int = 131_072
  pad_id: int = 0
  bos_id: int = 2
  eos_ids: tuple[int, ...] = (1,)
  # How attention is computed (numerics equal up to float rounding; an ablation knob):
  # "dense" materializes [T, S] scores; "blockwise" never does (flash attention: memory linear in
  # the context); "auto": dense for decode steps and small calls (T·S <= 4·block²), else blockwise.
  attention_impl: str = "auto"
  attention_block: int = 512  # queries and keys per block of blockwise attention

  def __post_init__(self):
    if len(self.layer_types) != self.num_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} not divisible by num_kv_heads")
    if not 0 <= self.num_kv_shared_layers < self.num_layers:
      raise ValueError(f"num_kv_shared_layers={self.num_kv_shared_layers} out of range")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of "
                       f"{ATTENTION_IMPLS}")
    if self.attention_block < 1:
      raise ValueError(f"attention_block={self.attention_block} must be >= 1")
    if self.num_experts and not 0 < self.top_k_experts <= self.num_experts:
      raise ValueError(f"top_k_experts={self.top_k_experts} must be in [1, {self.num_experts}]")

  # ----------------------------------------------------------------------------- derived data
  @functools.cached_property
  def layers(self) -> tuple[LayerSpec, ...]:
    """Per-layer specs: attention type, head sizes, FFN width and KV-sharing source."""
    first_shared = self.num_layers - self.num_kv_shared_layers
    specs = []
    for i, kind in enumerate(self.layer_types):
      is_global = kind is AttentionType.GLOBAL
      k_eq_v = self.k_eq_v and is_global
      num_kv = self.num_kv_heads
      if k_eq_v and self.num_global_kv_heads is not None:
        num_kv = self.num_global_kv_heads
      source = i
      if self.num_kv_shared_layers and i >= first_shared:
        # The last non-shared layer of the same attention type produces this layer's K/V.
        producers = [j for j in range(first_shared) if self.layer_types[j] is kind]
        if not producers:
          raise ValueError(f"layer {i} shares KV but no earlier {kind.value} layer exists")
        source = producers[-1]
      wide = self.double_wide_mlp and source != i
      specs.append(LayerSpec(
          index=i, attention=kind,
          head_dim=(self.global_head_dim or self.head_dim) if is_global else self.head_dim,
          num_kv_heads=num_kv, k_eq_v=k_eq_v,
          ffn_dim=self.ffn_dim * (2 if wide else 1), kv_source=source,
          window=None if is_global else self.sliding_window))
    for spec in specs:  # a consumer must read K/V of the producer's exact shape
      src = specs[spec.kv_source]
      if (src.head_dim, src.num_kv_heads) != (spec.head_dim, spec.num_kv_heads):
        raise ValueError(f"layer {spec.index} cannot share KV with layer {src.index}: "
                         "shapes differ")
    return tuple(specs)

  @property
  def use_ple(self) -> bool:
    return self.ple_dim > 0

  @property
  def use_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def attn_scale(self) -> float:
    """Multiplier of q·k: 1.0 for Gemma 4 (q/k norms replace 1/sqrt(H))."""
    return 1.0 if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5

  def attends_blockwise(self, queries: int, keys: int) -> bool:
    """Whether a call of `queries` queries over `keys` keys runs blockwise (`attention_impl`)."""
    if self.attention_impl == "auto":
      return queries > 1 and queries * keys > 4 * self.attention_block ** 2
    return self.attention_impl == "blockwise"

  def rope(self, kind: AttentionType) -> RopeConfig:
    return self.rope_global if kind is AttentionType.GLOBAL else self.rope_local


# --------------------------------------------------------------------------------- presets
def pattern(num_layers: int, period: int) -> tuple[AttentionType, ...]:
  """`period - 1` local layers then one global layer, repeated; the last layer is global."""
  types = [AttentionType.GLOBAL if (i + 1) % period == 0 else AttentionType.LOCAL
           for i in range(num_layers)]
  types[-1] = AttentionType.GLOBAL
  return tuple(types)


def _gemma4(name: str, *, num_layers: int, period: int, **kw: Any) -> ModelConfig:
  base = dict(vocab_size=262_144, head_dim=256, global_head_dim=512, final_softcap=30.0,
              eos_ids=(1, 106))
  base.update(kw)
  return ModelConfig(name=name, num_layers=num_layers, layer_types=pattern(num_layers, period),
                     **base)


PRESETS: Mapping[str, ModelConfig] = {
    "gemma4-e2b": _gemma4(
        "gemma4-e2b", num_layers=35, period=5, embed_dim=1536, num_heads=8, num_kv_heads=1,
        ffn_dim=6144, sliding_window=512, num_kv_shared_layers=20, double_wide_mlp=True,
        ple_dim=256, ple_vocab_size=262_144),
    "gemma4-e4b": _gemma4(
        "gemma4-e4b", num_layers=42, period=6, embed_dim=2560, num_heads=8, num_kv_heads=2,
        ffn_dim=10240, sliding_window=512, num_kv_shared_layers=18, ple_dim=256,
        ple_vocab_size=262_144),
    "gemma4-26b-a4b": _gemma4(
        "gemma4-26b-a4b", num_layers=30, period=6, embed_dim=2816, num_heads=16,
        num_kv_heads=8, num_global_kv_heads=2, k_eq_v=True, ffn_dim=2112, sliding_window=1024,
        num_experts=128, top_k_experts=8, moe_ffn_dim=704, max_position_embeddings=262_144),
    "gemma4-31b": _gemma4(
        "gemma4-31b", num_layers=60, period=6, embed_dim=5376, num_heads=32, num_kv_heads=16,
        num_global_kv_heads=4, k_eq_v=True, ffn_dim=21504, sliding_window=1024,
        max_position_embeddings=262_144),
}


def get_preset(name: str) -> ModelConfig:
  """Returns the preset with exactly this name (no fuzzy matching)."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> list[float]:
  """Inverse frequencies of the H/2 rotary pairs (split-half convention), 0 for unrotated pairs."""
  half = head_dim // 2
  if rope.kind == "proportional":
    rotated = int(rope.partial_rotary_factor * head_dim // 2)
    freqs = [rope.theta ** (-2 * j / head_dim) if j < rotated else 0.0 for j in range(half)]
  elif rope.partial_rotary_factor != 1.0:
    raise NotImplementedError(f"{rope.kind} RoPE with partial_rotary_factor != 1 is not supported")
  else:
    freqs = [rope.theta ** (-2 * j / head_dim) for j in range(half)]
  return [f / rope.factor for f in freqs]


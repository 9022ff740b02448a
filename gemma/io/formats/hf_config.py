"""Model configs from a Hugging Face `config.json`: Gemma 4 (`from_hf_config`, which also
dispatches Gemma 3) and Gemma 3 text models (transformers `models/gemma3`).

Gemma 3 is the Gemma 4 decoder with these switches: RMSNorm
multiplies by `(1 + w)` on every norm (q/k norms included), attention logits are scaled by
`query_pre_attn_scalar ** -0.5`, no v-norm / layer scalar / PLE / MoE / KV sharing / k_eq_v,
and full-rotary RoPE on both layer types with their own base (and a linear factor on global
layers only). Missing keys take the reference's `Gemma3TextConfig` defaults, because released
multimodal configs (e.g. gemma-3-4b-it) list only the non-default text fields.

Two config.json spellings are accepted, as the reference does:
  * transformers >= 5 `save_pretrained`: `layer_types` and a per-type `rope_parameters`
    (`{"full_attention": {...}, "sliding_attention": {...}}`);
  * transformers 4.x / released files: `rope_theta` (global), `rope_local_base_freq` (local),
    `rope_scaling` (applies to global layers only), `sliding_window_pattern` (no layer forced
    global: with 26 layers and pattern 6 the last layer is local).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from gemma.model.config import AttentionType, ModelConfig, RopeConfig, pattern

MODEL_TYPES = ("gemma3", "gemma3_text")

# transformers `Gemma3TextConfig` defaults (5.24, unchanged since 4.50)
DEFAULTS: Mapping[str, Any] = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, query_pre_attn_scalar=256,
    sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
    attention_bias=False, use_bidirectional_attention=False, sliding_window_pattern=6,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
)
ROPE_KINDS = ("default", "linear")


def is_gemma3_config(hf: Mapping[str, Any]) -> bool:
  """True for a Gemma 3 text (`gemma3_text`) or multimodal (`gemma3`) config.json dict.

  Gemma 3n (`gemma3n`, `gemma3n_text`) is a different architecture and is not matched.
  """
  text = hf.get("text_config") or {}
  return hf.get("model_type") in MODEL_TYPES or (
      isinstance(text, Mapping) and text.get("model_type") == "gemma3_text")


def _get(hf: Mapping[str, Any], key: str) -> Any:
  """The config value, or the reference default when the key is absent (null stays null)."""
  return hf[key] if key in hf else DEFAULTS[key]


def _layer_types(hf: Mapping[str, Any], num_layers: int) -> tuple[AttentionType, ...]:
  if hf.get("layer_types"):
    try:
      types = tuple(AttentionType(t) for t in hf["layer_types"])
    except ValueError as e:
      raise ValueError(f"config.json: unknown layer type in layer_types: {e}") from None
    if len(types) != num_layers:
      raise ValueError(f"config.json: {len(types)} layer_types for {num_layers} layers")
    return types
  # The reference's rule: layer i is global iff (i + 1) % pattern == 0, nothing forced.
  period = int(hf.get("sliding_window_pattern") or DEFAULTS["sliding_window_pattern"])
  return tuple(AttentionType.GLOBAL if (i + 1) % period == 0 else AttentionType.LOCAL
               for i in range(num_layers))


def _rope(params: Mapping[str, Any] | None, theta: float, where: str) -> RopeConfig:
  params = dict(params or {})
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_KINDS:
    raise NotImplementedError(
        f"config.json: {where} rope_type {kind!r} is not supported for Gemma 3 "
        f"(supported: {', '.join(ROPE_KINDS)})")
  if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
    raise NotImplementedError(f"config.json: {where} partial_rotary_factor != 1 (Gemma 3)")
  factor = float(params.get("factor") or 1.0) if kind == "linear" else 1.0
  return RopeConfig(theta=float(params.get("rope_theta", theta)), kind=kind, factor=factor)


def _ropes(hf: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
  """(local, global) RoPE, following `Gemma3TextConfig.convert_rope_params_to_dict`."""
  nested = dict(hf.get("rope_parameters") or {})
  flat = {k: v for k, v in nested.items() if k not in ("full_attention", "sliding_attention")}
  if flat:
    raise ValueError("config.json: Gemma 3 rope_parameters must be keyed by layer type "
                     f"(full_attention / sliding_attention); got keys {sorted(flat)}")
  full = dict(nested.get("full_attention") or {})
  if hf.get("rope_scaling"):  # legacy: the scaling applies to global layers only
    full.update(hf["rope_scaling"])
  local = _rope(nested.get("sliding_attention"), float(_get(hf, "rope_local_base_freq")),
                "sliding_attention")
  return local, _rope(full, float(_get(hf, "rope_theta")), "full_attention")


def from_hf_gemma3_config(hf: Mapping[str, Any], name: str = "hf") -> ModelConfig:
  """Builds a ModelConfig from a Gemma 3 config.json dict (`gemma3_text`, or `gemma3` with a
  `text_config`). Raises NotImplementedError for features this decoder does not model."""
  if not is_gemma3_config(hf):
    raise ValueError(f"not a Gemma 3 config (model_type={hf.get('model_type')!r})")
  top = hf
  text = hf if hf.get("model_type") == "gemma3_text" else dict(hf.get("text_config") or {})
  if _get(text, "use_bidirectional_attention"):
    raise NotImplementedError("use_bidirectional_attention (EmbeddingGemma) is not supported")
  if _get(text, "attention_bias"):
    raise NotImplementedError("attention_bias=True is not supported (Gemma 3 has no biases)")
  if not (top.get("tie_word_embeddings", True) and text.get("tie_word_embeddings", True)):
    raise NotImplementedError("tie_word_embeddings=False (Gemma 3 ties the LM head)")
  act = _get(text, "hidden_activation")
  if act != "gelu_pytorch_tanh":
    raise NotImplementedError(f"hidden_activation {act!r}; only gelu_pytorch_tanh is supported")
  num_layers = int(_get(text, "num_hidden_layers"))
  max_pos = int(_get(text, "max_position_embeddings"))
  window = _get(text, "sliding_window")
  rope_local, rope_global = _ropes(text)
  scalar = _get(text, "query_pre_attn_scalar")
  final_cap, attn_cap = _get(text, "final_logit_softcapping"), _get(text, "attn_logit_softcapping")
  eos = top["eos_token_id"] if "eos_token_id" in top else _get(text, "eos_token_id")
  return ModelConfig(
      name=name,
      vocab_size=int(_get(text, "vocab_size")),
      embed_dim=int(_get(text, "hidden_size")),
      num_layers=num_layers,
      num_heads=int(_get(text, "num_attention_heads")),
      num_kv_heads=int(_get(text, "num_key_value_heads")),
      head_dim=int(_get(text, "head_dim")),
      ffn_dim=int(_get(text, "intermediate_size")),
      layer_types=_layer_types(text, num_layers),
      # null window: the reference's sliding layers then attend to everything
      sliding_window=int(window) if window else max_pos,
      rope_local=rope_local,
      rope_global=rope_global,
      final_softcap=float(final_cap) if final_cap else None,
      attn_softcap=float(attn_cap) if attn_cap else None,
      query_pre_attn_scalar=float(scalar),
      rms_eps=float(_get(text, "rms_norm_eps")),
      norm_plus_one=True,
      use_v_norm=False,
      use_layer_scalar=False,
      ple_dim=0,
      ple_vocab_size=0,
      max_position_embeddings=max_pos,
      pad_id=int(_get(text, "pad_token_id") or 0),
      bos_id=int(_get(text, "bos_token_id") or 2),
      eos_ids=eos_ids_from_hf(eos, default=()),
  )


# ------------------------------------------------------------------------- HF config.json
def _rope_from_hf(params: Mapping[str, Any] | None, default_theta: float) -> RopeConfig:
  params = dict(params or {})
  kind = params.get("rope_type", params.get("type", "default"))
  factor = params.get("factor") or 1.0
  return RopeConfig(theta=float(params.get("rope_theta", default_theta)), kind=kind,
                    partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
                    factor=float(factor))


def eos_ids_from_hf(value: Any, default: tuple[int, ...] = (1,)) -> tuple[int, ...]:
  """An HF `eos_token_id` (int, list or None) as a tuple of ids."""
  if value is None:
    return default
  return tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),)


def from_hf_config(hf: Mapping[str, Any], name: str = "hf") -> ModelConfig:
  """Builds a config from a Hugging Face Gemma 4 `config.json` dict (top level or text_config).

  Honours `layer_types`, `rope_parameters`, the flat `global_head_dim` /
  `num_global_key_value_heads` overrides of the released configs and the `per_layer_config`
  that `save_pretrained` writes (which wins when present).
  """
  if is_gemma3_config(hf):
    return from_hf_gemma3_config(hf, name)
  top = hf
  hf = hf.get("text_config") or hf
  num_layers = int(hf["num_hidden_layers"])
  if hf.get("layer_types"):
    try:
      types = tuple(AttentionType(t) for t in hf["layer_types"])
    except ValueError as e:
      raise ValueError(f"config.json: unknown layer type in layer_types: {e}") from None
  else:
    types = pattern(num_layers, int(hf.get("sliding_window_pattern", 6)))
  head_dim = int(hf.get("head_dim", 256))
  global_head_dim = hf.get("global_head_dim")
  num_kv = int(hf.get("num_key_value_heads", 1))
  num_global_kv = hf.get("num_global_key_value_heads")
  k_eq_v = bool(hf.get("attention_k_eq_v", False))
  for key, override in (hf.get("per_layer_config") or {}).items():
    layer = int(key)
    if layer >= num_layers or types[layer] is not AttentionType.GLOBAL:
      raise ValueError(f"per_layer_config overrides layer {key}, which is not a global layer")
    if "head_dim" in override:
      global_head_dim = override["head_dim"]
    if "num_key_value_heads" in override:
      num_global_kv = override["num_key_value_heads"]
  rope = hf.get("rope_parameters") or {}
  rope_local = _rope_from_hf(rope.get("sliding_attention"), hf.get("rope_local_base_freq", 1e4))
  rope_global = _rope_from_hf(rope.get("full_attention"), hf.get("rope_theta", 1e6))
  ple_dim = hf.get("hidden_size_per_layer_input", 256)  # HF default: a missing key means on
  num_experts = int(hf.get("num_experts") or 0) if hf.get("enable_moe_block") else 0
  scalar = hf.get("query_pre_attn_scalar")
  return ModelConfig(
      name=name,
      vocab_size=int(hf["vocab_size"]),
      embed_dim=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=num_kv,
      head_dim=head_dim,
      ffn_dim=int(hf["intermediate_size"]),
      layer_types=types,
      sliding_window=int(hf.get("sliding_window") or 512),
      rope_local=rope_local,
      rope_global=rope_global,
      global_head_dim=int(global_head_dim) if global_head_dim else None,
      num_global_kv_heads=int(num_global_kv) if num_global_kv else None,
      k_eq_v=k_eq_v,
      num_kv_shared_layers=int(hf.get("num_kv_shared_layers") or 0),
      double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
      ple_dim=int(ple_dim or 0),
      ple_vocab_size=(int(hf.get("vocab_size_per_layer_input") or hf["vocab_size"])
                      if ple_dim else 0),
      num_experts=num_experts,
      top_k_experts=int(hf.get("top_k_experts") or 0) if num_experts else 0,
      moe_ffn_dim=int(hf.get("moe_intermediate_size") or 0) if num_experts else 0,
      final_softcap=hf.get("final_logit_softcapping"),
      attn_softcap=hf.get("attn_logit_softcapping"),
      query_pre_attn_scalar=float(scalar) if scalar else None,
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 131_072)),
      pad_id=int(hf.get("pad_token_id") or 0),
      bos_id=int(hf.get("bos_token_id") or 2),
      eos_ids=eos_ids_from_hf(top.get("eos_token_id", hf.get("eos_token_id"))),
  )


# ---------------------------------------------------------------- config.json from a config
# Runtime knobs of ModelConfig that are not part of the architecture (never exported)
_RUNTIME_FIELDS = ("name", "attention_impl", "attention_block")


def _unexpressible(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"cannot export to a Hugging Face config: {field}={value!r} ({why})")


def _rope_to_hf(rope: RopeConfig, where: str, kinds: tuple[str, ...]) -> dict[str, Any]:
  if rope.kind not in kinds:
    raise _unexpressible(f"{where}.kind", rope.kind, f"this architecture takes {kinds}")
  out: dict[str, Any] = {"rope_type": rope.kind, "rope_theta": float(rope.theta)}
  if rope.kind == "default" and (rope.factor != 1.0 or rope.partial_rotary_factor != 1.0):
    raise _unexpressible(where, rope, "default RoPE has no factor or partial rotation")
  if rope.partial_rotary_factor != 1.0:
    out["partial_rotary_factor"] = float(rope.partial_rotary_factor)
  if rope.kind == "linear" or rope.factor != 1.0:
    out["factor"] = float(rope.factor)
  return out


def _eos_to_hf(eos_ids: tuple[int, ...]) -> int | list[int] | None:
  if not eos_ids:
    return None
  return int(eos_ids[0]) if len(eos_ids) == 1 else [int(i) for i in eos_ids]


def _common_hf(cfg: ModelConfig) -> dict[str, Any]:
  return dict(
      attention_bias=False, attention_dropout=0.0, bos_token_id=cfg.bos_id,
      eos_token_id=_eos_to_hf(cfg.eos_ids), pad_token_id=cfg.pad_id,
      final_logit_softcapping=cfg.final_softcap, head_dim=cfg.head_dim,
      hidden_activation="gelu_pytorch_tanh", hidden_size=cfg.embed_dim, initializer_range=0.02,
      intermediate_size=cfg.ffn_dim, layer_types=[t.value for t in cfg.layer_types],
      max_position_embeddings=cfg.max_position_embeddings,
      num_attention_heads=cfg.num_heads, num_hidden_layers=cfg.num_layers,
      num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_eps,
      sliding_window=cfg.sliding_window, tie_word_embeddings=True, use_cache=True,
      vocab_size=cfg.vocab_size)


def _gemma3_hf(cfg: ModelConfig) -> dict[str, Any]:
  for field, off in (("use_v_norm", False), ("use_layer_scalar", False), ("ple_dim", 0),
                     ("num_experts", 0), ("num_kv_shared_layers", 0), ("k_eq_v", False),
                     ("double_wide_mlp", False)):
    if getattr(cfg, field) != off:
      raise _unexpressible(field, getattr(cfg, field), f"Gemma 3 has {field}={off!r}")
  if cfg.global_head_dim not in (None, cfg.head_dim):
    raise _unexpressible("global_head_dim", cfg.global_head_dim, "Gemma 3 has one head size")
  scalar = cfg.query_pre_attn_scalar
  if scalar is None or float(scalar) != int(scalar):
    raise _unexpressible("query_pre_attn_scalar", scalar, "Gemma 3 needs an integer")
  kinds = ("default", "linear")
  return dict(
      architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", **_common_hf(cfg),
      attn_logit_softcapping=cfg.attn_softcap, query_pre_attn_scalar=int(scalar),
      rope_parameters={"full_attention": _rope_to_hf(cfg.rope_global, "rope_global", kinds),
                       "sliding_attention": _rope_to_hf(cfg.rope_local, "rope_local", kinds)},
      use_bidirectional_attention=False)


def _gemma4_hf(cfg: ModelConfig) -> dict[str, Any]:
  for field, want in (("use_v_norm", True), ("use_layer_scalar", True),
                      ("query_pre_attn_scalar", None), ("attn_softcap", None)):
    if getattr(cfg, field) != want:
      raise _unexpressible(field, getattr(cfg, field), f"Gemma 4 has {field}={want!r}")
  if cfg.layer_types[-1] is not AttentionType.GLOBAL:
    raise _unexpressible("layer_types[-1]", cfg.layer_types[-1].value,
                         "transformers forces the last Gemma 4 layer to full_attention")
  if not cfg.eos_ids:
    raise _unexpressible("eos_ids", cfg.eos_ids, "a Gemma 4 config.json without EOS means 1")
  override: dict[str, int] = {"head_dim": cfg.global_head_dim or cfg.head_dim}
  if cfg.k_eq_v and cfg.num_global_kv_heads is not None:
    override["num_key_value_heads"] = cfg.num_global_kv_heads
  kinds = ("default", "proportional", "linear")
  moe = cfg.num_experts > 0
  return dict(
      architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", **_common_hf(cfg),
      attention_k_eq_v=cfg.k_eq_v, enable_moe_block=moe,
      hidden_size_per_layer_input=cfg.ple_dim,
      moe_intermediate_size=cfg.moe_ffn_dim if moe else None,
      num_experts=cfg.num_experts if moe else None,
      top_k_experts=cfg.top_k_experts if moe else None,
      num_kv_shared_layers=cfg.num_kv_shared_layers,
      # save_pretrained's spelling: every global layer's head size (and K/V heads with k_eq_v)
      per_layer_config={str(s.index): dict(override) for s in cfg.layers
                        if s.attention is AttentionType.GLOBAL},
      rope_parameters={"full_attention": _rope_to_hf(cfg.rope_global, "rope_global", kinds),
                       "sliding_attention": _rope_to_hf(cfg.rope_local, "rope_local", kinds)},
      use_bidirectional_attention=None, use_double_wide_mlp=cfg.double_wide_mlp,
      vocab_size_per_layer_input=cfg.ple_vocab_size if cfg.ple_dim else cfg.vocab_size)


def _comparable(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with runtime knobs at their defaults and fields the model ignores made canonical
  (no global head size means the local one; global K/V heads only count with k_eq_v)."""
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.name in _RUNTIME_FIELDS[1:]}
  return dataclasses.replace(
      cfg, name="", **defaults, global_head_dim=cfg.global_head_dim or cfg.head_dim,
      num_global_kv_heads=cfg.num_global_kv_heads if cfg.k_eq_v else None)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The Hugging Face `config.json` dict of a text model: `gemma3_text` (Gemma3ForCausalLM)
  when the config is Gemma 3 (`norm_plus_one`), else `gemma4_text` (Gemma4ForCausalLM), in
  the spelling transformers 5 `save_pretrained` writes (`layer_types`, per-type
  `rope_parameters`, Gemma 4's `per_layer_config`). `from_hf_config` of the result gives
  `cfg` back (up to its name and the attention_impl / attention_block knobs); a config the
  format cannot express raises ValueError naming the field."""
  out = _gemma3_hf(cfg) if cfg.norm_plus_one else _gemma4_hf(cfg)
  back = from_hf_config(out, name=cfg.name)
  want, got = _comparable(cfg), _comparable(back)
  if want != got:
    diff = [f"{f.name}={getattr(want, f.name)!r} (would load as {getattr(got, f.name)!r})"
            for f in dataclasses.fields(ModelConfig)
            if getattr(want, f.name) != getattr(got, f.name)]
    raise ValueError("cannot export to a Hugging Face config: " + "; ".join(diff))
  return dict(sorted(out.items()))

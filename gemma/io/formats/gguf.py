"""GGUF files (llama.cpp): Gemma 3 (`gemma3`) and Gemma 4 (`gemma4`) text decoders.

The header (metadata + tensor table) is parsed by gemma/io/formats/gguf_file.py; tensors are
dequantized one at a time with `gguf.quants.dequantize`, which returns the `nn.Linear` layout
[out, in] in float32, and streamed through `common.assemble`.

What llama.cpp's converter (`convert_hf_to_gguf.py`, `Gemma3Model` / `Gemma4Model`) does to the
Hugging Face tensors, and so what this loader undoes:
  * Gemma 3 norm scales (q/k norms included) are stored as `1 + w` (`norm_shift` 1.0): we
    subtract 1, since our Gemma 3 RMSNorm computes `x * (1 + w)`. Gemma 4 norms are stored as is.
  * Gemma 4 `layer_scalar` -> `blk.N.layer_output_scale.weight`, `router.scale` ->
    `blk.N.ffn_gate_inp.scale`, `router.per_expert_scale` -> `blk.N.ffn_down_exps.scale`, fused
    experts `gate_up_proj` [E, 2I, D] -> `blk.N.ffn_gate_up_exps.weight`; the proportional RoPE
    of global layers becomes a `rope_freqs.weight` tensor of frequency factors (1 for the rotated
    pairs, 1e30 for the others), from which the partial rotary factor is read back.
  * The LM head is tied (no `output.weight`); the token embedding may be trimmed to the
    tokenizer's real size, so the vocabulary size is the embedding's row count.

Facts not in Gemma 3 metadata follow llama.cpp's loader (`LLM_ARCH_GEMMA3`): every 6th layer is
global (layers 5, 11, 17, ...; the last layer is not forced global), local RoPE base 10,000
unless `rope.freq_base_swa` says otherwise, attention scale `key_length ** -0.5` except on the
62-layer 27B (`(embedding_length / head_count) ** -0.5`), no attention soft-cap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gemma.io.formats.common import (
  CheckpointError,
  Finish,
  RegexTable,
  assemble,
  linear,
  minus_one,
  same,
  split_gate_up,
  swap_last,
)
from gemma.io.formats.gguf_file import GGUFFile, is_gguf, open_gguf  # noqa: F401 (re-exported)
from gemma.model.config import AttentionType, ModelConfig, RopeConfig
from gemma.model.params import Params

ARCHITECTURES = ("gemma3", "gemma4")
GEMMA3_PERIOD = 6  # llama.cpp `set_swa_pattern(6)` for LLM_ARCH_GEMMA3
GEMMA3_LOCAL_THETA = 10_000.0
END_OF_TURN = ("<end_of_turn>", "<turn|>")  # Gemma 3 / Gemma 4 spelling of the turn end


# ----------------------------------------------------------------------------------- config
def _int(value, what: str, path: Path) -> int:
  """A scalar, or a per-layer array whose entries are all equal."""
  if isinstance(value, np.ndarray | list):
    values = {int(v) for v in value}
    if len(values) != 1:
      raise NotImplementedError(f"{path}: per-layer {what} {sorted(values)} is not supported")
    return values.pop()
  return int(value)


def _eos_ids(f: GGUFFile) -> tuple[int, ...]:
  """EOS from the metadata, plus EOT and the end-of-turn token (106 on Gemma 3 and 4)."""
  ids = [int(f.get("tokenizer.ggml.eos_token_id", 1))]
  if "tokenizer.ggml.eot_token_id" in f.metadata:
    ids.append(int(f.get("tokenizer.ggml.eot_token_id")))
  tokens = f.get("tokenizer.ggml.tokens", [])
  ids += [i for i, t in enumerate(tokens[:256]) if t in END_OF_TURN]
  return tuple(dict.fromkeys(ids))


def _common(f: GGUFFile, name: str) -> dict[str, Any]:
  if "token_embd.weight" not in f.tensors:
    raise CheckpointError(f"{f.path}: no token_embd.weight tensor")
  ctx = int(f.arch("context_length", 131_072))
  return dict(
      name=name,
      vocab_size=int(f.tensors["token_embd.weight"].shape[0]),
      embed_dim=int(f.arch("embedding_length")),
      num_layers=int(f.arch("block_count")),
      num_heads=_int(f.arch("attention.head_count"), "head_count", f.path),
      rms_eps=float(f.arch("attention.layer_norm_rms_epsilon", 1e-6)),
      max_position_embeddings=ctx,
      pad_id=int(f.get("tokenizer.ggml.padding_token_id", 0)),
      bos_id=int(f.get("tokenizer.ggml.bos_token_id", 2)),
      eos_ids=_eos_ids(f),
      attn_softcap=float(f.arch("attn_logit_softcapping", 0.0)) or None,
      final_softcap=float(f.arch("final_logit_softcapping", 0.0)) or None,
  )


def _swa_layers(f: GGUFFile, n: int, default_period: int | None) -> list[bool]:
  """Per layer: True for sliding-window layers (`attention.sliding_window_pattern`)."""
  pattern = f.arch("attention.sliding_window_pattern", None)
  if pattern is None:
    if default_period is None:
      raise CheckpointError(f"{f.path}: no {f.architecture}.attention.sliding_window_pattern")
    pattern = default_period
  if isinstance(pattern, np.ndarray | list):
    if len(pattern) != n:
      raise CheckpointError(f"{f.path}: sliding_window_pattern has {len(pattern)} entries for "
                            f"{n} layers")
    return [bool(p) for p in pattern]
  period = int(pattern)  # llama.cpp set_swa_pattern: layer i is sliding iff i % period < period-1
  return [period <= 0 or i % period < period - 1 for i in range(n)]


def _rope_scaling(f: GGUFFile) -> tuple[str, float]:
  kind = str(f.arch("rope.scaling.type", "none"))
  factor = float(f.arch("rope.scaling.factor", 1.0) or 1.0)
  if kind == "none" or factor == 1.0:
    return "default", 1.0
  if kind != "linear":
    raise NotImplementedError(f"{f.path}: RoPE scaling {kind!r} is not supported (linear only)")
  return "linear", factor


def _gemma3_config(f: GGUFFile, name: str) -> ModelConfig:
  base = _common(f, name)
  n, d, heads = base["num_layers"], base["embed_dim"], base["num_heads"]
  head_dim = int(f.arch("attention.key_length", 256))
  if int(f.arch("attention.value_length", head_dim)) != head_dim:
    raise NotImplementedError(f"{f.path}: value_length != key_length")
  window = int(f.arch("attention.sliding_window", 0) or 0)
  swa = _swa_layers(f, n, GEMMA3_PERIOD) if window else [False] * n
  kind, factor = _rope_scaling(f)
  return ModelConfig(
      **base,
      num_kv_heads=_int(f.arch("attention.head_count_kv"), "head_count_kv", f.path),
      head_dim=head_dim,
      ffn_dim=_int(f.arch("feed_forward_length"), "feed_forward_length", f.path),
      layer_types=tuple(AttentionType.LOCAL if s else AttentionType.GLOBAL for s in swa),
      sliding_window=window or base["max_position_embeddings"],
      rope_local=RopeConfig(theta=float(f.arch("rope.freq_base_swa", GEMMA3_LOCAL_THETA))),
      # llama.cpp scales (freq_scale) global layers only, as the reference's rope_scaling does
      rope_global=RopeConfig(theta=float(f.arch("rope.freq_base", 1_000_000.0)), kind=kind,
                             factor=factor),
      # gemma_pytorch / llama.cpp: the 27B (62 layers) scales by hidden / heads, not head_dim
      query_pre_attn_scalar=float(d // heads if n == 62 else head_dim),
      norm_plus_one=True,
      use_v_norm=False,
      use_layer_scalar=False,
  )


def _global_rope(f: GGUFFile, head_dim: int, theta: float) -> RopeConfig:
  """Proportional RoPE of Gemma 4 global layers, read back from the `rope_freqs` factors."""
  if "rope_freqs.weight" not in f.tensors:
    raise CheckpointError(f"{f.path}: no rope_freqs.weight (Gemma 4 global-layer RoPE factors)")
  factors = f.load("rope_freqs.weight").reshape(-1)
  rotated = int(np.sum(factors == 1.0))
  if (factors.size != head_dim // 2 or not np.all(factors[:rotated] == 1.0)
      or not np.all(factors[rotated:] >= 1e29)):
    raise NotImplementedError(f"{f.path}: rope_freqs is not a proportional-RoPE mask "
                              "(1 for rotated pairs, then 1e30)")
  return RopeConfig(theta=theta, kind="proportional", partial_rotary_factor=2 * rotated / head_dim)


def _gemma4_config(f: GGUFFile, name: str) -> ModelConfig:
  base = _common(f, name)
  n = base["num_layers"]
  swa = _swa_layers(f, n, None)
  types = tuple(AttentionType.LOCAL if s else AttentionType.GLOBAL for s in swa)
  head_dim = int(f.arch("attention.key_length_swa", f.arch("attention.key_length")))
  global_head_dim = int(f.arch("attention.key_length"))
  if int(f.arch("rope.dimension_count_swa", head_dim)) != head_dim:
    raise NotImplementedError(f"{f.path}: partial RoPE on sliding layers is not supported")
  kv = f.arch("attention.head_count_kv")
  kv = [int(k) for k in kv] if isinstance(kv, np.ndarray | list) else [int(kv)] * n
  local_kv = {kv[i] for i in range(n) if swa[i]} or {kv[0]}
  global_kv = {kv[i] for i in range(n) if not swa[i]} or local_kv
  if len(local_kv) != 1 or len(global_kv) != 1:
    raise NotImplementedError(f"{f.path}: head_count_kv {kv} varies within a layer type")
  shared = int(f.arch("attention.shared_kv_layers", 0) or 0)
  globals_ = [i for i in range(n) if not swa[i]]
  has_v = [f"blk.{i}.attn_v.weight" in f.tensors for i in globals_ if i < n - shared]
  if len(set(has_v)) > 1:
    raise NotImplementedError(f"{f.path}: attn_v present on some global layers only")
  k_eq_v = bool(has_v) and not has_v[0]
  (num_kv,), (num_global_kv,) = local_kv, global_kv
  if num_global_kv != num_kv and not k_eq_v:
    raise NotImplementedError(f"{f.path}: global layers with {num_global_kv} KV heads and a V "
                              f"projection (local layers have {num_kv}) are not supported")
  ffn = f.arch("feed_forward_length")
  ffn_list = [int(x) for x in ffn] if isinstance(ffn, np.ndarray | list) else [int(ffn)] * n
  ffn_dim = ffn_list[0]
  double_wide = ffn_list != [ffn_dim] * n
  ple_dim = int(f.arch("embedding_length_per_layer_input", 0) or 0)
  experts = int(f.arch("expert_count", 0) or 0)
  kind, factor = _rope_scaling(f)
  if kind != "default":
    raise NotImplementedError(f"{f.path}: RoPE scaling on Gemma 4 is not supported")
  ple_table = f.tensors.get("per_layer_token_embd.weight")
  cfg = ModelConfig(
      **base,
      num_kv_heads=num_kv,
      head_dim=head_dim,
      ffn_dim=ffn_dim,
      layer_types=types,
      sliding_window=int(f.arch("attention.sliding_window")),
      rope_local=RopeConfig(theta=float(f.arch("rope.freq_base_swa", 10_000.0))),
      rope_global=_global_rope(f, global_head_dim, float(f.arch("rope.freq_base"))),
      global_head_dim=global_head_dim if global_head_dim != head_dim else None,
      num_global_kv_heads=num_global_kv if k_eq_v and num_global_kv != num_kv else None,
      k_eq_v=k_eq_v,
      num_kv_shared_layers=shared,
      double_wide_mlp=double_wide,
      ple_dim=ple_dim,
      ple_vocab_size=int(ple_table.shape[0]) if ple_dim and ple_table else 0,
      num_experts=experts,
      top_k_experts=int(f.arch("expert_used_count", 0) or 0) if experts else 0,
      moe_ffn_dim=int(f.arch("expert_feed_forward_length", 0) or 0) if experts else 0,
      query_pre_attn_scalar=None,
      norm_plus_one=False,
      use_v_norm=True,
      use_layer_scalar=any(t.endswith(".layer_output_scale.weight") for t in f.tensors),
  )
  if [s.ffn_dim for s in cfg.layers] != ffn_list:
    raise NotImplementedError(f"{f.path}: feed_forward_length {ffn_list} is not a Gemma 4 "
                              "double-wide pattern")
  return cfg


def read_config(f: GGUFFile, name: str | None = None) -> ModelConfig:
  """The ModelConfig of a parsed GGUF file (`gemma3` or `gemma4` architecture)."""
  name = name or f.path.stem
  arch = f.architecture
  if arch == "gemma3":
    return _gemma3_config(f, name)
  if arch == "gemma4":
    return _gemma4_config(f, name)
  raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")


# ------------------------------------------------------------------------------- name table
# llama.cpp tensor names (gguf.constants.TENSOR_NAMES; tests check every row against them).
B = r"blk\.(\d+)\."


def _rows(norm):
  """Rows shared by Gemma 3 and 4; `norm` is the transform of every norm scale."""
  return [
      (r"token_embd\.weight", ("embed",), same),
      (r"output_norm\.weight", ("final_norm",), norm),
      (B + r"attn_norm\.weight", ("layers.{0}.attn_pre_norm",), norm),
      (B + r"post_attention_norm\.weight", ("layers.{0}.attn_post_norm",), norm),
      (B + r"ffn_norm\.weight", ("layers.{0}.mlp_pre_norm",), norm),
      (B + r"post_ffw_norm\.weight", ("layers.{0}.mlp_post_norm",), norm),
      (B + r"attn_q\.weight", ("layers.{0}.attn.q",), linear),
      (B + r"attn_k\.weight", ("layers.{0}.attn.k",), linear),
      (B + r"attn_v\.weight", ("layers.{0}.attn.v",), linear),
      (B + r"attn_output\.weight", ("layers.{0}.attn.o",), linear),
      (B + r"attn_q_norm\.weight", ("layers.{0}.attn.q_norm",), norm),
      (B + r"attn_k_norm\.weight", ("layers.{0}.attn.k_norm",), norm),
      (B + r"ffn_gate\.weight", ("layers.{0}.mlp.gate",), linear),
      (B + r"ffn_up\.weight", ("layers.{0}.mlp.up",), linear),
      (B + r"ffn_down\.weight", ("layers.{0}.mlp.down",), linear),
  ]


GEMMA3_TABLE = RegexTable(_rows(minus_one))  # stored 1 + w; our (1 + w) norm wants w
GEMMA4_TABLE = RegexTable(_rows(same) + [
    (r"rope_freqs\.weight", None, "RoPE frequency factors (read into the config)"),
    (r"per_layer_token_embd\.weight", ("ple_embed",), same),
    (r"per_layer_model_proj\.weight", ("ple_proj",), linear),
    (r"per_layer_proj_norm\.weight", ("ple_norm",), same),
    (B + r"layer_output_scale\.weight", ("layers.{0}.scalar",), same),
    (B + r"inp_gate\.weight", ("layers.{0}.ple.gate",), linear),
    (B + r"proj\.weight", ("layers.{0}.ple.proj",), linear),
    (B + r"post_norm\.weight", ("layers.{0}.ple.norm",), same),
    (B + r"ffn_gate_inp\.weight", ("layers.{0}.moe.router",), linear),
    (B + r"ffn_gate_inp\.scale", ("layers.{0}.moe.router_scale",), same),
    (B + r"ffn_down_exps\.scale", ("layers.{0}.moe.expert_scale",), same),
    (B + r"ffn_gate_up_exps\.weight", ("layers.{0}.moe.gate", "layers.{0}.moe.up"),
     split_gate_up),
    # separate expert gate/up [E, I, D] (llama.cpp's loader accepts either form)
    (B + r"ffn_gate_exps\.weight", ("layers.{0}.moe.gate",), swap_last),
    (B + r"ffn_up_exps\.weight", ("layers.{0}.moe.up",), swap_last),
    (B + r"ffn_down_exps\.weight", ("layers.{0}.moe.down",), swap_last),
    (B + r"pre_ffw_norm_2\.weight", ("layers.{0}.moe.pre_norm",), same),
    (B + r"post_ffw_norm_1\.weight", ("layers.{0}.moe.dense_post_norm",), same),
    (B + r"post_ffw_norm_2\.weight", ("layers.{0}.moe.post_norm",), same),
])
TABLES = {"gemma3": GEMMA3_TABLE, "gemma4": GEMMA4_TABLE}


def table(arch: str) -> RegexTable:
  try:
    return TABLES[arch]
  except KeyError:
    raise CheckpointError(f"GGUF architecture {arch!r} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})") from None



def load(path: str | Path, dtype, cfg: ModelConfig | None = None,
         finish: Finish | None = None, mesh=None) -> tuple[ModelConfig, Params]:
  """Loads a Gemma 3 / Gemma 4 GGUF file. Returns (config, params cast to dtype).

  Tensors are dequantized to float32 one at a time and cast on the way (peak host memory stays
  near the output size plus the largest tensor). Tokenizer metadata is not a tensor: see
  `gemma.io.tokenizer_gguf.tokenizer_from_gguf`. With a `mesh`, each process still reads and
  dequantizes whole tensors (quantized blocks span rows), then puts only the slices its devices
  own in place (`common.assemble`).
  """
  f = GGUFFile(path)
  cfg = cfg or read_config(f)
  return cfg, assemble(cfg, f.iter_tensors(), table(f.architecture), dtype, source=str(path),
                       finish=finish, mesh=mesh)

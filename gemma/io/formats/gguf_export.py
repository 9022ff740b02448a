"""Export to GGUF (llama.cpp): the inverse of gemma/io/formats/gguf.py.

    path, notes = export_gguf(params, cfg, "model.gguf", type="q8_0", tokenizer_source=src)

Tensors: the loader's own name table run backwards (`gguf.GEMMA3_TABLE` / `GEMMA4_TABLE`
through `inverse.source_tensors`), from `inverse.named_arrays` (fused projections split,
quantized weights dequantized, float32). Metadata: what `gguf.read_config` reads and llama.cpp's
`gemma3` / `gemma4` loaders need (the keys of llama.cpp's converter, `Gemma3Model` /
`Gemma4Model`), plus the tokenizer (gemma/io/formats/gguf_vocab.py).

Before anything is written, the metadata is read back by `gguf.read_config` itself: a config
field the file cannot express (Gemma 3's `query_pre_attn_scalar` other than llama.cpp's rule, a
layer pattern other than every 6th layer global, soft-capping llama.cpp does not apply, ...) is
a ValueError naming the field, its value and what the file would say instead.

Types (as llama.cpp's converter stores them): 1-D tensors (norms, scales, `rope_freqs`) and the
MoE router stay float32 at every type; the other tensors are f32, f16 or bf16 (round to nearest
even), or q8_0: blocks of 32 along the rows, one float16 scale `d = max|x| / 127` and 32 int8
`round(x / d)` each, so |error| <= d/2 (+ 127 x the float16 rounding of d). A tensor whose rows
are not whole blocks of 32 falls back to f16, as llama.cpp's converter does. Gemma 3 norm scales
are stored as `1 + w` (llama.cpp's layout), so even at f32 they are rounded once (<= half a float32
ulp of 1 + w); everything else is bit-exact at f32.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from gemma.io.atomic import OutputError, OutputExists, atomic_file
from gemma.io.formats import gguf as G
from gemma.io.formats.common import progress
from gemma.io.formats.gguf_file import _SCALARS, GGUFFile, TensorInfo
from gemma.io.formats.gguf_vocab import write_tokenizer
from gemma.io.formats.inverse import named_arrays, source_tensors
from gemma.model.config import AttentionType, ModelConfig

TYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
_KEEP_F32 = ("ffn_gate_inp.weight",)  # the MoE router (llama.cpp's converter keeps it F32)
# config fields that are not the model's function (reported, never refused)
_NOT_COMPARED = ("name", "eos_ids", "bos_id", "pad_id", "attention_impl", "attention_block")


def _gguf():
  import gguf

  return gguf


def architecture(cfg: ModelConfig) -> str:
  """The llama.cpp architecture of a config: `gemma3` ((1 + w) norms) or `gemma4`."""
  return "gemma3" if cfg.norm_plus_one else "gemma4"


# ---------------------------------------------------------------------------------- metadata
def _gemma3_keys(w, cfg: ModelConfig) -> None:
  gguf = _gguf()
  w.add_feed_forward_length(cfg.ffn_dim)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  if any(t is AttentionType.LOCAL for t in cfg.layer_types):
    w.add_sliding_window(cfg.sliding_window)
    if cfg.rope_local.theta != G.GEMMA3_LOCAL_THETA:
      w.add_rope_freq_base_swa(cfg.rope_local.theta)
  elif cfg.final_softcap:  # llama.cpp caps the logits of gemma3 only without sliding layers
    w.add_final_logit_softcapping(cfg.final_softcap)
  if cfg.rope_global.kind == "linear" and cfg.rope_global.factor != 1.0:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_global.factor)


def _gemma4_keys(w, cfg: ModelConfig) -> np.ndarray:
  """Gemma 4 keys (llama.cpp's `Gemma4Model.set_gguf_parameters`); returns `rope_freqs`."""
  swa = [t is AttentionType.LOCAL for t in cfg.layer_types]
  ghd = cfg.global_head_dim or cfg.head_dim
  w.add_rope_freq_base_swa(cfg.rope_local.theta)
  if cfg.final_softcap:
    w.add_final_logit_softcapping(cfg.final_softcap)
  w.add_sliding_window(cfg.sliding_window)
  w.add_shared_kv_layers(cfg.num_kv_shared_layers)
  w.add_embedding_length_per_layer_input(cfg.ple_dim)
  w.add_sliding_window_pattern(swa)
  w.add_key_length(ghd)
  w.add_value_length(ghd)
  w.add_key_length_swa(cfg.head_dim)
  w.add_value_length_swa(cfg.head_dim)
  w.add_rope_dimension_count(ghd)
  w.add_rope_dimension_count_swa(cfg.head_dim)
  if cfg.num_experts:
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.top_k_experts)
    w.add_expert_feed_forward_length(cfg.moe_ffn_dim)
  if cfg.double_wide_mlp:
    w.add_feed_forward_length([s.ffn_dim for s in cfg.layers])
  else:
    w.add_feed_forward_length(cfg.ffn_dim)
  if len({s.num_kv_heads for s in cfg.layers}) > 1:
    w.add_head_count_kv([s.num_kv_heads for s in cfg.layers])
  else:
    w.add_head_count_kv(cfg.num_kv_heads)
  # proportional RoPE of global layers: factor 1 for the rotated pairs, 1e30 for the others
  rotated = int(cfg.rope_global.partial_rotary_factor * ghd // 2)
  return np.asarray([1.0] * rotated + [1e30] * (ghd // 2 - rotated), np.float32)


def _read_view(value):
  """A writer value (GGUFValue) as gguf_file.GGUFFile parses it back."""
  gguf = _gguf()
  t, v = value.type, value.value
  if t == gguf.GGUFValueType.FLOAT32:
    return float(str(np.float32(v)))
  if t == gguf.GGUFValueType.ARRAY:
    sub = value.sub_type or gguf.GGUFValueType.get_type(v[0])
    if sub == gguf.GGUFValueType.STRING:
      return list(v)
    return np.asarray(v, np.dtype(_SCALARS[int(sub)][1]))
  return v


def llama_cpp_limits(cfg: ModelConfig) -> list[str]:
  """What llama.cpp's runtime assumes beyond the file (our loader reads such files back)."""
  out = []
  if cfg.ple_dim and cfg.ple_vocab_size != cfg.vocab_size:
    out.append(f"the per-layer embedding table must have the vocabulary's rows "
               f"(ple_vocab_size={cfg.ple_vocab_size}, vocab_size={cfg.vocab_size})")
  first = cfg.num_layers - cfg.num_kv_shared_layers
  if cfg.num_kv_shared_layers:
    # llama.cpp (`layer_reuse_cb` of gemma3n/gemma4): a KV-shared sliding layer reads layer
    # first - 2, a KV-shared global layer layer first - 1
    want = {s.index: first - (2 if s.window is not None else 1) for s in cfg.layers
            if s.shares_kv}
    got = {s.index: s.kv_source for s in cfg.layers if s.shares_kv}
    if want != got:
      out.append(f"KV sharing: llama.cpp's KV-shared layers read layer {first - 1} (global) "
                 f"and {first - 2} (sliding), so the last non-shared layer must be global and "
                 f"the one before it sliding; this config's layers {sorted(got)} read "
                 f"{[got[i] for i in sorted(got)]}")
  return out


def _check_expressible(w, cfg: ModelConfig, arch: str, shapes: dict, rope_freqs) -> None:
  """Reads the metadata back with `gguf.read_config`; refuses what the file would change."""
  if cfg.attn_softcap:
    raise ValueError(f"GGUF {arch}: llama.cpp's {arch} architecture has no attention-logit "
                     f"soft-capping (attn_softcap={cfg.attn_softcap})")
  view = GGUFFile.__new__(GGUFFile)  # the header only: metadata and tensor shapes
  view.path = Path(f"<{arch} export>")
  view.metadata = {k: _read_view(v) for k, v in w.kv_data[0].items()}
  view.tensors = {n: TensorInfo(n, s, 0, 0, 0) for n, s in shapes.items()}
  view.load = lambda name: rope_freqs
  try:
    back = G.read_config(view, cfg.name)
  except (NotImplementedError, G.CheckpointError) as e:
    raise ValueError(f"GGUF {arch} cannot express this config: {e}") from None
  keep = {f: getattr(cfg, f) for f in _NOT_COMPARED}
  back = dataclasses.replace(back, **keep)
  diff = [f"{f.name}={getattr(cfg, f.name)!r} (the file says {getattr(back, f.name)!r})"
          for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(back, f.name)]
  if diff:
    raise ValueError(f"GGUF {arch} (llama.cpp's {arch} architecture) cannot express this "
                     f"config: {'; '.join(diff)}")


def _metadata(w, cfg: ModelConfig, arch: str) -> np.ndarray | None:
  w.add_name(cfg.name)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.embed_dim)
  w.add_block_count(cfg.num_layers)
  w.add_head_count(cfg.num_heads)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_rope_freq_base(cfg.rope_global.theta)
  if arch == "gemma3":
    _gemma3_keys(w, cfg)
    return None
  return _gemma4_keys(w, cfg)


# ----------------------------------------------------------------------------------- tensors
def _qtype(name: str, shape: tuple[int, ...], type: str):
  gguf = _gguf()
  q = gguf.GGMLQuantizationType
  if len(shape) <= 1 or name.endswith(_KEEP_F32) or type == "f32":
    return q.F32
  if type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
    return q.F16  # rows not whole blocks: llama.cpp's converter falls back to F16
  return {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[type]


def _encode(a: np.ndarray, qtype) -> np.ndarray:
  gguf = _gguf()
  q = gguf.GGMLQuantizationType
  if qtype == q.F32:
    return np.ascontiguousarray(a, np.float32)
  if qtype == q.F16:
    return np.ascontiguousarray(a, np.float16)
  return gguf.quants.quantize(np.ascontiguousarray(a, np.float32), qtype)


class _Rounding:
  """What the chosen type rounds: counts and the largest absolute change, per stored type."""

  def __init__(self):
    self.count: dict[str, int] = {}
    self.worst: dict[str, float] = {}

  def add(self, a: np.ndarray, stored: np.ndarray, qtype) -> None:
    gguf = _gguf()
    if qtype == gguf.GGMLQuantizationType.F32:
      return
    back = gguf.quants.dequantize(stored, qtype).reshape(a.shape)
    err = float(np.max(np.abs(back.astype(np.float32) - a))) if a.size else 0.0
    self.count[qtype.name] = self.count.get(qtype.name, 0) + 1
    self.worst[qtype.name] = max(self.worst.get(qtype.name, 0.0), err)

  def notes(self, type: str) -> list[str]:
    what = {"F16": "float16 (round to nearest even)",
            "BF16": "bfloat16 (round to nearest even)",
            "Q8_0": "q8_0 (blocks of 32, scale d = max|x|/127 in float16: |error| <= d/2 + "
                    "127 x d's float16 rounding)"}
    out = [f"{n} tensors stored as {what[k]}: values rounded, largest change {self.worst[k]:.3g}"
           for k, n in sorted(self.count.items())]
    if type == "q8_0" and "F16" in self.count:
      out.append("q8_0: tensors whose rows are not whole blocks of 32 are stored as F16 "
                 "(llama.cpp's converter does the same)")
    if type != "f32":
      out.append("1-D tensors (norms, scales) and the MoE router are kept in float32")
    return out


# ------------------------------------------------------------------------------------ export
def check_out(out_file, force: bool) -> Path:
  """The absolute output path; refuses a directory, a path under a file, and an existing file
  without `force` (before any work)."""
  out = Path(out_file).absolute()
  for parent in out.parents:
    if parent.exists():
      if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a directory")
      break
  if out.is_dir():
    raise OutputError(f"cannot write the GGUF file {out}: it is a directory")
  if out.exists() and not force:
    raise OutputExists(f"{out} already exists (pass --force to replace it)")
  return out


def export_gguf(params, cfg: ModelConfig, out_file, *, type: str = "f32", tokenizer=None,
                tokenizer_source=None, force: bool = False, strict: bool = True
                ) -> tuple[Path, list[str]]:
  """Writes `params` as a GGUF file llama.cpp runs and `gemma.io.checkpoint.load` reads back.

  `type`: f32 | f16 | bf16 | q8_0 (see the module docstring for what each rounds).
  `tokenizer` / `tokenizer_source`: see `gguf_vocab.write_tokenizer` (a GGUF source's tokenizer
  metadata is copied; a SentencePiece model is written as pieces, scores and types).
  `strict=False` writes a config llama.cpp's runtime cannot run although the file expresses it
  (`llama_cpp_limits`: our loader reads it back exactly; llama.cpp does not) with a note.
  Returns (path, notes): what the export lost (dequantized weights, casts, rounding, tokenizer).
  Raises ValueError for a config the `gemma3` / `gemma4` architecture cannot express and
  `gemma.io.atomic.OutputExists` for an existing file without `force`; the file appears
  complete or not at all.
  """
  gguf = _gguf()
  if type not in TYPES:
    raise ValueError(f"unknown GGUF type {type!r}; expected one of {', '.join(TYPES)}")
  out = check_out(out_file, force)
  arch = architecture(cfg)
  w = gguf.GGUFWriter(None, arch)
  rope_freqs = _metadata(w, cfg, arch)
  named, notes = named_arrays(params, cfg, np.float32)
  tensors = list(source_tensors(G.table(arch), named))
  if rope_freqs is not None:
    tensors.insert(0, ("rope_freqs.weight", rope_freqs))
  shapes = {n: tuple(a.shape) for n, a in tensors}
  _check_expressible(w, cfg, arch, shapes, rope_freqs)
  limits = llama_cpp_limits(cfg)
  if limits and strict:
    raise ValueError(f"llama.cpp's {arch} runtime cannot run this config: {'; '.join(limits)} "
                     "(strict=False, `gemma4 export --any-config`, writes it anyway, for our "
                     "own loader)")
  notes += [f"llama.cpp will not run this file: {m}" for m in limits]
  notes += write_tokenizer(w, cfg.vocab_size, tokenizer, tokenizer_source)
  w.add_file_type(_FILE_TYPES[type])
  if type == "q8_0":
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  qtypes = [_qtype(n, a.shape, type) for n, a in tensors]
  for (name, a), qtype in zip(tensors, qtypes, strict=True):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = a.size // block * size
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      w.add_tensor_info(name, a.shape, np.dtype(np.float16 if qtype.name == "F16" else
                                                np.float32), nbytes)
    else:
      byte_shape = gguf.quants.quant_shape_to_byte_shape(a.shape, qtype)
      w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
  rounding = _Rounding()
  print(f"writing {out} ({arch}, {type}, {len(tensors)} tensors)", file=sys.stderr, flush=True)
  with atomic_file(out, "wb") as f:
    w.fout, w.path = [f], out
    w.state = gguf.gguf_writer.WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, ((name, a), qtype) in enumerate(zip(tensors, qtypes, strict=True)):
      stored = _encode(a, qtype)
      rounding.add(a, stored, qtype)
      w.write_tensor_data(stored)
      progress(i + 1, len(tensors), "writing tensors", name)
  if arch == "gemma3":
    notes.append("Gemma 3 norm scales are stored as 1 + w (llama.cpp's layout): rounded once "
                 "in float32 (<= half an ulp of 1 + w)")
  notes += rounding.notes(type)
  return out, notes

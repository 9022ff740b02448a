"""Gemma 3 text models: config.json parsing and parity with the reference (HF `models/gemma3`).

The fixture (tests/fixtures/gemma3, made by scripts/make_gemma3_fixtures.py) is a tiny
random-weight Gemma3ForCausalLM with float64 reference logits. Bar as for Gemma 4:
max|dlogits| / max|logits| <= 1e-4 in float32, identical greedy tokens, the cache path equal to
a full forward, and bfloat16 error within 1.5x of the reference's own bfloat16 error.
"""

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.inference.decode import decode_step, generate, prefill
from gemma.inference.sampling import Sampler
from gemma.io.formats import hf
from gemma.io.formats.hf_config import from_hf_gemma3_config, is_gemma3_config
from gemma.kv.cache import init_cache
from gemma.model import config as C
from gemma.model import params as P
from gemma.model.transformer import forward
from tests.conftest import fixture_dir

G, Lo = C.AttentionType.GLOBAL, C.AttentionType.LOCAL
FIXTURE = Path(fixture_dir("gemma3"))


def _globals(cfg):
  return [i for i, t in enumerate(cfg.layer_types) if t is G]


def _load(dtype, path=FIXTURE):
  cfg = from_hf_gemma3_config(json.loads((path / "config.json").read_text()), name=path.name)
  return hf.load(path, dtype, cfg)


@pytest.fixture(scope="module")
def ref():
  return np.load(FIXTURE / "reference.npz")


@pytest.fixture(scope="module")
def f32_model():
  return _load(jnp.float32)


def _prompt_logits(cfg, params, ids):
  tokens = jnp.asarray(ids, jnp.int32)[None]
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  logits, _ = jax.jit(forward, static_argnames="cfg")(params, tokens, positions, cfg)
  return np.asarray(logits[0])


def _rel_err(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------------------------ parity
def test_fixture_config_is_parsed_as_written(f32_model):
  cfg, _ = f32_model
  assert cfg.layer_types == (Lo,) * 5 + (G, Lo)  # the last layer stays local
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim) == (8, 2, 16, 96)
  assert cfg.attn_scale == pytest.approx(24 ** -0.5) and cfg.sliding_window == 8
  assert cfg.rope_local == C.RopeConfig(theta=1e4)
  assert cfg.rope_global == C.RopeConfig(theta=1e6, kind="linear", factor=2.0)
  assert cfg.norm_plus_one and not cfg.use_v_norm and not cfg.use_layer_scalar
  assert cfg.final_softcap is None and cfg.attn_softcap is None and cfg.eos_ids == (1,)


def test_logits_match_reference(f32_model, ref):
  cfg, params = f32_model
  logits = _prompt_logits(cfg, params, ref["prompt_ids"])
  assert logits.shape == ref["logits"].shape
  err = _rel_err(logits, ref["logits"])
  assert err <= 1e-4, err


def test_bf16_error_is_that_of_the_reference_in_bf16(ref):
  cfg, params = _load(jnp.bfloat16)
  logits = _prompt_logits(cfg, params, ref["prompt_ids"])
  ours = _rel_err(logits, ref["logits"])
  theirs = _rel_err(ref["logits_bf16"], ref["logits"])
  assert np.isfinite(ours) and ours <= 1.5 * theirs, (ours, theirs)


def test_greedy_matches_reference(f32_model, ref):
  cfg, params = f32_model
  n = len(ref["greedy_ids"])
  out = generate(params, cfg, [list(map(int, ref["prompt_ids"]))], n, eos_ids=())
  assert out.tokens[0] == [int(t) for t in ref["greedy_ids"]]


@pytest.mark.parametrize("chunks", [(28,), (11, 17)])
def test_cache_path_matches_reference(f32_model, ref, chunks):
  """Prefill chunks (wrapping the window-8 rings) then one decode step per greedy token."""
  cfg, params = f32_model
  tokens = np.concatenate([ref["prompt_ids"], ref["greedy_ids"]]).astype(np.int32)[None]
  t = len(ref["prompt_ids"])
  assert sum(chunks) == t
  cache = init_cache(cfg, 1, tokens.shape[1], jnp.float32)
  start = 0
  for size in chunks:
    positions = np.arange(start, start + size, dtype=np.int32)[None]
    logits, cache = prefill(params, cfg, tokens[:, start:start + size], positions, cache)
    start += size
  out = [np.asarray(logits)]
  for i in range(t, tokens.shape[1]):
    _, logits, cache = decode_step(params, jnp.asarray(tokens[:, i]), cache, jax.random.key(0),
                                   cfg, Sampler())
    out.append(np.asarray(logits))
  cached = np.stack(out, axis=1)[0]
  expected = ref["full_logits"][t - 1:]
  err = _rel_err(cached, expected)
  assert err <= 1e-4, err


def _multimodal_copy(tmp_path):
  """The fixture re-saved in the layout of Gemma3ForConditionalGeneration.save_pretrained
  (transformers 5.24): `language_model.model.` text prefix, vision tower, projector."""
  from safetensors.numpy import load_file, save_file

  tensors = load_file(FIXTURE / "model.safetensors")
  out = {"language_model." + k: v for k, v in tensors.items()}
  out["vision_tower.embeddings.patch_embedding.weight"] = np.zeros((4, 3, 2, 2), np.float32)
  out["multi_modal_projector.mm_input_projection_weight"] = np.zeros((4, 64), np.float32)
  out["multi_modal_projector.mm_soft_emb_norm.weight"] = np.zeros((4,), np.float32)
  save_file(out, tmp_path / "model.safetensors")
  text = json.loads((FIXTURE / "config.json").read_text())
  top = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
         "text_config": text, "eos_token_id": [1, 106], "tie_word_embeddings": True,
         "vision_config": {"model_type": "siglip_vision_model"}}
  (tmp_path / "config.json").write_text(json.dumps(top))
  return tmp_path


def test_multimodal_layout_loads_the_same_text_model(f32_model, ref, tmp_path):
  cfg, params = _load(jnp.float32, _multimodal_copy(tmp_path))
  assert cfg.eos_ids == (1, 106)
  logits = _prompt_logits(cfg, params, ref["prompt_ids"])
  np.testing.assert_array_equal(logits, _prompt_logits(*f32_model, ref["prompt_ids"]))


# ------------------------------------------------------------------------- config.json
def _gemma3_1b_it():
  """google/gemma-3-1b-it config.json (transformers 4.50 era: no layer_types; pattern 6)."""
  return {
      "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
      "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
      "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
      "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
      "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
      "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
      "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
      "vocab_size": 262144}


def _gemma3_4b_it():
  """google/gemma-3-4b-it config.json: multimodal, a sparse text_config (the rest defaults)."""
  return {
      "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
      "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256,
      "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                      "model_type": "gemma3_text", "num_hidden_layers": 34,
                      "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                      "sliding_window": 1024},
      "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152}}


def _gemma3_270m_v5():
  """Gemma 3 270M (facts from its GGUF) as transformers 5 writes it."""
  types = ["full_attention" if i in (5, 11, 17) else "sliding_attention" for i in range(18)]
  return {
      "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
      "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
      "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
      "sliding_window": 512, "layer_types": types, "_sliding_window_pattern": 6,
      "rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                          "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
      "final_logit_softcapping": None, "attn_logit_softcapping": None, "rms_norm_eps": 1e-6,
      "eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": True,
      "use_bidirectional_attention": False}


def test_released_1b_config_without_layer_types():
  cfg = from_hf_gemma3_config(_gemma3_1b_it(), "gemma-3-1b-it")
  assert _globals(cfg) == [5, 11, 17, 23] and cfg.layer_types[-1] is Lo  # nothing forced
  assert (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (1152, 4, 1, 256)
  assert cfg.sliding_window == 512 and cfg.max_position_embeddings == 32768
  assert cfg.rope_global == C.RopeConfig(1e6) and cfg.rope_local == C.RopeConfig(1e4)
  assert cfg.attn_scale == 1 / 16 and cfg.eos_ids == (1, 106) and cfg.final_softcap is None
  assert all(s.window == 512 for s in cfg.layers if s.attention is Lo)


def test_released_4b_multimodal_config_takes_reference_defaults():
  cfg = from_hf_gemma3_config(_gemma3_4b_it())
  assert cfg.num_layers == 34 and _globals(cfg) == [5, 11, 17, 23, 29]
  # absent from text_config: Gemma3TextConfig defaults
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 256, 262208)
  assert cfg.query_pre_attn_scalar == 256 and cfg.rms_eps == 1e-6
  # legacy rope_scaling: global layers only
  assert cfg.rope_global == C.RopeConfig(1e6, kind="linear", factor=8.0)
  assert cfg.rope_local == C.RopeConfig(1e4)
  assert cfg.eos_ids == (1, 106)  # the top-level (generation) EOS list wins


def test_270m_config_in_transformers5_form():
  cfg = from_hf_gemma3_config(_gemma3_270m_v5(), "gemma-3-270m")
  assert _globals(cfg) == [5, 11, 17] and cfg.sliding_window == 512
  assert (cfg.embed_dim, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads) == (640, 2048, 4, 1)
  assert cfg.rope_global.theta == 1e6 and cfg.rope_local.theta == 1e4
  assert cfg.eos_ids == (1,) and cfg.attn_scale == 1 / 16
  assert 265e6 < P.count(P.abstract(cfg)) < 270e6  # "270M"
  hash(cfg)


def test_rope_parameters_and_legacy_keys_agree():
  legacy = _gemma3_4b_it()["text_config"]
  v5 = {k: v for k, v in legacy.items() if k != "rope_scaling"}
  v5["rope_parameters"] = {
      "full_attention": {"factor": 8.0, "rope_theta": 1e6, "rope_type": "linear"},
      "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}
  assert from_hf_gemma3_config(v5) == from_hf_gemma3_config(legacy)
  # rope_theta / rope_local_base_freq fill what rope_parameters leaves out
  partial = dict(v5, rope_theta=5e5, rope_local_base_freq=2e4,
                 rope_parameters={"full_attention": {"rope_type": "default"}})
  cfg = from_hf_gemma3_config(partial)
  assert cfg.rope_global == C.RopeConfig(5e5) and cfg.rope_local == C.RopeConfig(2e4)


def test_is_gemma3_config():
  assert is_gemma3_config(_gemma3_1b_it()) and is_gemma3_config(_gemma3_4b_it())
  assert is_gemma3_config({"text_config": {"model_type": "gemma3_text"}})
  for other in ("gemma4", "gemma4_text", "gemma3n", "gemma3n_text", "gemma2"):
    assert not is_gemma3_config({"model_type": other})
    assert not is_gemma3_config({"model_type": other, "text_config": {"model_type": other}})
  assert not is_gemma3_config(json.loads(Path(fixture_dir("e_style"), "config.json").read_text()))


@pytest.mark.parametrize("change, error, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, NotImplementedError, "yarn"),
    ({"use_bidirectional_attention": True}, NotImplementedError, "bidirectional"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, ValueError, "keyed by layer"),
    ({"layer_types": ["sliding_attention"] * 3}, ValueError, "3 layer_types for 26 layers"),
    ({"layer_types": ["chunked_attention"] * 26}, ValueError, "unknown layer type"),
    ({"hidden_activation": "gelu"}, NotImplementedError, "gelu_pytorch_tanh"),
    ({"tie_word_embeddings": False}, NotImplementedError, "tie_word_embeddings"),
])
def test_unsupported_configs_are_errors(change, error, match):
  hf_cfg = copy.deepcopy(_gemma3_1b_it())
  hf_cfg.update(change)
  with pytest.raises(error, match=match):
    from_hf_gemma3_config(hf_cfg)


def test_not_gemma3_is_an_error():
  with pytest.raises(ValueError, match="not a Gemma 3 config"):
    from_hf_gemma3_config({"model_type": "gemma4_text"})

import dataclasses
import json

import pytest

from gemma.io.formats.hf_config import from_hf_config
from gemma.model import config as C
from tests.conftest import fixture_dir

G, Lo = C.AttentionType.GLOBAL, C.AttentionType.LOCAL


def test_presets_have_published_structure():
  e2b = C.get_preset("gemma4-e2b")
  assert [i for i, t in enumerate(e2b.layer_types) if t is G] == [4, 9, 14, 19, 24, 29, 34]
  assert e2b.sliding_window == 512 and e2b.final_softcap == 30.0
  specs = e2b.layers
  assert {s.kv_source for s in specs[15:] if s.attention is Lo} == {13}
  assert {s.kv_source for s in specs[15:] if s.attention is G} == {14}
  assert [s.ffn_dim for s in specs] == [6144] * 15 + [12288] * 20
  assert specs[4].head_dim == 512 and specs[3].head_dim == 256
  assert e2b.rope_global == C.RopeConfig(1e6, "proportional", 0.25)
  assert e2b.rope_local == C.RopeConfig(1e4)
  e4b = C.get_preset("gemma4-e4b")
  assert {s.kv_source for s in e4b.layers[24:]} == {22, 23}
  assert all(s.ffn_dim == 10240 for s in e4b.layers)
  big = C.get_preset("gemma4-31b")
  assert [i for i, t in enumerate(big.layer_types) if t is G] == list(range(5, 60, 6))
  assert big.sliding_window == 1024
  glob = big.layers[5]
  assert glob.k_eq_v and glob.num_kv_heads == 4 and glob.head_dim == 512
  assert not big.layers[4].k_eq_v and big.layers[4].num_kv_heads == 16
  moe = C.get_preset("gemma4-26b-a4b")
  assert (moe.num_experts, moe.top_k_experts, moe.moe_ffn_dim, moe.ffn_dim) == (128, 8, 704, 2112)
  for cfg in C.PRESETS.values():
    assert cfg.eos_ids == (1, 106) and cfg.attn_scale == 1.0
    assert cfg.layer_types[-1] is G
    hash(cfg)  # static under jit


def test_unknown_preset_lists_valid_names():
  with pytest.raises(ValueError, match="gemma4-e2b, gemma4-e4b, gemma4-26b-a4b, gemma4-31b"):
    C.get_preset("gemma4-e3b")


def test_ablation_by_replace():
  cfg = dataclasses.replace(C.get_preset("gemma4-e2b"), num_kv_shared_layers=0)
  assert all(not s.shares_kv for s in cfg.layers)
  assert all(s.ffn_dim == 6144 for s in cfg.layers)


def _released_e2b_json():
  """The released E2B text_config (flat global_head_dim; no per_layer_config)."""
  types = ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(35)]
  text = dict(
      num_hidden_layers=35, hidden_size=1536, num_attention_heads=8, num_key_value_heads=1,
      head_dim=256, global_head_dim=512, intermediate_size=6144, use_double_wide_mlp=True,
      num_kv_shared_layers=20, hidden_size_per_layer_input=256,
      vocab_size_per_layer_input=262144, layer_types=types, sliding_window=512,
      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                          "partial_rotary_factor": 0.25}},
      final_logit_softcapping=30.0, vocab_size=262144, rms_norm_eps=1e-6,
      max_position_embeddings=131072, attention_k_eq_v=False, enable_moe_block=False)
  return {"text_config": text, "eos_token_id": [1, 106]}


def test_from_hf_released_config_matches_preset():
  cfg = from_hf_config(_released_e2b_json())
  assert dataclasses.replace(cfg, name="gemma4-e2b") == C.get_preset("gemma4-e2b")


def test_from_hf_per_layer_config_wins():
  hf = json.load(open(f"{fixture_dir('dense_keqv')}/config.json"))
  cfg = from_hf_config(hf)
  glob = [s for s in cfg.layers if s.attention is G]
  assert glob and all(s.k_eq_v for s in glob)
  key = next(iter(hf["per_layer_config"]))
  override = hf["per_layer_config"][key]
  assert cfg.layers[int(key)].head_dim == override["head_dim"]
  assert cfg.layers[int(key)].num_kv_heads == override["num_key_value_heads"]
  # a flat field that disagrees is overridden by per_layer_config
  hf2 = dict(hf, global_head_dim=999)
  assert from_hf_config(hf2).layers[int(key)].head_dim == override["head_dim"]


def test_from_hf_bad_layer_type():
  hf = _released_e2b_json()
  hf["text_config"]["layer_types"][0] = "chunked_attention"
  with pytest.raises(ValueError, match="unknown layer type"):
    from_hf_config(hf)


def test_ple_defaults_on_when_key_missing():
  hf = _released_e2b_json()["text_config"]
  del hf["hidden_size_per_layer_input"]
  assert from_hf_config(hf).ple_dim == 256
  assert from_hf_config(dict(hf, hidden_size_per_layer_input=None)).ple_dim == 0


def test_proportional_rope_frequencies():
  freqs = C.rope_inv_freq(C.RopeConfig(1e6, "proportional", 0.25), 512)
  assert len(freqs) == 256
  assert freqs[0] == 1.0 and freqs[63] == pytest.approx(1e6 ** (-126 / 512))
  assert all(f == 0 for f in freqs[64:])


def test_named_ablations():
  from configs.ablations import ablate

  base = C.get_preset("gemma4-e2b")
  cfg = ablate(base, "no_kv_sharing", "no_ple")
  assert cfg.name == "gemma4-e2b+no_kv_sharing+no_ple"
  assert not cfg.use_ple and all(not s.shares_kv for s in cfg.layers)
  assert all(s.window is None for s in ablate(base, "all_global").layers)
  with pytest.raises(ValueError, match="valid: no_kv_sharing"):
    ablate(base, "no_such_thing")

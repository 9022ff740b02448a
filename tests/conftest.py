"""Test setup: CPU only, float32, shared tiny configs built from the presets."""

import dataclasses
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from gemma.inference import speculative, steps  # noqa: E402
from gemma.model import config as C  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("e_style", "dense_keqv", "moe", "gemma3")


def tiny(preset: str, **overrides) -> C.ModelConfig:
  """A small config of a preset's structural family (same flags, tiny sizes)."""
  base = C.get_preset(preset)
  small = dict(name=f"tiny-{preset}", vocab_size=96, embed_dim=32, num_heads=4, head_dim=8,
               global_head_dim=16, ffn_dim=48, sliding_window=4)
  if preset in ("gemma4-e2b", "gemma4-e4b"):
    small.update(num_layers=10, layer_types=C.pattern(10, 5), num_kv_heads=1,
                 num_kv_shared_layers=4, ple_dim=8, ple_vocab_size=96)
  elif preset == "gemma4-26b-a4b":
    small.update(num_layers=6, layer_types=C.pattern(6, 6), num_kv_heads=2,
                 num_global_kv_heads=1, num_experts=4, top_k_experts=2, moe_ffn_dim=16)
  else:
    small.update(num_layers=6, layer_types=C.pattern(6, 6), num_kv_heads=2,
                 num_global_kv_heads=1)
  small.update(overrides)
  return dataclasses.replace(base, **small)


@pytest.fixture(scope="session")
def e_style_ckpt(tmp_path_factory):
  """The e_style fixture (HF directory) plus a small SentencePiece tokenizer (vocab 512)."""
  from tests.test_chat import GEMMA4_SPECIALS, _sentencepiece

  path = tmp_path_factory.mktemp("e_style_ckpt")
  for f in ("config.json", "generation_config.json", "model.safetensors"):
    shutil.copy(os.path.join(FIXTURES, "e_style", f), path / f)
  (path / "tokenizer.model").write_bytes(_sentencepiece(GEMMA4_SPECIALS))
  return path


TINY_PRESETS = ("gemma4-e2b", "gemma4-26b-a4b", "gemma4-31b")


@pytest.fixture(params=TINY_PRESETS)
def tiny_cfg(request):
  return tiny(request.param)


def fixture_dir(name: str) -> str:
  return os.path.join(FIXTURES, name)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each test file's compiled XLA programs when the file ends. A test worker runs
  hundreds of tests in one process; without this it keeps every executable (and its memory
  mappings) to the end, and late compilations in a long worker crashed in XLA."""
  yield
  steps._compiled_prefill.cache_clear()
  steps._compiled_decode.cache_clear()
  steps._compiled_decode_loop.cache_clear()
  speculative._compiled_rounds.cache_clear()
  jax.clear_caches()

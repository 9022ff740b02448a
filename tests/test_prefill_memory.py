"""Prefill memory: the compiled prefill's working set (XLA's own buffer assignment) does not grow
with the context once attention is blockwise and global caches are attended in place; the
planner's estimate of it follows XLA's; `gemma4 plan` counts it and finds the longest context
that fits; the check before a run names it."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from gemma.cli.app import main
from gemma.inference import decode
from gemma.kv.cache import init_cache
from gemma.model import params as P
from gemma.parallel import memory
from gemma.parallel.memory import GIB
from tests.conftest import tiny

SIZES = dict(vocab_size=4096, embed_dim=256, head_dim=64, global_head_dim=128, ffn_dim=512,
             sliding_window=128, attention_block=64)


def _xla_temp_bytes(cfg, chunk: int, context: int, kv=None) -> int:
  """Temporary bytes XLA assigns to the compiled prefill of one chunk (nothing is allocated)."""
  cache = jax.eval_shape(lambda: init_cache(cfg, 1, context, jnp.float32, kv))
  ids = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
  args = (P.abstract(cfg, jnp.float32), ids, ids, jax.ShapeDtypeStruct((), jnp.int32), cache)
  return decode.prefill_step.lower(*args, cfg=cfg).compile().memory_analysis().temp_size_in_bytes


def test_compiled_prefill_memory_is_independent_of_the_context():
  cfg = tiny("gemma4-31b", **SIZES)
  short, long = _xla_temp_bytes(cfg, 256, 2048), _xla_temp_bytes(cfg, 256, 16384)
  assert abs(long - short) <= 0.01 * short  # 8x the context: only per-block scalars grow
  # dense attention (the [T, S] scores) grows with the context
  dense = dataclasses.replace(cfg, attention_impl="dense")
  assert _xla_temp_bytes(dense, 256, 16384) > 2 * _xla_temp_bytes(dense, 256, 2048)


@pytest.mark.parametrize("preset", ["gemma4-e2b", "gemma4-26b-a4b", "gemma4-31b"])
@pytest.mark.parametrize("chunk,context,kv", [(256, 2048, None), (512, 4096, None),
                                              (256, 2048, "tq4")])
def test_working_set_estimate_follows_xla(preset, chunk, context, kv):
  """An estimate from shapes, not an exact count: within [0.85, 2] of XLA's temp bytes on these
  small models (on the real 270M it is 1.01-1.41 of them, docs/BENCHMARKS.md)."""
  cfg = tiny(preset, **SIZES)
  cache = jax.eval_shape(lambda: init_cache(cfg, 1, context, jnp.float32, kv))
  est = memory.prefill_working_set(cfg, 1, chunk, context, cache, 4, {})
  ratio = est / _xla_temp_bytes(cfg, chunk, context, kv)
  assert 0.85 <= ratio <= 2.0, ratio


def _plan(capsys, *args) -> dict:
  code = main(["plan", "--preset", "gemma4-31b", "--mesh", "1x1", "--json", *args])
  return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plan_counts_prefill_and_finds_the_longest_context(capsys):
  code, p = _plan(capsys, "--quant", "tq4", "--kv-quant", "tq3.5", "--context", "131072",
                  "--device-memory", "24")
  assert code == 0 and p["fits"]
  assert p["total_bytes_per_device"] == (p["weight_bytes_per_device"] + p["cache_bytes_per_device"]
                                         + p["prefill_bytes_per_device"])
  assert p["prefill_chunk"] == decode.DEFAULT_PREFILL_CHUNK and p["prefill_bytes_per_device"] > 0
  longest = p["largest_context"]
  assert 131072 <= longest < p["model_context"]
  _, at = _plan(capsys, "--quant", "tq4", "--kv-quant", "tq3.5", "--device-memory", "24",
                "--context", str(longest))
  _, past = _plan(capsys, "--quant", "tq4", "--kv-quant", "tq3.5", "--device-memory", "24",
                  "--context", str(longest + 1))
  assert at["fits"] and not past["fits"]
  # a smaller chunk has a smaller working set
  _, small = _plan(capsys, "--quant", "tq4", "--kv-quant", "tq3.5", "--context", "131072",
                   "--device-memory", "24", "--prefill-chunk", "256")
  assert small["prefill_bytes_per_device"] < p["prefill_bytes_per_device"] / 4
  assert small["largest_context"] > longest


def test_check_before_a_run_names_the_prefill_working_set():
  cfg = tiny("gemma4-31b", **SIZES)
  params = P.abstract(cfg, jnp.float32)
  p = memory.plan(params, cfg, 1, 4096, None, {}, prefill_chunk=512)
  with pytest.raises(ValueError, match=r"prefill working set .* longest prompt \+ generation "
                     r"that fits: \d+ tokens"):
    memory.check_fits(params, cfg, 1, 4096, None, None, p.total_bytes - 1, 512)
  assert memory.check_fits(params, cfg, 1, 4096, None, None, p.total_bytes, 512) == p
  assert p.prefill_bytes > 0 and p.total_bytes < 1 * GIB

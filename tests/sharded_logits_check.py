"""Run by tests/test_sharding.py in a fresh process with 8 host CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_logits_check.py FIXTURE...

For each fixture: float32 logits of the reference prompt on one device, then with params placed
by `gemma.parallel.sharding.shard_params` on meshes 1x8, 2x4 and 8x1 (and, for the first fixture, a
TurboQuant-quantized copy, its QArrays split along rotation blocks, on every mesh, and a
GPTQ-calibrated tq4 copy on 2x4). Then the
dense_keqv fixture's prefill + one decode step through a TurboQuant tq3 KV cache (and tq4 weights)
on 2x4 / 1x8, and greedy `generate(..., mesh=)` tokens on 2x4. Prints one JSON line
{fixture: {kind@mesh: {rel_fro: ‖Δ‖/‖logits‖, rel_max: max|Δ|/max|logits|}}, "_cache": ...}.
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma.io.checkpoint import load  # noqa: E402
from gemma.model.transformer import forward  # noqa: E402
from gemma.parallel import sharding  # noqa: E402
from gemma.quant.calibrate import Calibration, calibrate, calibration_windows  # noqa: E402
from gemma.quant.recipes import quantize_params  # noqa: E402
from gemma.training import fit  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
MESHES = ("1x8", "2x4", "8x1")


def main(names) -> dict:
  assert jax.device_count() == 8, jax.devices()
  run = jax.jit(forward, static_argnames="cfg")
  out = {}
  for name in names:
    path = os.path.join(FIXTURES, name)
    ids = np.load(os.path.join(path, "reference.npz"))["prompt_ids"]
    cfg, params = load(path, jnp.float32)
    tokens = jnp.asarray(ids[None], jnp.int32)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    kinds = [("f32", params, MESHES)]
    if name == names[0]:  # quantized weights, QArrays split along rotation blocks
      kinds.append(("tq4", quantize_params(params, "tq4"), MESHES))
      # calibrated (GPTQ) weights: the same QArray format, so the same placement
      calib = Calibration(tokens=62, context=32)
      windows = calibration_windows(list(range(3, 65)), 2, calib)
      kinds.append(("tq4-gptq", calibrate(params, cfg, "tq4", windows, calib, False), ("2x4",)))
    for label, p, meshes in kinds:
      ref = np.asarray(run(p, tokens, positions, cfg)[0])
      for mesh_text in meshes:
        mesh = sharding.make_mesh(mesh_text)
        sharded = sharding.shard_params(p, mesh)
        got = np.asarray(run(sharded, tokens, positions, cfg)[0])
        out.setdefault(name, {})[f"{label}@{mesh_text}"] = errors(got, ref)
  return out


def errors(got, ref) -> dict:
  got, ref = np.asarray(got), np.asarray(ref)
  return dict(rel_fro=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
              rel_max=float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))


def quantized_cache_steps(name: str) -> dict:
  """A tq3 KV cache, single device vs sharded, with float and tq4 weights: the cache prefill
  stores (codes and signs bit-equal; float16 norms equal up to a rounding step), the logits of a
  decode step over the same stored cache, and the prefill logits; then greedy
  `generate(..., mesh=)` tokens vs single device."""
  from gemma.inference.decode import GREEDY, bucket_inputs, decode_step, generate, prefill_step
  from gemma.kv.cache import init_cache

  path = os.path.join(FIXTURES, name)
  ids = np.load(os.path.join(path, "reference.npz"))["prompt_ids"]
  cfg, params = load(path, jnp.float32)
  inputs = bucket_inputs(cfg, ids[None].astype(np.int32),
                         np.arange(len(ids), dtype=np.int32)[None])
  nxt, key = jnp.asarray([int(ids[-1])], jnp.int32), jax.random.key(0)

  def prefill(p, mesh):
    cache = init_cache(cfg, 1, 64, jnp.float32, "tq3")
    if mesh is not None:
      p, cache = sharding.shard_params(p, mesh), sharding.shard_cache(cache, mesh)
    return prefill_step(p, *inputs, cache, cfg=cfg)

  def decode(p, cache, mesh):
    cache = jax.tree.map(jnp.copy, cache)  # decode_step donates the cache it is given
    if mesh is not None:
      p, cache = sharding.shard_params(p, mesh), sharding.shard_cache(cache, mesh)
    return np.asarray(decode_step(p, nxt, cache, key, cfg=cfg, sampler=GREEDY)[1])

  out = {}
  for label, p, mesh_text in (("f32", params, "2x4"), ("tq4", quantize_params(params, "tq4"),
                                                       "1x8")):
    mesh = sharding.make_mesh(mesh_text)
    (ref, stored), (got, sharded) = prefill(p, None), prefill(p, mesh)
    words = norms = 0.0
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(sharded), strict=True):
      a, b = np.asarray(a), np.asarray(b)
      if a.dtype.kind == "u":  # packed codes / QJL signs
        words = max(words, float(np.mean(a != b)))
      elif a.dtype == np.float16:  # per-vector norms and residual norms γ
        a, b = a.astype(np.float32), b.astype(np.float32)
        norms = max(norms, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30))))
    on_mesh = decode(p, stored, mesh)
    out[f"{label}+kv-tq3@{mesh_text}"] = dict(
        words_differing=words, norm_max_rel=norms, prefill=errors(got, ref),
        decode_same_cache=errors(on_mesh, decode(p, stored, None)))
  # (a float cache on a mesh is generated from in tests/multihost_check.py)
  ref = generate(params, cfg, [list(ids)], 8, eos_ids=(), kv_quant="tq3").tokens
  got = generate(params, cfg, [list(ids)], 8, eos_ids=(), kv_quant="tq3",
                 mesh=sharding.make_mesh("2x4")).tokens
  out["generate-tq3@2x4"] = dict(same_tokens=got == ref)
  return out


def finetune_steps() -> dict:
  """Two full fine-tuning steps of a tiny random-init model, single device vs a 2x4 mesh."""
  from configs.finetune_tiny import get_config

  cfg = dataclasses.replace(get_config(), steps=2, warmup_steps=1, batch_size=4)
  out = {}
  for mode in ("full",):  # FSDP + tensor parallel on every trained weight
    one, s1, _ = fit(dataclasses.replace(cfg, mode=mode), False)
    two, s2, _ = fit(dataclasses.replace(cfg, mode=mode, mesh="2x4"), False)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(s2))
    diff = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2)) for a, b in
               zip(jax.tree.leaves(s1["trainable"]), jax.tree.leaves(s2["trainable"]),
                   strict=True))
    norm = sum(float(np.sum(np.asarray(a) ** 2)) for a in jax.tree.leaves(s1["trainable"]))
    out[mode] = dict(loss_rel=max(abs(a - b) / abs(a) for a, b in
                                  zip(one["losses"], two["losses"], strict=True)),
                     params_rel_fro=(diff / norm) ** 0.5)
  return out


if __name__ == "__main__":
  result = main(sys.argv[1:])
  result["_cache"] = quantized_cache_steps("dense_keqv")  # head_dim 32: tq3 packs
  result["_finetune"] = finetune_steps()
  print(json.dumps(result))

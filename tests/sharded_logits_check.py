"""Run by tests/test_sharding.py in a fresh process with 8 host CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_logits_check.py FIXTURE...

For each fixture: float32 logits of the reference prompt on one device, then with params placed
by `gemma.sharding.shard_params` on meshes 1x8, 2x4 and 8x1 (and, for the first fixture, a
TurboQuant-quantized copy on 2x4, whose QArrays stay replicated). Prints one JSON line
{fixture: {kind@mesh: {rel_fro: ‖Δ‖/‖logits‖, rel_max: max|Δ|/max|logits|}}}.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma import sharding  # noqa: E402
from gemma.checkpoint import load  # noqa: E402
from gemma.finetune import fit  # noqa: E402
from gemma.model import forward  # noqa: E402
from gemma.quant.recipes import quantize_params  # noqa: E402

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
    if name == names[0]:  # quantized weights (QArrays replicated, the rest sharded): one mesh
      kinds.append(("tq4", quantize_params(params, "tq4"), ("2x4",)))
    for label, p, meshes in kinds:
      ref = np.asarray(run(p, tokens, positions, cfg)[0])
      for mesh_text in meshes:
        mesh = sharding.make_mesh(mesh_text)
        sharded = sharding.shard_params(p, mesh)
        got = np.asarray(run(sharded, tokens, positions, cfg)[0])
        out.setdefault(name, {})[f"{label}@{mesh_text}"] = dict(
            rel_fro=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            rel_max=float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))
  return out


def finetune_steps() -> dict:
  """Two full fine-tuning steps of a tiny random-init model, single device vs a 2x4 mesh."""
  import dataclasses

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
  result["_finetune"] = finetune_steps()
  print(json.dumps(result))

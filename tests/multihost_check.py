"""One process of a 2-process run on one machine, started by tests/test_multihost.py:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python tests/multihost_check.py --coordinator localhost:PORT --num-processes 2 \
    --process-id I [--fixture e_style]

(one command per process, I = 0 and 1). Each process joins the run with
`gemma.parallel.distributed.initialize`, sees 8 global devices (4 its own), loads the fixture in
float32, places the params on the global 2x4 (data, model) mesh (data across processes, model
within one) with `gemma.parallel.distributed.shard_params` and, again, with
`gemma.parallel.sharding.shard_params` (jax.device_put), and where `gemma.io.checkpoint.load`
takes a `mesh`, loaded straight into the mesh (each process reading its own slices); runs the
jitted `forward` on the reference prompt and gathers the logits to host; then greedy
`generate(..., mesh=)` (params and KV cache across both processes). Process 0 also runs the same
forward on one of its own devices and prints one JSON line:
{"rel_fro": ‖Δ‖/‖ref‖, "rel_max": ..., "device_put_rel_fro": ..., "load_mesh_rel_fro": ... or
null, "processes": 2, "devices": 8, ...}.
"""

import argparse
import inspect
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemma.parallel import distributed  # noqa: E402  (imports no JAX backend)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def main(argv=None) -> int:
  ap = distributed.add_flags(argparse.ArgumentParser(description=__doc__))
  ap.add_argument("--fixture", default="e_style")
  ap.add_argument("--mesh", default="2x4")
  ap.add_argument("--timeout", type=int, default=60, help="seconds to wait for the peers")
  args = ap.parse_args(argv)
  start = time.perf_counter()
  assert distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                timeout_s=args.timeout)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from gemma.io.checkpoint import load
  from gemma.model.transformer import forward
  from gemma.parallel import sharding

  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.process_index() == args.process_id, jax.process_index()
  assert jax.device_count() == 8, jax.devices()
  assert jax.local_device_count() == 4, jax.local_devices()
  mesh = sharding.make_mesh(args.mesh)
  # data rows across processes, the model axis inside one process
  rows = [{d.process_index for d in row} for row in mesh.devices]
  assert all(len(r) == 1 for r in rows) and len(set.union(*rows)) == 2, mesh.devices

  path = os.path.join(FIXTURES, args.fixture)
  ids = np.load(os.path.join(path, "reference.npz"))["prompt_ids"]
  cfg, params = load(path, jnp.float32)
  tokens = np.asarray(ids[None], np.int32)
  positions = np.arange(len(ids), dtype=np.int32)[None]
  run = jax.jit(forward, static_argnames="cfg")

  sharded = distributed.shard_params(params, mesh)
  assert any(len(x.sharding.device_set) == 8 and not x.is_fully_addressable
             for x in jax.tree.leaves(sharded))
  replicated = NamedSharding(mesh, P())
  g_tokens, g_positions = distributed.place((tokens, positions), (P(), P()), mesh)
  assert g_tokens.sharding == replicated
  logits, _ = run(sharded, g_tokens, g_positions, cfg)
  spans = len(logits.sharding.device_set)
  got = distributed.to_host(logits)[0]  # a collective: both processes take part
  # the single-process path of `gemma4 logits --mesh` (jax.device_put of the loaded params to
  # the global shardings, plain jnp inputs) works across processes too in this JAX version
  dp_logits, _ = run(sharding.shard_params(params, mesh), jnp.asarray(tokens),
                     jnp.asarray(positions), cfg)
  dp = distributed.to_host(dp_logits)[0]
  loaded = None  # `load(..., mesh=)`, where this tree has it: each process reads its own slices
  if "mesh" in inspect.signature(load).parameters:
    _, direct = load(path, jnp.float32, mesh=mesh)
    loaded = distributed.to_host(run(direct, g_tokens, g_positions, cfg)[0])[0]
  # greedy generation with params and KV cache sharded across both processes (every process
  # runs the same loop; sampled ids come back replicated)
  from gemma.inference.decode import generate

  generated = generate(params, cfg, [list(ids)], 4, eos_ids=(), mesh=mesh).tokens

  if distributed.is_main_process():
    local = jax.local_devices()[0]
    ref = np.asarray(run(jax.device_put(params, local), jax.device_put(tokens, local),
                         jax.device_put(positions, local), cfg)[0][0])
    hf = np.load(os.path.join(path, "reference.npz"))["logits"]
    alone = generate(jax.device_put(params, local), cfg, [list(ids)], 4, eos_ids=()).tokens
    print(json.dumps(dict(
        rel_fro=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
        rel_max=float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))),
        device_put_rel_fro=float(np.linalg.norm(dp - ref) / np.linalg.norm(ref)),
        load_mesh_rel_fro=None if loaded is None else float(
            np.linalg.norm(loaded - ref) / np.linalg.norm(ref)),
        hf_rel_fro=float(np.linalg.norm(got - hf) / np.linalg.norm(hf)),
        generate_same_tokens=generated == alone,
        shape=list(got.shape), processes=jax.process_count(), devices=jax.device_count(),
        local_devices=jax.local_device_count(), logits_devices=spans, mesh=args.mesh,
        seconds=round(time.perf_counter() - start, 2))), flush=True)
  distributed.barrier("multihost_check done")  # process 0 keeps the coordinator up till here
  return 0


if __name__ == "__main__":
  sys.exit(main())

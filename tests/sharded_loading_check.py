"""Run by tests/test_sharded_loading.py in a fresh process with 8 host CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_loading_check.py \
      TMPDIR FIXTURE...

Loads each HF fixture with `load(path, float32, mesh=make_mesh("2x4"))` and compares it with the
unsharded load; does the same for a converted (Orbax) checkpoint written from the first fixture,
for an int8 quantize-on-load, for an int8-quantized converted checkpoint, and for an official
(stacked) Orbax checkpoint written from the `moe` fixture. The sharded HF path is instrumented:
`common.place` (one call per leaf) and `common.read_slice` (one call per slice read) are wrapped
to count, per leaf, the slices and source bytes read and whether the source was still a view of
the memory-mapped file. Prints one JSON line with, per case:
  leaves, sharding_ok (leaves whose sharding is the `param_specs` one), equal (bit-equal leaves),
and for HF fixtures also
  file_backed (leaves read from a view of the mapped file), read_bytes / param_bytes (all slices
  read vs the params' size), exact_reads (leaves whose reads were exactly their distinct owned
  slices, each read once), split8 / split8_ok (leaves split 8 ways / those read as 8 slices of
  1/8 each).
"""

import json
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from gemma.io.checkpoint import load  # noqa: E402
from gemma.io.formats import common  # noqa: E402
from gemma.io.formats import converted as CV  # noqa: E402
from gemma.model.params import leaf_names  # noqa: E402
from gemma.parallel import sharding  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LEAVES: list[dict] = []  # one record per `place` call (the sharded HF path)


def _instrument() -> None:
  place, read_slice = common.place, common.read_slice

  def counted_place(a, shape, sharding_, dtype):
    LEAVES.append(dict(shape=tuple(shape), itemsize=a.dtype.itemsize, sharding=sharding_,
                       file_backed=common.is_file_backed(a), reads=[]))
    return place(a, shape, sharding_, dtype)

  def counted_read(a, index, dtype):
    out = read_slice(a, index, dtype)
    LEAVES[-1]["reads"].append(out.size * a.dtype.itemsize)  # bytes of the source touched
    return out

  common.place, common.read_slice = counted_place, counted_read


def _compare(got, ref, mesh) -> dict:
  """Leaf count, leaves placed as param_specs says, leaves bit-equal to the reference."""
  specs = jax.tree.leaves(sharding.param_specs(ref, dict(mesh.shape)),
                          is_leaf=lambda x: isinstance(x, PartitionSpec))
  got_leaves, ref_leaves = jax.tree.leaves(got), jax.tree.leaves(ref)
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  ok = sum(g.sharding.is_equivalent_to(NamedSharding(mesh, s), g.ndim)
           for g, s in zip(got_leaves, specs, strict=True))
  equal = sum(g.dtype == r.dtype and np.array_equal(np.asarray(g), np.asarray(r))
              for g, r in zip(got_leaves, ref_leaves, strict=True))
  return dict(leaves=len(got_leaves), sharding_ok=int(ok), equal=int(equal))


def _read_accounting(mesh) -> dict:
  sizes = dict(mesh.shape)
  out = dict(file_backed=0, read_bytes=0, param_bytes=0, exact_reads=0, split8=0, split8_ok=0)
  for leaf in LEAVES:
    nbytes = math.prod(leaf["shape"]) * leaf["itemsize"]
    pieces = math.prod(sizes[a] for a in leaf["sharding"].spec if a)  # distinct slices
    out["file_backed"] += leaf["file_backed"]
    out["read_bytes"] += sum(leaf["reads"])
    out["param_bytes"] += nbytes
    out["exact_reads"] += (len(leaf["reads"]) == pieces and sum(leaf["reads"]) == nbytes)
    if pieces == 8:
      out["split8"] += 1
      out["split8_ok"] += len(leaf["reads"]) == 8 and all(8 * r == nbytes for r in leaf["reads"])
  return out


def main(tmp: str, names: list[str]) -> dict:
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh("2x4")
  _instrument()
  result = {}
  for name in names:
    path = os.path.join(FIXTURES, name)
    cfg, ref = load(path, jnp.float32)
    LEAVES.clear()
    _, got = load(path, jnp.float32, mesh=mesh)
    assert len(LEAVES) == len(leaf_names(ref))
    result[name] = dict(_compare(got, ref, mesh), **_read_accounting(mesh))
    if name == "moe":  # official Orbax (stacked): whole leaves read, owned slices placed
      from tests.orbax_synth import write_official

      official = write_official(os.path.join(tmp, "official"), cfg, ref, stacked=True)
      result["official_orbax"] = _compare(load(official, jnp.float32, cfg=cfg, mesh=mesh)[1],
                                          ref, mesh)
    if name == names[0]:
      CV.CHUNK_BYTES = 8192  # several chunks per large leaf, so chunks and shards differ
      conv = CV.save_converted(os.path.join(tmp, "conv"), cfg, ref)  # as `gemma4 convert` does
      result["converted"] = _compare(load(conv, jnp.float32, mesh=mesh)[1], ref, mesh)
      # quantize on load after the sharded read, then placed by shard_params
      q_ref = load(path, jnp.float32, quant="int8")[1]
      q_got = load(path, jnp.float32, quant="int8", mesh=mesh)[1]
      result["quant_on_load"] = _compare(q_got, q_ref, mesh)
      # a quantized converted checkpoint restores its QArray children straight into place
      from gemma.quant.recipes import resolve

      qconv = CV.save_converted(os.path.join(tmp, "qconv"), cfg, q_ref, recipe=resolve("int8"))
      result["converted_quantized"] = _compare(load(qconv, jnp.float32, mesh=mesh)[1], q_ref,
                                               mesh)
  return result


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1], sys.argv[2:])))

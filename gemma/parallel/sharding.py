"""Logical axes of every param and cache leaf, and their placement on a device mesh.

The weight table (`gemma.model.weights`) names the logical axes of each weight; `RULES` maps
logical axes to the mesh axes `data` and `model` (and `expert` when the mesh has one):

  vocab, heads, kv_heads, ffn -> model      tensor parallel over heads / FFN / vocabulary
  expert -> expert (else model)             expert parallel for MoE
  embed -> data                             FSDP: the remaining weight axis is split over data
  head_dim, norms, routers' outputs -> replicated

An axis whose size the mesh axis does not divide stays replicated (e.g. 1 KV head on 8 model
shards), and a mesh axis is used at most once per tensor.

Quantized weights (`QArray`, `qarray_spec`) are split along rotation blocks: their output axes
keep the weight's shape and shard as the float weight's would; the packed input axis (codes
[.., n_in·b/32, ..], scales [.., n_in/g, ..]) is split only where every shard holds whole
rotation blocks of whole leading input slices (the block count and the first input axis both
divide, no padding) and the codes are one bit plane (b in 1, 2, 4, 8; a 3-bit code's two planes
are concatenated along that axis). FSDP prefers output axes (whole rows per shard); where the
input axis cannot take its mesh axis, an output axis takes it (3-bit mlp.down [F, D]: D on
(`data`, `model`)). Codes, scales, QJL signs and γ of a QArray always share one spec, so a
block's codes and its norm live on the same device.
KV cache leaves put rows (batch) on `data` and KV heads on `model`.

Placement is `shard` (every leaf with its NamedSharding: `jax.device_put`, or slice by slice
from host values across processes) and `from_slices`, the one slice-by-slice builder that the
checkpoint readers (`gemma.io.formats.common.place`) and multi-process runs
(`gemma.parallel.distributed.place`) use.

  mesh = make_mesh("2x4")                     # (data, model) over 8 devices
  params = shard_params(params, mesh)         # NamedSharding per leaf; forward is unchanged
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma.model import weights
from gemma.model.params import leaf_names, path_name
from gemma.quant.qarray import QArray

# cache-leaf name -> logical axes (slot-major [B, S, K, ...] and per-row [B, K, H] leaves)
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("batch", None, "kv_heads", None), "v": ("batch", None, "kv_heads", None),
    "codes": ("batch", None, "kv_heads", None), "signs": ("batch", None, "kv_heads", None),
    "norm": ("batch", None, "kv_heads"), "gamma": ("batch", None, "kv_heads"),
    "pos": ("batch", None), "next_pos": ("batch",),
    "k_perm": ("batch", "kv_heads", None), "v_perm": ("batch", "kv_heads", None),
    "k_mean": ("batch", "kv_heads", None), "v_mean": ("batch", "kv_heads", None),
    "k_scale": ("batch", "kv_heads", None),
}
RULES: dict[str, tuple[str, ...]] = {  # logical axis -> mesh axes to try, in order
    "vocab": ("model",), "heads": ("model",), "kv_heads": ("model",), "ffn": ("model",),
    "expert": ("expert", "model"), "expert_ffn": ("model",), "embed": ("data",),
    "batch": ("data",),
}


def parse_mesh(text: str) -> tuple[int, ...]:
  """"DxM" (or "DxMxE") -> (D, M[, E]); ValueError naming the problem."""
  try:
    sizes = tuple(int(x) for x in text.lower().split("x"))
  except ValueError:
    sizes = ()
  if len(sizes) not in (2, 3) or min(sizes) < 1:
    raise ValueError(f"--mesh must look like DxM or DxMxE with positive sizes, got {text!r}")
  return sizes


def mesh_axes(sizes: tuple[int, ...]) -> dict[str, int]:
  return dict(zip(("data", "model", "expert"), sizes, strict=False))


def make_mesh(text_or_sizes, devices=None) -> Mesh:
  """A (data, model[, expert]) mesh over the first prod(sizes) devices."""
  sizes = parse_mesh(text_or_sizes) if isinstance(text_or_sizes, str) else tuple(text_or_sizes)
  devices = list(jax.devices() if devices is None else devices)
  need = math.prod(sizes)
  if need > len(devices):
    raise ValueError(f"mesh {'x'.join(map(str, sizes))} needs {need} devices, "
                     f"{len(devices)} available")
  grid = np.asarray(devices[:need], dtype=object).reshape(sizes)
  return Mesh(grid, tuple(mesh_axes(sizes)))


def logical_axes(name: str, ndim: int, table=None) -> tuple[str | None, ...]:
  """Logical axes of the leaf called `name` ("layers.3.attn.q", also inside a larger tree:
  "opt_state.0.mu.layers.3.attn.q"), from `gemma.model.weights` or, given, a {name: axes}
  `table` (CACHE_AXES); vectors and unknown leaves are replicated."""
  if table is None:
    info = weights.weight_info_by_suffix(name)
    candidates = () if info is None else (info.axes,)
  else:
    parts = name.split(".")
    candidates = (table.get(".".join(parts[-2:])), table.get(parts[-1]))
  for axes in candidates:
    if axes is not None and len(axes) == ndim:
      return axes
  return (None,) * ndim


def partition_spec(axes, shape, sizes: dict[str, int]) -> PartitionSpec:
  """PartitionSpec of a tensor of `shape` with logical `axes` on a mesh of `sizes`."""
  used, out = set(), []
  for axis, dim in zip(axes, shape, strict=True):
    chosen = None
    for mesh_axis in RULES.get(axis, ()):
      n = sizes.get(mesh_axis, 1)
      if mesh_axis not in used and n > 1 and dim % n == 0:
        chosen = mesh_axis
        used.add(mesh_axis)
        break
    out.append(chosen)
  return PartitionSpec(*out)


def undivided_axes(tree, sizes: dict[str, int]) -> list[str]:
  """Logical axes of the weights in `tree` that stay replicated because no mesh axis of their
  rule divides them (e.g. "kv_heads 1 (model=8)"), one entry per (axis, size, mesh axes)."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)[0]:
    name = path_name(path)
    for axis, dim in zip(logical_axes(name, len(leaf.shape)), leaf.shape, strict=True):
      tried = [m for m in RULES.get(axis, ()) if sizes.get(m, 1) > 1]
      if tried and all(dim % sizes[m] for m in tried):
        found[(axis, dim)] = f"{axis} {dim} ({', '.join(f'{m}={sizes[m]}' for m in tried)})"
  return list(found.values())


def _is_qarray(x) -> bool:
  return isinstance(x, QArray)


def qarray_spec(q: QArray, axes, sizes: dict[str, int]) -> PartitionSpec:
  """The one PartitionSpec of every child of `q` (a weight with logical `axes`).

  Output axes take their mesh axes as the float weight's would. The input axis's mesh axis goes
  to the packed input axis only in whole rotation blocks (see the module docstring) and, for
  FSDP (`data`), only when no output axis can take it: FSDP shards then hold whole rows, whose
  blocks are summed on one device in the same order as without a mesh. Tensor parallelism
  (`model` on heads / FFN) splits the input axis Megatron-style when it can, else an output axis.
  """
  layout, spec = q.layout, q.spec
  b_axes, in_axes, out_axes = layout.split(tuple(axes))
  b_dims, in_dims, out_dims = layout.split(q.shape)
  _, n_in, n_pad, _, _ = q.dims
  one_plane = spec.code_bits in (1, 2, 4, 8)
  # the packed axis may split only into whole blocks of whole leading input slices
  blocks = n_pad // spec.block if one_plane and n_pad == n_in else 1
  candidates = RULES.get(in_axes[0], ())
  mesh_n = max((sizes.get(m, 1) for m in candidates), default=1)
  eligible = mesh_n > 1 and blocks % mesh_n == 0 and in_dims[0] % mesh_n == 0
  split_in = eligible and "data" not in candidates
  if layout.in_last:  # children [*batch, *out, packed]
    stored = (*b_axes, *out_axes, in_axes[0])
    dims = (*b_dims, *out_dims, blocks if split_in else 1)
    in_at, out_at = len(stored) - 1, range(len(b_dims), len(b_dims) + len(out_dims))
  else:  # children [*batch, packed, *out]
    stored = (*b_axes, in_axes[0], *out_axes)
    dims = (*b_dims, blocks if split_in else 1, *out_dims)
    in_at, out_at = len(b_dims), range(len(b_dims) + 1, len(stored))
  out = list(partition_spec(stored, dims, sizes))
  for mesh_axis in candidates:  # the input axis's mesh axis, if it is still unplaced
    n = sizes.get(mesh_axis, 1)
    if n == 1 or any(mesh_axis in _names(e) for e in out):
      continue
    # an output axis that may be split at all (heads, FFN, vocab, embed; never head_dim)
    free = [i for i in out_at if stored[i] in RULES and dims[i] % (n * _split(out[i], sizes)) == 0]
    if free:  # e.g. 3-bit mlp.down [F, D]: D on (data, model) when F cannot split
      out[free[0]] = mesh_axis if out[free[0]] is None else (*_names(out[free[0]]), mesh_axis)
    elif eligible:
      out[in_at] = mesh_axis
  return PartitionSpec(*out)


def _names(entry) -> tuple[str, ...]:
  """Mesh axes of one PartitionSpec entry (None, "model" or ("data", "model"))."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _split(entry, sizes: dict[str, int]) -> int:
  """Shards along one dimension of a PartitionSpec entry."""
  return math.prod(sizes.get(n, 1) for n in _names(entry))


def param_specs(tree, sizes: dict[str, int]):
  """PartitionSpec per param leaf (a QArray: `qarray_spec` for each of its children)."""

  def one(path, leaf):
    axes = logical_axes(path_name(path), len(leaf.shape))
    if isinstance(leaf, QArray):
      spec = qarray_spec(leaf, axes, sizes)
      return jax.tree.map(lambda _: spec, leaf)
    return partition_spec(axes, leaf.shape, sizes)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_qarray)


def cache_specs(cache, sizes: dict[str, int]):
  """PartitionSpec per KV cache leaf (rows on data, KV heads on model; rotations replicated)."""

  def one(path, leaf):
    name = path_name(path)
    if name.startswith("codec") or name == "length":
      return PartitionSpec()
    return partition_spec(logical_axes(name, len(leaf.shape), CACHE_AXES), leaf.shape, sizes)

  return jax.tree_util.tree_map_with_path(one, cache)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def named_shardings(specs, mesh: Mesh):
  """`specs` (a tree of PartitionSpecs) with each spec as its NamedSharding on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def leaf_shardings(tree, mesh: Mesh) -> dict[str, NamedSharding]:
  """{param name: NamedSharding} of every leaf of the params tree `tree` on `mesh`, from
  `param_specs` (QArrays: one entry per child, "name.codes", ...)."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (see gemma.parallel.sharding.make_mesh), "
                    f"got {type(mesh).__name__}")
  shardings = jax.tree.leaves(named_shardings(param_specs(tree, dict(mesh.shape)), mesh))
  return dict(zip(leaf_names(tree), shardings, strict=True))


def from_slices(shape: tuple[int, ...], sharding: NamedSharding, read) -> jax.Array:
  """A jax.Array of `shape` placed with `sharding`, built by `jax.make_array_from_callback`:
  `read(index)` (a tuple of slices -> that slice as a numpy array) is called once per distinct
  slice this process's devices own, whatever its replication, and never for the slices of
  other processes' devices."""
  slices: dict[tuple, np.ndarray] = {}

  def owned(index: tuple) -> np.ndarray:
    key = tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)
    if key not in slices:
      slices[key] = read(index)
    return slices[key]

  return jax.make_array_from_callback(tuple(shape), sharding, owned)


def shard(tree, specs, mesh: Mesh, from_host: bool = False):
  """Every leaf of `tree` placed with its NamedSharding (`specs` mirrors `tree` with a
  PartitionSpec per leaf; a QArray has one per child).

  By `jax.device_put`, or with `from_host` slice by slice (`from_slices`) from the leaf as a
  numpy array (host values, the same on every process): each process copies only the shards of
  its own devices, which is valid in every JAX version whether or not `jax.device_put` accepts a
  sharding that spans other processes.
  """
  shardings = named_shardings(specs, mesh)
  if not from_host:
    return jax.device_put(tree, shardings)
  leaves, treedef = jax.tree.flatten(shardings)

  def one(leaf, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(leaf)
    return from_slices(host.shape, sharding, lambda index: host[index])

  return treedef.unflatten([one(x, s) for x, s in
                            zip(treedef.flatten_up_to(tree), leaves, strict=True)])


def shard_params(params, mesh: Mesh, from_host: bool = False):
  """`params` placed by `param_specs` (see `shard` for `from_host`)."""
  return shard(params, param_specs(params, dict(mesh.shape)), mesh, from_host)


def shard_cache(cache, mesh: Mesh):
  """A KV cache placed by `cache_specs`."""
  return shard(cache, cache_specs(cache, dict(mesh.shape)), mesh)


def per_device_bytes(tree, specs, sizes: dict[str, int]) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) placed by `specs`."""
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=_is_spec)
  total = 0
  for leaf, spec in zip(leaves, spec_leaves, strict=True):
    count = math.prod(leaf.shape)
    for entry in spec:
      count //= _split(entry, sizes)
    total += count * np.dtype(leaf.dtype).itemsize
  return total

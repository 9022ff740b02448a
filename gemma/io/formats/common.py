"""Format-independent checkpoint assembly: map, transform, check and cast one tensor at a time.

A format supplies a config, a stream of `(source name, lazy loader)` pairs and a `Mapper` that
turns a source name into param names plus a named transform, or says why it is skipped. The
assembler fills every leaf of `abstract(cfg)`, casts on the way (peak host memory stays near the
output size), and raises one `CheckpointError` listing every missing, unexpected and mis-shaped
tensor.

With a device mesh, each leaf is created directly with the `NamedSharding` that
`gemma.parallel.sharding.param_specs` gives it, by `jax.make_array_from_callback`: jax asks only
for the slices of this process's addressable devices, and each distinct slice is copied (and
cast) once from the loaded tensor. When a loader returns a memory-mapped tensor (HF safetensors)
and the transform keeps it a view (transposes, axis splits and `np.split` do), only the owned
slices' bytes are ever read from disk.
"""

from __future__ import annotations

import dataclasses
import mmap
import re
import sys
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from gemma.model.config import ModelConfig
from gemma.model.params import Params, abstract, leaf_names
from gemma.parallel.sharding import from_slices, leaf_shardings

Loader = Callable[[], np.ndarray]
Transform = Callable[..., np.ndarray | list[np.ndarray]]
# (param name, array cast to the load dtype) -> the leaf to keep: quantize-on-load hooks in here,
# so a quantized model never holds all of its weights in full precision at once.
Finish = Callable[[str, jax.Array], object]


class CheckpointError(ValueError):
  """A checkpoint that does not match the model; names every missing/unexpected/bad tensor."""


@dataclasses.dataclass(frozen=True)
class Mapped:
  targets: tuple[str, ...]  # param names ("layers.3.attn.q")
  transform: Transform  # (array, target shape | [shapes]) -> array | [arrays]


@dataclasses.dataclass(frozen=True)
class Skip:
  reason: str  # e.g. "vision/audio tensors (text model only)", "tied output head"


# ----------------------------------------------------------------------- named transforms
# The leading axis must be a leading group of the target axes, so a reshape never hides a
# transposed tensor.
def reshape(w: np.ndarray, shape) -> np.ndarray:
  prefixes = {int(np.prod(shape[:j])) for j in range(1, len(shape) + 1)}
  if w.ndim == 0 or w.shape[0] not in prefixes or w.size != int(np.prod(shape)):
    raise ValueError(f"{w.shape} -> {shape}")
  return w.reshape(shape)


def same(w, shape):
  return reshape(w, shape)  # e.g. [V, L*P] -> [V, L, P]


def linear(w, shape):
  return reshape(w.T, shape)  # nn.Linear [out, in] -> [in, ...out axes]


def swap_last(w, shape):
  return reshape(np.swapaxes(w, -1, -2), shape)  # [E, D, I] -> [E, I, D]


def split_gate_up(w, shapes):
  # fused experts [E, 2I, D]: rows [0:I] gate, [I:2I] up -> two [E, D, I]
  gate, up = np.split(w, 2, axis=1)
  return [reshape(np.swapaxes(gate, 1, 2), shapes[0]), reshape(np.swapaxes(up, 1, 2), shapes[1])]


def minus_one(w, shape):
  return reshape(w, shape) - 1  # norm scales stored as (1 + w) for a (1 + w) RMSNorm


class RegexTable:
  """A declarative name table: (regex, param name templates, transform) rows, first match wins.

  Templates use `{0}`, `{1}`... for the regex groups. `None` as templates marks an explicitly
  ignored tensor (the row's transform slot then holds the reason).
  """

  def __init__(self, rows):
    self.rows = [(re.compile(p + "$"), targets, fn) for p, targets, fn in rows]

  def __call__(self, name: str) -> Mapped | Skip | None:
    for pattern, targets, fn in self.rows:
      m = pattern.match(name)
      if m:
        if targets is None:
          return Skip(fn)
        return Mapped(tuple(t.format(*m.groups()) for t in targets), fn)
    return None


_DEAD_KV = re.compile(r"layers\.(\d+)\.attn\.(k|v|k_norm)$")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def progress(done: int, total: int, what: str = "loading tensors", suffix: str = "") -> None:
  line = f"{what} {done}/{total}" + (f" {suffix}" if suffix else "")
  if sys.stderr.isatty():
    end = "\n" if done == total else ""
    print(f"\r{line}", end=end, file=sys.stderr, flush=True)
  elif done == total or done % max(1, total // 10) == 0:  # logs: about ten lines
    print(line, file=sys.stderr, flush=True)


def is_file_backed(a) -> bool:
  """True when `a` is a view of a memory-mapped file (reading its elements reads the file)."""
  base = a
  while isinstance(base, np.ndarray):
    base = base.base
  return isinstance(base, mmap.mmap)


def host_array(a: np.ndarray, dtype) -> np.ndarray:
  """`a` cast to `dtype` in memory: one copy at most, and always a copy of a file-backed view
  (so no leaf aliases a mapped file)."""
  if is_file_backed(a):
    return np.array(a, dtype=dtype)
  return np.asarray(a).astype(dtype, copy=False)


def read_slice(a: np.ndarray, index: tuple, dtype) -> np.ndarray:
  """A copy of `a[index]` cast to `dtype`: the only read of tensor data on the sharded path."""
  return np.array(a[index], dtype=dtype)


def place(a: np.ndarray, shape: tuple[int, ...], sharding, dtype) -> jax.Array:
  """`a` (of `shape`) as a jax.Array with `sharding`, built slice by slice
  (`gemma.parallel.sharding.from_slices`): each distinct slice that an addressable device owns
  is read once (`read_slice`), whatever its replication."""
  return from_slices(shape, sharding, lambda index: read_slice(a, index, dtype))


def check_finite(name: str, a, source) -> None:
  """Refuses a float tensor with NaN or inf values (a corrupt file: weights are always finite);
  one reduction over the array, on whatever device holds it."""
  if jnp.issubdtype(a.dtype, jnp.floating) and not bool(jnp.isfinite(a).all()):
    raise CheckpointError(f"{source}: tensor {name} has non-finite values (NaN or inf) after "
                          "loading: the file is corrupt")


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, Loader]],
             mapper: Callable[[str], Mapped | Skip | None], dtype, source: str,
             finish: Finish | None = None, mesh=None) -> Params:
  """Builds params from a tensor stream. Raises CheckpointError listing every problem.

  Tensors a KV-shared layer does not use (dead K/V copies) are accepted and ignored. `finish`
  turns each leaf, as soon as it is read, into what is kept (e.g. its quantized form). With a
  `mesh` (a `jax.sharding.Mesh`) every leaf is created with its `param_specs` sharding from the
  slices this process owns (see the module docstring); `finish` then gets sharded arrays.
  """
  tree = abstract(cfg, dtype)
  shardings = leaf_shardings(tree, mesh) if mesh is not None else None
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  expected = dict(zip(leaf_names(tree), leaves, strict=True))
  shared = {str(s.index) for s in cfg.layers if s.shares_kv}
  values: dict[str, jax.Array] = {}
  unexpected, misshaped, skipped = [], [], {}
  tensors = list(tensors)
  for i, (name, load) in enumerate(tensors):
    progress(i + 1, len(tensors))
    mapped = mapper(name)
    if isinstance(mapped, Skip):
      skipped[mapped.reason] = skipped.get(mapped.reason, 0) + 1
      continue
    if mapped is None:
      unexpected.append(name)
      continue
    if any(t not in expected for t in mapped.targets):
      dead = _DEAD_KV.match(mapped.targets[0])
      if dead and dead.group(1) in shared:
        skipped["unused K/V of KV-shared layers"] = skipped.get(
            "unused K/V of KV-shared layers", 0) + 1
      else:
        unexpected.append(name)
      continue
    arr = load()
    shapes = [expected[t].shape for t in mapped.targets]
    try:
      out = mapped.transform(arr, shapes if len(shapes) > 1 else shapes[0])
    except ValueError:
      misshaped.append(f"{name}: {tuple(arr.shape)} cannot become {shapes}")
      continue
    for target, a in zip(mapped.targets, out if len(shapes) > 1 else [out], strict=True):
      if target in values:
        unexpected.append(f"{name} (second source for {target})")
      if shardings is not None:
        leaf = place(a, expected[target].shape, shardings[target], dtype)
      else:  # one host copy at most (jnp.asarray would make two of a numpy array)
        leaf = jax.device_put(host_array(a, dtype))
      check_finite(f"{target} (from {name})", leaf, source)
      values[target] = finish(target, leaf) if finish else leaf
    del arr, out
  for reason, n in skipped.items():
    log(f"skipped {n} {reason}")
  missing = [n for n in expected if n not in values]
  if missing or unexpected or misshaped:
    raise CheckpointError(
        f"{source} does not match config {cfg.name}:\n" + "\n".join(
            f"  {kind}: {', '.join(items)}" for kind, items in
            (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if items))
  return jax.tree_util.tree_unflatten(treedef, [values[n] for n in expected])

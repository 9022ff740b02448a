"""Probes: weights that record what flows through them, for calibration.

A `Probe` wraps a weight leaf of the params tree. `gemma.model.layers.einsum` / `ragged_dot` run
it as the plain weight and, inside an active `recording()` (entered inside the traced function),
record the input statistic H = Σ x xᵀ over the weight's contracted input axes (per expert for
grouped matmuls, from the rows routed to each expert), flattened in the weight's input-axis
order. A probe may also carry a `tap`, an array added to its output (zeros): the gradient of a
loss with respect to the tap is the gradient with respect to the weight's output.

    def stats(layer, h):
      with probe.recording() as rec:
        out = decoder_layer(probe.wrap(layer), h, ...)
      return out, rec.hessians          # {leaf name: [n_in, n_in] or [E, n_in, n_in]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma.model import layers
from gemma.model.params import path_name

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Probe:
  """A weight that reports its inputs (and optionally offsets its output by `tap`)."""

  weight: jax.Array  # the wrapped float weight
  tap: jax.Array | None = None  # added to the einsum output (same shape), or None
  lookup_tap: jax.Array | None = None  # added to the rows a table lookup returns, or None
  name: str = dataclasses.field(default="", metadata=dict(static=True))

  @property
  def dtype(self):
    return self.weight.dtype

  @property
  def shape(self):
    return self.weight.shape

  def astype(self, dtype):
    return self.weight.astype(dtype)

  def __gemma_einsum__(self, spec: str, x: jax.Array, out_dtype=None) -> jax.Array:
    observe_einsum(spec, x, self)
    out = layers.einsum(spec, x, self.weight, jnp.float32)
    note_output(self, out)
    out = out if self.tap is None else out + self.tap
    return out.astype(out_dtype or x.dtype)

  def __gemma_ragged_dot__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    observe_grouped(x, self, group_sizes)
    out = layers.ragged_dot(x, self.weight, group_sizes)
    note_output(self, out)
    return out if self.tap is None else (out + self.tap).astype(out.dtype)

  def __getitem__(self, ids):  # table lookups (embedding rows) are not matmuls: no statistic
    out = self.weight[ids]
    if _ACTIVE:
      _ACTIVE[-1].outputs[self.name + LOOKUP] = tuple(out.shape)
    return out if self.lookup_tap is None else out + self.lookup_tap.astype(out.dtype)


jax.tree_util.register_dataclass(Probe, data_fields=["weight", "tap", "lookup_tap"],
                                 meta_fields=["name"])
LOOKUP = "@lookup"  # suffix of a table's lookup output in Recorder.outputs


class Recorder:
  """Collects statistics during one trace: {name: H}, summed when a weight is used twice, and
  the shape of each probe's output (to size its tap)."""

  def __init__(self):
    self.hessians: dict[str, jax.Array] = {}
    self.outputs: dict[str, tuple[int, ...]] = {}

  def add(self, name: str, h: jax.Array):
    self.hessians[name] = h if name not in self.hessians else self.hessians[name] + h


_ACTIVE: list[Recorder] = []


@contextlib.contextmanager
def recording():
  """Records the statistics of every probe used inside the block (use inside a traced function
  and return `rec.hessians` from it)."""
  rec = Recorder()
  _ACTIVE.append(rec)
  try:
    yield rec
  finally:
    _ACTIVE.pop()


def _input_letters(spec: str, w_ndim: int) -> str:
  operands, out = spec.replace(" ", "").split("->")
  xs, ws = operands.split(",")
  if len(ws) != w_ndim:
    raise ValueError(f"einsum {spec!r} does not match a weight of rank {w_ndim}")
  return "".join(c for c in ws if c in xs and c not in out)


def observe_einsum(spec: str, x: jax.Array, p: Probe) -> None:
  """Records Σ x xᵀ over the inputs that `einsum(spec, x, p.weight)` contracts."""
  if not _ACTIVE:
    return
  letters = _input_letters(spec, p.weight.ndim)
  xs = spec.replace(" ", "").split("->")[0].split(",")[0]
  rest = "".join(c for c in xs if c not in letters)
  # [M, n_in]: every position's input vector, in the weight's input-axis order
  n_in = math.prod(x.shape[xs.index(c)] for c in letters)
  flat = jnp.einsum(f"{xs}->{rest}{letters}", x).reshape(-1, n_in)
  flat = flat.astype(jnp.float32)
  _ACTIVE[-1].add(p.name, jnp.einsum("mi,mj->ij", flat, flat, precision=_HI))


def observe_grouped(x: jax.Array, p: Probe, group_sizes: jax.Array) -> None:
  """Records H per expert from the rows of x [A, n_in] routed to it (consecutive groups)."""
  if not _ACTIVE:
    return
  num = p.weight.shape[0]
  ends = jnp.cumsum(group_sizes)
  expert = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")  # [A]
  onehot = (expert[:, None] == jnp.arange(num)[None, :]).astype(jnp.float32)  # [A, E]
  x = x.astype(jnp.float32)
  _ACTIVE[-1].add(p.name, jnp.einsum("ae,ai,aj->eij", onehot, x, x, precision=_HI))


def note_output(p: Probe, out: jax.Array) -> None:
  """Records the shape of a probe's output (before its tap is added)."""
  if _ACTIVE:
    _ACTIVE[-1].outputs[p.name] = tuple(out.shape)


def wrap(tree, names: set[str] | None = None, prefix: str = "", taps: dict | None = None):
  """The tree with each array leaf whose dotted name (prefix + path) is in `names` (all float
  leaves of rank >= 2 when None) replaced by a Probe of that name, with `taps[name]` on its
  output and `taps[name + LOOKUP]` on its lookups when given."""
  taps = taps or {}

  def one(path, leaf):
    name = prefix + path_name(path)
    if isinstance(leaf, jax.Array) and (name in names if names is not None else leaf.ndim >= 2):
      return Probe(leaf, taps.get(name), taps.get(name + LOOKUP), name)
    return leaf

  return jax.tree_util.tree_map_with_path(one, tree)

"""Per-layer-embedding (PLE) tables kept in host memory (`--ple-on-host`).

The PLE table `ple_embed` [V_ple, L, P] is 38-51 % of an E2B/E4B model's parameters, yet a token
reads one row of it (L·P values, ~20 KB in bf16). With `offload`, the table stays in host memory
(on the CPU device, dense or quantized) and each step gathers only the rows of its tokens there
and sends them to the accelerator as `PLERows`, which takes the table's place in `Params`. The
model's one read of the table, `params.ple_embed[ids]`, then returns those rows: the model code
is unchanged and the logits are the same as with the table on the device.

  params, table = offload(params)               # table: HostPLE, params.ple_embed: None
  step_params = table.attach(params, tokens)    # params.ple_embed: PLERows [B, T, L, P]
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from gemma.model.params import Params, pytree_dataclass


@pytree_dataclass
class PLERows:
  """The PLE rows of exactly the tokens of one call, gathered on the host."""

  rows: jax.Array  # [B, T, L, P]

  def __getitem__(self, ids: jax.Array) -> jax.Array:
    """ids: [B, T] (the clamped token ids the rows were gathered for) -> rows [B, T, L, P]."""
    if tuple(ids.shape) != tuple(self.rows.shape[:2]):
      raise ValueError(f"PLE rows were gathered for tokens {tuple(self.rows.shape[:2])}, "
                       f"the model reads {tuple(ids.shape)}")
    return self.rows


def host_device() -> jax.Device:
  try:
    return jax.devices("cpu")[0]
  except RuntimeError as e:
    raise ValueError(f"--ple-on-host needs JAX's CPU backend (JAX_PLATFORMS must include cpu): "
                     f"{e}") from None


@jax.jit
def _take(table, ids):
  return table[ids]  # [B, T] -> [B, T, L, P]; a QArray table dequantizes only these rows


@dataclasses.dataclass
class HostPLE:
  """A PLE table (dense or `QArray`) in host memory, and where the gathered rows go."""

  table: object  # [V_ple, L, P] on the CPU device
  vocab: int  # V_ple: ids outside [0, V_ple) read row 0, as the model does
  target: jax.sharding.Sharding | None = None  # None: the default device

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.table))

  def gather(self, tokens) -> jax.Array:
    """tokens: [B, T] int -> rows [B, T, L, P] on the target device(s)."""
    tokens = np.asarray(tokens)
    ids = np.where((tokens >= 0) & (tokens < self.vocab), tokens, 0).astype(np.int32)
    rows = _take(self.table, jax.device_put(ids, host_device()))
    return jax.device_put(rows, self.target) if self.target is not None else \
        jax.device_put(rows, jax.devices()[0])

  def attach(self, params: Params, tokens) -> Params:
    """params with the rows of `tokens` [B, T] in place of the table."""
    return dataclasses.replace(params, ple_embed=PLERows(self.gather(tokens)))


def offload(params: Params, vocab: int, target=None) -> tuple[Params, HostPLE]:
  """Moves params.ple_embed to host memory. Returns (params without the table, HostPLE).

  vocab: cfg.ple_vocab_size. target: where gathered rows go (e.g. a replicated NamedSharding
  on the model's mesh); default the first device.
  """
  if params.ple_embed is None:
    raise ValueError("--ple-on-host: this model has no per-layer embedding table")
  if isinstance(params.ple_embed, PLERows):
    raise ValueError("the PLE table is already offloaded")
  table = jax.device_put(params.ple_embed, host_device())
  return dataclasses.replace(params, ple_embed=None), HostPLE(table, vocab, target)

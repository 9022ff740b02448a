"""Multi-host (multi-process) runs: `jax.distributed.initialize` wiring and helpers.

One process per host (or per accelerator group) runs the same command; together they see one
global set of devices, `jax.devices()`, over which `gemma.parallel.sharding.make_mesh` builds the
mesh. Only JAX's own machinery is used: `jax.distributed.initialize` (coordinator service,
process discovery and topology exchange) and `jax.experimental.multihost_utils` (gather,
barrier). On CPU the cross-process collectives are JAX's Gloo implementation
(`jax_cpu_collectives_implementation`, "gloo" unless the user chose "mpi").

Flags (see `add_flags`), and what `initialize` does with them:

  no flags                          a no-op: a single-process run, as before
  --coordinator H:P --num-processes N --process-id I
                                    explicit: all three are required together; JAX's cluster
                                    auto-detection is switched off so the environment cannot
                                    override them
  --distributed auto                JAX's own auto-detection (Slurm, Open MPI, Cloud TPU, ...)
                                    fills whatever the three flags above leave unset
  --distributed slurm|ompi|mpi4py|tpu|gcetpu|gketpu|k8s
                                    the same, forcing one of JAX's detection methods

Auto-detection is opt-in on purpose: a single-process command started inside a Slurm
allocation must not silently start waiting for peers that never come.

  from gemma.parallel import distributed
  distributed.initialize(args)                    # first thing after argument parsing
  ...
  logits = distributed.to_host(logits)            # a numpy array on every process
  if distributed.is_main_process():
    np.save(path, logits)

See docs/MULTIHOST.md for the launch recipe.
"""

from __future__ import annotations

import argparse
import re

import jax
import numpy as np
from jax._src import xla_bridge
from jax.experimental import multihost_utils

from gemma.parallel import sharding

DETECTION_METHODS = ("auto", "slurm", "ompi", "mpi4py", "tpu", "gcetpu", "gketpu", "k8s")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_initialized_with: tuple | None = None  # the arguments of the one successful initialize()


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds --coordinator, --num-processes, --process-id and --distributed to `parser`."""
  g = parser.add_argument_group("multi-host (jax.distributed; see docs/MULTIHOST.md)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0's coordinator service, the same on every process")
  g.add_argument("--num-processes", type=int, default=None, metavar="N",
                 help="number of processes in the run (one per host)")
  g.add_argument("--process-id", type=int, default=None, metavar="I",
                 help="this process's index, 0..N-1 (0 runs the coordinator, prints and writes)")
  g.add_argument("--distributed", default=None, choices=DETECTION_METHODS,
                 help="let JAX detect the unset values above from the cluster environment "
                      "(auto, or one named method); off by default")
  return parser


def check_address(address: str) -> str:
  """HOST:PORT (host a name, IPv4 or [IPv6]; port 1..65535), else ValueError naming the flag."""
  m = _ADDRESS.match(address or "")
  if m is None or not 1 <= int(m.group(2)) <= 65535:
    raise ValueError(f"--coordinator must be HOST:PORT with a port in 1..65535 "
                     f"(e.g. host0:1234 or [::1]:1234), got {address!r}")
  return address


def validate(coordinator: str | None, num_processes: int | None, process_id: int | None,
             detect: str | None = None) -> bool:
  """Checks the flags; True when they ask for a multi-process run, False for none at all.

  Without `detect`, --coordinator, --num-processes and --process-id come together or not at
  all. With it, any subset may be given (JAX fills the rest from the environment).
  """
  given = {"--coordinator": coordinator, "--num-processes": num_processes,
           "--process-id": process_id}
  if detect is not None and detect not in DETECTION_METHODS:
    raise ValueError(f"--distributed must be one of {', '.join(DETECTION_METHODS)}, "
                     f"got {detect!r}")
  if detect is None:
    missing = [k for k, v in given.items() if v is None]
    if len(missing) == 3:
      return False
    if missing:
      present = [k for k, v in given.items() if v is not None]
      raise ValueError(f"{' and '.join(present)} also need{'s' if len(present) == 1 else ''} "
                       f"{' and '.join(missing)} (or --distributed auto to detect them)")
  if coordinator is not None:
    check_address(coordinator)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
  if process_id is not None:
    if process_id < 0:
      raise ValueError(f"--process-id must be >= 0, got {process_id}")
    if num_processes is not None and process_id >= num_processes:
      raise ValueError(f"--process-id {process_id} is out of range for --num-processes "
                       f"{num_processes} (0..{num_processes - 1})")
  return True


def initialize(coordinator=None, num_processes: int | None = None,
               process_id: int | None = None, *, detect: str | None = None,
               timeout_s: int = 300) -> bool:
  """Calls `jax.distributed.initialize` once, before any other JAX use; True if it did.

  Takes the parsed CLI `args` (an argparse.Namespace from a parser given `add_flags`) or the
  values themselves: `initialize("host0:1234", 2, 0)`. No flags: a no-op returning False.
  Bad flags raise ValueError naming the flag; a call after JAX has already started its
  backends (any jax.devices(), device_put or computation) raises RuntimeError. Calling it again
  with the same values is a no-op; with different ones, a RuntimeError. `timeout_s` bounds how
  long a process waits for all the others to connect.
  """
  if isinstance(coordinator, argparse.Namespace):
    args = coordinator
    coordinator = getattr(args, "coordinator", None)
    num_processes = getattr(args, "num_processes", None)
    process_id = getattr(args, "process_id", None)
    detect = getattr(args, "distributed", None)
  global _initialized_with
  request = (coordinator, num_processes, process_id, detect)
  if _initialized_with is not None:
    if request == _initialized_with:
      return True
    raise RuntimeError(f"jax.distributed is already initialized with {_initialized_with}; "
                       f"it cannot be initialized again with {request}")
  if not validate(coordinator, num_processes, process_id, detect):
    return False

  if xla_bridge.backends_are_initialized():
    raise RuntimeError("gemma.parallel.distributed.initialize must run before any other JAX use "
                       "(jax.devices(), device_put, a computation): call it right after "
                       "parsing the command line")
  if jax.config.jax_cpu_collectives_implementation is None:
    # CPU processes need a cross-process collectives library; Gloo ships inside jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if detect is None:
    method = "deactivate"  # explicit flags only: the environment must not override them
  else:
    method = None if detect == "auto" else detect
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, cluster_detection_method=method,
                             initialization_timeout=timeout_s)
  _initialized_with = request
  return True


def is_main_process() -> bool:
  """True on process 0, the one that prints and writes files (also in a single-process run)."""
  return jax.process_index() == 0


def to_host(tree):
  """Every leaf as a whole numpy array on every process.

  A leaf sharded over devices of several processes is gathered with
  `multihost_utils.process_allgather` (a collective: every process must call this with the
  same tree); a fully addressable leaf is just copied.
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def place(tree, specs, mesh):
  """Places host values (numpy or process-local arrays, the same on every process) on `mesh`:
  `gemma.parallel.sharding.shard` with `from_host` (each process copies only the shards of its
  own devices). `specs` mirrors `tree` with a PartitionSpec per leaf."""
  return sharding.shard(tree, specs, mesh, from_host=True)


def shard_params(params, mesh):
  """`gemma.parallel.sharding.shard_params` for multi-process meshes: same specs, each leaf
  placed slice by slice from the host (`place`)."""
  return sharding.shard_params(params, mesh, from_host=True)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

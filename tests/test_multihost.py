"""Multi-host wiring (gemma/parallel/distributed.py): flag checks, and a real 2-process run on
localhost.

The 2-process test starts tests/multihost_check.py twice (process ids 0 and 1, 4 host CPU
devices each, JAX's Gloo CPU collectives), which join through `jax.distributed` into one
8-device run, shard the e_style fixture on a 2x4 mesh spanning both processes and check the
gathered logits against one device. This is as far as one machine goes: real hosts, networks
and accelerators are not exercised (docs/MULTIHOST.md).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gemma.parallel import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _parse(*argv):
  return distributed.add_flags(argparse.ArgumentParser()).parse_args(list(argv))


def test_no_flags_is_a_no_op():
  args = _parse()
  assert (args.coordinator, args.num_processes, args.process_id, args.distributed) == (
      None, None, None, None)
  assert distributed.initialize(args) is False
  assert distributed.initialize() is False


def test_flags_parse():
  args = _parse("--coordinator", "host0:1234", "--num-processes", "2", "--process-id", "1")
  assert (args.coordinator, args.num_processes, args.process_id) == ("host0:1234", 2, 1)
  assert distributed.validate(args.coordinator, args.num_processes, args.process_id)
  assert distributed.validate("[::1]:80", 4, 3) and distributed.validate("10.0.0.1:1", 1, 0)
  # with detection, any subset is fine: JAX fills the rest from Slurm / MPI / TPU variables
  assert distributed.validate(None, None, None, "auto")
  assert distributed.validate("host0:1234", None, None, "slurm")


@pytest.mark.parametrize("flags, match", [
    (("localhost:1234", None, None), "--coordinator also needs --num-processes and "
                                     "--process-id"),
    ((None, 2, None), "--num-processes also needs --coordinator and --process-id"),
    (("localhost:1234", 2, None),
     "--coordinator and --num-processes also need --process-id"),
    (("localhost:1234", 2, 2), r"--process-id 2 is out of range for --num-processes 2 \(0..1\)"),
    (("localhost:1234", 2, -1), "--process-id must be >= 0"),
    (("localhost:1234", 0, 0), "--num-processes must be >= 1"),
    (("localhost", 2, 0), "--coordinator must be HOST:PORT"),
    (("localhost:0", 2, 0), "--coordinator must be HOST:PORT"),
    (("localhost:70000", 2, 0), "--coordinator must be HOST:PORT"),
    (("http://h:1", 2, 0), "--coordinator must be HOST:PORT"),
    ((":1234", 2, 0), "--coordinator must be HOST:PORT"),
])
def test_bad_flags_name_the_flag(flags, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(*flags)  # raises before JAX is touched


def test_bad_flags_from_the_command_line():
  with pytest.raises(ValueError, match="--process-id also needs --coordinator and "
                                       "--num-processes"):
    distributed.initialize(_parse("--process-id", "1"))


def test_bad_detection_method():
  with pytest.raises(ValueError, match="--distributed must be one of"):
    distributed.initialize(detect="kubernetes")
  with pytest.raises(SystemExit):  # argparse refuses it too
    _parse("--distributed", "kubernetes")


def test_refuses_after_jax_started():
  import jax

  jax.devices()  # the backend of this pytest process is up
  with pytest.raises(RuntimeError, match="before any other JAX use"):
    distributed.initialize("localhost:1234", 2, 0)
  assert not jax.distributed.is_initialized()


def test_single_process_helpers():
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec as P

  from gemma.parallel import sharding

  assert distributed.is_main_process()
  mesh = sharding.make_mesh("1x1")
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  placed = distributed.place({"a": x}, {"a": P(None, "model")}, mesh)
  assert isinstance(placed["a"], jax.Array) and placed["a"].sharding.mesh == mesh
  np.testing.assert_array_equal(distributed.to_host(placed)["a"], x)
  distributed.barrier("single process")  # no-op


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(port: int, timeout: float) -> list[tuple[int, str, str]]:
  """Starts both workers; returns (returncode, stdout, stderr) each; kills them on timeout."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  cmd = [sys.executable, os.path.join(HERE, "multihost_check.py"), "--coordinator",
         f"localhost:{port}", "--num-processes", "2", "--timeout", "60"]
  procs = [subprocess.Popen([*cmd, "--process-id", str(i)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True) for i in range(2)]
  deadline = time.monotonic() + timeout
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      out.append((p.returncode, stdout, stderr))
      if p.returncode != 0:  # the peer would wait for its partner until its own timeout
        break
  except subprocess.TimeoutExpired:
    out.append((-1, "", f"timed out after {timeout} s"))
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  return out


@pytest.mark.slow
def test_two_processes_on_a_2x4_mesh_match_one_device():
  from jax._src.lib import _jax

  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    pytest.skip("this jaxlib has no Gloo CPU collectives, so CPU processes cannot talk")
  for attempt in range(2):  # a second try only if another program took the free port
    results = _run_two_processes(_free_port(), timeout=150)
    busy = any("Address already in use" in err for _, _, err in results)
    if not busy or attempt:
      break
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i} failed (rc {rc}):\n{err[-3000:]}"
  assert len(results) == 2
  lines = [x for x in results[0][1].splitlines() if x.startswith("{")]  # Gloo logs to stdout
  assert lines, results[0][1][-2000:]
  got = json.loads(lines[-1])
  assert not any(x.startswith("{") for x in results[1][1].splitlines())  # only process 0
  assert (got["processes"], got["devices"], got["local_devices"]) == (2, 8, 4)
  assert got["logits_devices"] == 8 and got["shape"] == [28, 512]
  assert got["rel_fro"] <= 1e-5, got
  assert got["rel_max"] <= 3e-5, got
  assert got["device_put_rel_fro"] <= 1e-5, got  # the CLI's placement works across processes
  assert got["load_mesh_rel_fro"] <= 1e-5, got  # checkpoint.load(..., mesh=): own slices only
  assert got["hf_rel_fro"] <= 1e-4, got  # and it is still the Hugging Face model
  assert got["generate_same_tokens"], got  # params and KV cache across both processes

"""Atomic writes of checkpoint and run directories (and single files).

    out = check_target(path, force)          # before any work: refuse what cannot be written
    with atomic_dir(out, force) as tmp:      # write everything into tmp
      save(tmp)
    # here `out` is the new content, complete and flushed

The content is written into `.NAME.tmp-PID` beside the target. Only when the block ends without
an exception are its files flushed (fsync) and the directory moved into place: onto a new target
by `rename`; onto an existing one (`force`) by one `renameat2(RENAME_EXCHANGE)`, which swaps the
two directories in a single step, after which the old content (now in the temporary name) is
deleted. So at every moment the target is either the old checkpoint, intact, or the new one,
complete. On a filesystem without RENAME_EXCHANGE the old directory is first renamed to
`.NAME.old-PID`, the new one renamed into place, then the old one deleted; if the process dies
between the two renames, the next `check_target` of that path renames the old one back.

An exception or Ctrl-C inside the block deletes the temporary directory and leaves the target as
it was. A SIGKILL leaves `.NAME.tmp-PID` behind: hidden, never read by a loader, and removed
(with a message) by the next write to the same target once PID is no longer running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputError(ValueError):
  """An output path that cannot be written (under a file, not ours to replace, ...)."""


class OutputExists(OutputError, FileExistsError):
  """The output exists and --force was not given."""


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _leftovers(out: Path, kind: str) -> list[tuple[Path, int]]:
  """(path, pid) of `.NAME.<kind>-PID` entries beside `out`."""
  found = []
  for p in out.parent.glob(f".{out.name}.{kind}-*"):
    pid = p.name.rsplit("-", 1)[-1]
    if pid.isdigit():
      found.append((p, int(pid)))
  return found


def recover(out: Path) -> None:
  """Puts back an old directory a killed replacement left renamed (target missing), and removes
  temporary directories of writers that are no longer running, saying so."""
  out = Path(out).absolute()
  if not out.parent.is_dir():
    return
  for p, pid in _leftovers(out, "old"):
    if not _alive(pid):
      if not out.exists():
        _log(f"restoring {out} from {p.name}: a replacement was interrupted")
        os.rename(p, out)
      else:
        _log(f"removing {p}: the old copy of an interrupted replacement")
        shutil.rmtree(p, ignore_errors=True)
  for p, pid in _leftovers(out, "tmp"):
    if not _alive(pid) and pid != os.getpid():
      _log(f"removing {p}: left by an interrupted write (process {pid})")
      if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
      else:
        p.unlink(missing_ok=True)


def check_target(out: str | Path, force: bool = False, kind: str = "checkpoint",
                 replaceable=None) -> Path:
  """The absolute output path, after refusing one that cannot be written: under a regular file,
  itself a regular file, an existing non-empty directory without `force`, or (even with
  `force`) a non-empty directory that `replaceable(path)` says is not of this kind (so
  `--force` never deletes an unrelated folder). Call it before loading or computing anything."""
  out = Path(out).absolute()
  for parent in out.parents:
    if parent.exists():
      if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a directory")
      break
  recover(out)
  if out.exists() and not out.is_dir():
    raise OutputError(f"cannot write the {kind} {out}: it is a file")
  if out.is_dir() and any(out.iterdir()):
    if not force:
      raise OutputExists(f"{out} already exists (pass --force to replace it)")
    if replaceable is not None and not replaceable(out):
      raise OutputError(f"{out} is a non-empty directory that is not a {kind}; refusing to "
                        "replace it (choose another output path)")
  return out


def _fsync(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root: Path) -> None:
  for dirpath, _, files in os.walk(root):
    for f in files:
      _fsync(Path(dirpath) / f)
    _fsync(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
  """Swaps two directories in one step (Linux renameat2); False where unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  return False


def _replace(tmp: Path, out: Path) -> None:
  """Moves the complete `tmp` onto `out` (which may exist)."""
  if not out.exists():
    os.rename(tmp, out)
  elif _exchange(tmp, out):
    shutil.rmtree(tmp)  # now the old content
  else:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
  _fsync(out.parent)


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, kind: str = "checkpoint",
               replaceable=None):
  """Yields a temporary directory beside `out`; moves it onto `out` when the block completes
  (see the module docstring). `force` and `replaceable` as for `check_target`."""
  out = check_target(out, force, kind, replaceable)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    _fsync_tree(tmp)
    _replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
  """Opens a temporary file beside `path`; on success it is flushed and renamed onto `path`."""
  path = Path(path).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise

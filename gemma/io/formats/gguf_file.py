"""GGUF file reader (llama.cpp's format): the metadata and tensor table parsed directly from the
file (the `gguf` package's `GGUFReader` takes about 30 s on a 262k-token vocabulary; this takes
well under a second), and tensors dequantized one at a time with `gguf.quants.dequantize`.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gemma.io.formats.common import CheckpointError, Loader

MAGIC = b"GGUF"
_MISSING = object()


def is_gguf(path: str | Path) -> bool:
  """True for a file that starts with the GGUF magic."""
  path = Path(path)
  if not path.is_file():
    return False
  try:
    with path.open("rb") as f:
      return f.read(4) == MAGIC
  except OSError:
    return False


# ----------------------------------------------------------------------------------- header
# GGUF value types (gguf.constants.GGUFValueType): struct format and numpy dtype of scalars.
_FLOAT32, _STRING, _ARRAY = 6, 8, 9
_SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
            4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"),
            10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # numpy order: GGML's `ne` reversed, so a matrix is [out, in]
  qtype: int  # gguf.GGMLQuantizationType value
  offset: int  # absolute byte offset of the data in the file
  nbytes: int


class _Cursor:
  """Sequential little-endian reads over the mapped file; running off the end is an error."""

  def __init__(self, buf, path: Path):
    self.buf, self.pos, self.path = buf, 0, path

  def take(self, n: int) -> int:
    if n < 0 or self.pos + n > len(self.buf):
      raise CheckpointError(f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, "
                            f"file has {len(self.buf)})")
    start, self.pos = self.pos, self.pos + n
    return start

  def scalar(self, fmt: str):
    return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

  def string(self) -> str:
    n = self.scalar("<Q")
    start = self.take(n)
    try:
      return bytes(self.buf[start:start + n]).decode("utf-8")
    except UnicodeDecodeError as e:
      raise CheckpointError(f"{self.path}: invalid UTF-8 string in the GGUF header ({e})") from None

  def value(self, vtype: int):
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, n = self.scalar("<I"), self.scalar("<Q")
      if etype == _STRING:
        if n * 8 > len(self.buf) - self.pos:
          raise CheckpointError(f"{self.path}: truncated GGUF header (a string array of {n} "
                                "items does not fit in the file)")
        return [self.string() for _ in range(n)]
      if etype == _ARRAY:
        return [self.value(_ARRAY) for _ in range(n)]
      if etype not in _SCALARS:
        raise CheckpointError(f"{self.path}: unknown GGUF value type {etype}")
      dtype = np.dtype(_SCALARS[etype][1])
      start = self.take(n * dtype.itemsize)
      return np.frombuffer(self.buf, dtype, count=n, offset=start).copy()
    if vtype not in _SCALARS:
      raise CheckpointError(f"{self.path}: unknown GGUF value type {vtype}")
    value = self.scalar(_SCALARS[vtype][0])
    # float32: the shortest decimal that rounds to it (1e-06, not 9.999999974752427e-07)
    return float(str(np.float32(value))) if vtype == _FLOAT32 else value


def _gguf():
  try:
    import gguf
  except ImportError:
    raise CheckpointError("reading GGUF files needs the `gguf` package (pip install gguf)"
                          ) from None
  return gguf


class GGUFFile:
  """A GGUF file's metadata and tensor table; tensor data is memory-mapped and read lazily.

  Raises CheckpointError for anything that is not a complete GGUF v2/v3 file, including a
  truncated one (every tensor's byte range is checked against the file size up front).
  """

  def __init__(self, path: str | Path):
    gguf = _gguf()
    self.path = Path(path)
    try:
      with self.path.open("rb") as f:
        head = f.read(8)
        if head[:4] != MAGIC:
          raise CheckpointError(f"{self.path}: not a GGUF file (magic {head[:4]!r})")
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
      raise CheckpointError(f"{self.path}: cannot read ({e})") from None
    cur = _Cursor(self._mm, self.path)
    cur.take(4)
    self.version = cur.scalar("<I")
    if self.version not in (2, 3):
      raise CheckpointError(f"{self.path}: unsupported GGUF version {self.version} (2 or 3; "
                            "a huge number means a big-endian file)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > len(self._mm) or n_kv > len(self._mm):
      raise CheckpointError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    self.metadata: dict[str, Any] = {}
    for _ in range(n_kv):
      key = cur.string()
      self.metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
      name = cur.string()
      n_dims = cur.scalar("<I")
      if n_dims > 8:
        raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dims (corrupt header)")
      ne = [cur.scalar("<Q") for _ in range(n_dims)]
      infos.append((name, tuple(reversed(ne)), cur.scalar("<I"), cur.scalar("<Q")))
    align = int(self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // align) * align
    self.tensors: dict[str, TensorInfo] = {}
    truncated = []
    for name, shape, qtype, offset in infos:
      try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
      except (ValueError, KeyError):
        raise CheckpointError(f"{self.path}: tensor {name!r} has unknown type {qtype}") from None
      n = math.prod(shape)
      if shape and shape[-1] % block:
        raise CheckpointError(f"{self.path}: tensor {name!r} {shape} is not whole blocks")
      if name in self.tensors:
        raise CheckpointError(f"{self.path}: tensor {name!r} appears twice")
      info = TensorInfo(name, shape, qtype, data_start + offset, n // block * type_size)
      if info.offset + info.nbytes > len(self._mm):
        truncated.append(name)
      self.tensors[name] = info
    if truncated:
      raise CheckpointError(
          f"{self.path}: truncated GGUF file ({len(self._mm)} bytes): the data of "
          f"{len(truncated)} tensors lies past the end ({', '.join(truncated[:5])}"
          f"{', ...' if len(truncated) > 5 else ''})")

  @property
  def architecture(self) -> str:
    return str(self.metadata.get("general.architecture", ""))

  def get(self, key: str, default=_MISSING):
    """A metadata value (arrays of numbers are numpy arrays, of strings lists)."""
    if key in self.metadata:
      return self.metadata[key]
    if default is _MISSING:
      raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
    return default

  def arch(self, key: str, default=_MISSING):
    """`{architecture}.{key}`, e.g. arch("block_count")."""
    return self.get(f"{self.architecture}.{key}", default)

  def load(self, name: str) -> np.ndarray:
    """Dequantizes one tensor to float32, shape `info.shape` ([out, in] for matrices)."""
    gguf = _gguf()
    info = self.tensors[name]
    qtype = gguf.GGMLQuantizationType(info.qtype)
    raw = np.frombuffer(self._mm, np.uint8, count=info.nbytes, offset=info.offset)
    try:
      raw = raw.reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, qtype))
      return np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(info.shape)
    except NotImplementedError as e:
      raise CheckpointError(f"{self.path}: tensor {name!r}: {e}") from None
    except ValueError as e:
      raise CheckpointError(f"{self.path}: tensor {name!r} {qtype.name}: cannot decode ({e})"
                            ) from None

  def iter_tensors(self) -> Iterator[tuple[str, Loader]]:
    for name in self.tensors:
      yield name, (lambda n=name: self.load(n))


def open_gguf(path: str | Path) -> GGUFFile:
  return GGUFFile(path)

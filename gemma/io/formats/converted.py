"""Our converted checkpoint format: an Orbax checkpoint of the params tree plus the config.

Layout of a converted directory:

    gemma_config.json   {"format": "gemma4-jax-converted", "version": 1, "config": {...},
                         "quant": {recipe} (quantized checkpoints only)}
    params/             Orbax PyTree checkpoint (OCDBT, uncompressed) of the params as a nested
                        dict keyed like `leaf_names` ("layers" -> "3" -> "attn" -> "q"); in a
                        quantized checkpoint a quantized weight is a dict of its QArray children
                        ("layers.3.attn.q.codes", ".scales"), whose static metadata (spec, layout,
                        shape) follows from the config and the recipe
    tokenizer.model     optional copy of the tokenizer
    generation_config.json  optional copy from an HF source

Loading checks every leaf's shape against `abstract(cfg)` (or its quantized form) from the
metadata before reading data, then restores the whole tree in one StandardCheckpointer call
straight into arrays of the requested dtype (Orbax/TensorStore cast while reading, so the host
never holds a second copy). With a `finish` hook (quantize on load) it restores one top-level
group (the embedding, one layer, ...) at a time instead.

With a device mesh, every leaf is restored straight into its `gemma.parallel.sharding.param_specs`
sharding (QArray children included, placed as `param_specs` says): Orbax asks TensorStore only
for the slices this process's devices own, and TensorStore reads the stored chunks that overlap
them. `save_converted` stores chunks of at most CHUNK_BYTES, so a process that owns 1/8 of a large
weight reads about 1/8 of it; a checkpoint stored with one chunk per array (as earlier versions
wrote them) is still read whole by every process.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import shutil
import types
import typing
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gemma.io import atomic
from gemma.io.formats.common import CheckpointError, Finish, check_finite, log, progress
from gemma.io.formats.gguf import GGUFFile
from gemma.io.tokenizer_gguf import model_proto_from_gguf
from gemma.model.config import ModelConfig
from gemma.model.params import Params, abstract, leaf_names
from gemma.parallel.sharding import leaf_shardings
from gemma.quant.footprint import quantized_abstract
from gemma.quant.recipes import recipe_from_dict, recipe_to_dict

FORMAT = "gemma4-jax-converted"
VERSION = 1
CONFIG_FILE = "gemma_config.json"
PARAMS_DIR = "params"
# Largest stored chunk: TensorStore reads whole chunks, so a process that owns 1/8 of a weight
# reads about 1/8 of it (not all of it) only when weights are stored in several chunks.
CHUNK_BYTES = 16 << 20


# ------------------------------------------------------------------------------- config
def _encode(value: Any) -> Any:
  if isinstance(value, enum.Enum):
    return value.value
  if dataclasses.is_dataclass(value):
    return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, tuple | list):
    return [_encode(v) for v in value]
  return value


def _decode(tp: Any, value: Any, where: str) -> Any:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (types.UnionType, typing.Union):
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _decode(inner[0], value, where)
  if origin is tuple:
    if not isinstance(value, list):
      raise ValueError(f"{where}: expected a list, got {value!r}")
    return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    return tp(value)
  if dataclasses.is_dataclass(tp):
    return _decode_dataclass(tp, value, where)
  if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
    return float(value)
  if tp in (int, str, bool) and type(value) is tp:
    return value
  raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _decode_dataclass(cls, data: Any, where: str):
  if not isinstance(data, dict):
    raise ValueError(f"{where}: expected an object, got {data!r}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{where}: unknown fields {unknown} (written by a newer version?)")
  return cls(**{k: _decode(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def config_to_dict(cfg: ModelConfig) -> dict:
  """JSON-ready, version-tagged dict of every ModelConfig field (enums as their values)."""
  return {"format": FORMAT, "version": VERSION, "config": _encode(cfg)}


def config_from_dict(data: dict) -> ModelConfig:
  """Inverse of `config_to_dict` (exact round trip). Missing fields take their defaults."""
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise CheckpointError(f"not a {FORMAT} config (format tag {data.get('format')!r})"
                          if isinstance(data, dict) else f"not a {FORMAT} config")
  if data.get("version") != VERSION:
    raise CheckpointError(f"{FORMAT} config version {data.get('version')!r} is not supported "
                          f"(this code reads version {VERSION})")
  try:
    return _decode_dataclass(ModelConfig, data.get("config"), "config")
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"invalid {CONFIG_FILE}: {e}") from None


# ------------------------------------------------------------------------------ params
def _nested(names: list[str], leaves: list) -> dict:
  tree: dict = {}
  for name, leaf in zip(names, leaves, strict=True):
    *parents, last = name.split(".")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}" if prefix else str(key)
    out.update(_flat(value, name) if isinstance(value, dict) else {name: value})
  return out


def expected_tree(cfg: ModelConfig, dtype, recipe=None):
  """The abstract params a checkpoint of `cfg` (quantized by `recipe`, if any) restores into."""
  if recipe is None:
    return abstract(cfg, dtype)
  return quantized_abstract(cfg, recipe, dtype, float_dtype=dtype)


def checksum(a) -> str:
  """CRC-32 of an array's bytes as stored (hex)."""
  return f"{zlib.crc32(np.ascontiguousarray(np.asarray(a)).view(np.uint8).ravel()):08x}"


def save_converted(out_dir: str | Path, cfg: ModelConfig, params: Params,
                   tokenizer_file: str | Path | None = None, force: bool = False,
                   recipe=None, tokenizer_source: str | Path | None = None) -> Path:
  """Writes a converted checkpoint directory (see the module docstring). Returns its path.

  `recipe` (a `gemma.quant.Recipe`) marks `params` as quantized by it. Arrays are stored in
  chunks of at most CHUNK_BYTES (for sharded loading; see `load`), with a CRC-32 per stored
  array in the config file (`checksums`). The directory is written beside `out_dir` and moved
  into place only when complete (`gemma.io.atomic`): an existing checkpoint there is refused
  without `force`, and with it replaced only at that last step. `tokenizer_source`: a checkpoint
  whose tokenizer and generation config are copied in too (`copy_tokenizer`).
  """
  want = expected_tree(cfg, "float32", recipe)
  if leaf_names(params) != leaf_names(want) or [x.shape for x in jax.tree.leaves(params)] != [
      x.shape for x in jax.tree.leaves(want)]:
    raise ValueError(f"params do not match config {cfg.name}")
  names, leaves = leaf_names(params), jax.tree.leaves(params)
  meta = config_to_dict(cfg)
  if recipe is not None:
    meta["quant"] = recipe_to_dict(recipe)
  meta["checksums"] = {n: checksum(x) for n, x in zip(names, leaves, strict=True)}
  with atomic.atomic_dir(out_dir, force, replaceable=is_converted) as tmp:
    # Uncompressed: zstd saves ~20% of disk on bf16 weights but makes loading CPU-bound.
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    tree = _nested(names, leaves)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
    checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(tree, save_args=save_args))
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if tokenizer_file is not None:
      src = Path(tokenizer_file)
      shutil.copyfile(src, tmp / ("tokenizer.model" if src.suffix == ".model" else src.name))
    if tokenizer_source is not None:
      copy_tokenizer(tokenizer_source, tmp)
  return Path(out_dir).absolute()


def verify(path: str | Path, flat: dict[str, Any], stored_dtypes: dict[str, Any],
           sums: dict[str, str] | None) -> None:
  """Checks restored arrays against the checksums the checkpoint recorded, cast back to the
  stored dtype (exact when they were read into the same or a wider float type; an array read
  into a narrower one, e.g. float32 stored and bfloat16 asked for, cannot be checked and is
  skipped). Raises CheckpointError naming every corrupt tensor. A checkpoint written before
  checksums were recorded (`sums` None or empty) is not checked."""
  if not sums:
    return
  bad = []
  for n, a in flat.items():
    stored = np.dtype(stored_dtypes[n])
    if n not in sums or np.dtype(a.dtype).itemsize < stored.itemsize:
      continue
    if checksum(np.asarray(a).astype(stored)) != sums[n]:
      bad.append(n)
  if bad:
    raise CheckpointError(f"{path}: checksum mismatch, the stored data of these tensors is "
                          f"corrupt: {', '.join(bad)}")


def has_checksums(path: str | Path) -> bool:
  return bool(_read_meta(Path(path)).get("checksums"))


def is_converted(path: str | Path) -> bool:
  path = Path(path)
  return path.is_dir() and (path / CONFIG_FILE).exists()


def _read_meta(path: Path) -> dict:
  try:
    return json.loads((path / CONFIG_FILE).read_text())
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a converted checkpoint)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from None


def read_config(path: Path) -> ModelConfig:
  return config_from_dict(_read_meta(path))


def read_recipe(path: str | Path):
  """The `gemma.quant.Recipe` a converted checkpoint was quantized with; None if it is float."""
  data = _read_meta(Path(path)).get("quant")
  if data is None:
    return None
  try:
    return recipe_from_dict(data)
  except ValueError as e:
    raise CheckpointError(f"{Path(path) / CONFIG_FILE}: {e}") from None


def load(path: str | Path, dtype, cfg: ModelConfig | None = None,
         finish: Finish | None = None, mesh=None,
         verify_checksums: bool = True) -> tuple[ModelConfig, Params]:
  """Loads a converted directory. Returns (config, params cast to dtype).

  Bit-exact when `dtype` is the saved dtype; a quantized checkpoint loads its QArrays as stored
  (float leaves cast to `dtype`). `finish` (float checkpoints only) maps each leaf as it is
  read. With a `mesh` (a `jax.sharding.Mesh`) each leaf is restored with its
  `gemma.parallel.sharding.param_specs` sharding, reading only the chunks that overlap the slices
  this process owns. Raises CheckpointError naming every missing, unexpected and mis-shaped
  leaf, or the file that cannot be read. `verify_checksums` checks every array against the CRC-32
  recorded at write time (`verify`; skipped with a mesh, where no process holds whole arrays).
  """
  path = Path(path)
  cfg = cfg or read_config(path)
  recipe = read_recipe(path)
  if recipe is not None and finish is not None:
    raise CheckpointError(f"{path} is already quantized (recipe {recipe.name}); "
                          "load it without quantizing again")
  want = expected_tree(cfg, dtype, recipe)
  names, want_leaves = leaf_names(want), jax.tree.leaves(want)
  root = (path / PARAMS_DIR).absolute()
  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(root)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    stored = _flat(dict(meta))
  except Exception as e:
    raise CheckpointError(f"{root}: cannot read Orbax metadata ({e})") from None
  expected = dict(zip(names, want_leaves, strict=True))
  missing = [n for n in names if n not in stored]
  unexpected = [n for n in stored if n not in expected]
  misshaped = [f"{n}: {tuple(stored[n].shape)} != {expected[n].shape}" for n in names
               if n in stored and tuple(stored[n].shape) != expected[n].shape]
  if missing or unexpected or misshaped:
    raise CheckpointError(f"{path} does not match config {cfg.name}:\n" + "\n".join(
        f"  {kind}: {', '.join(items)}" for kind, items in
        (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items))
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = dict.fromkeys(names, one)
  else:
    shardings = leaf_shardings(want, mesh)
  target = _nested(names, [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[n])
                           for n, s in zip(names, want_leaves, strict=True)])
  dtypes = {n: stored[n].dtype for n in names}
  sums = _read_meta(path).get("checksums") if verify_checksums and mesh is None else None

  def check(flat: dict[str, Any]) -> None:
    verify(path, flat, dtypes, sums)
    for n, a in flat.items():
      check_finite(n, a, path)

  try:
    flat = _restore_by_group(root, target, finish, check) if finish else _flat(
        checkpointer.restore(root, target))
  except Exception as e:
    raise CheckpointError(f"{root}: cannot restore params ({type(e).__name__}: {e})") from None
  if not finish:
    check(flat)
  return cfg, jax.tree.unflatten(jax.tree.structure(want), [flat[n] for n in names])


def _restore_by_group(root: Path, target: dict, finish: Finish, check=None) -> dict[str, Any]:
  """Restores one top-level group (embed, layers.N, ...) at a time, mapping each leaf through
  `finish` (after `check` of the group's arrays) before the next group is read."""
  groups = [{key: value} for key, value in target.items() if key != "layers"]
  groups += [{"layers": {i: layer}} for i, layer in target.get("layers", {}).items()]
  checkpointer, out = ocp.PyTreeCheckpointer(), {}
  for done, part in enumerate(groups, 1):
    args = ocp.args.PyTreeRestore(item=part, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(part))
    group = _flat(checkpointer.restore(root, args=args))
    check(group)
    for name, leaf in group.items():
      out[name] = finish(name, leaf)
    progress(done, len(groups), "loading groups")
  return out


def copy_tokenizer(src_path: str | Path, out_dir: str | Path) -> None:
  """Puts the source checkpoint's tokenizer beside a converted one: `tokenizer.model` rebuilt
  from a GGUF file's metadata, or the source folder's tokenizer.model / tokenizer.json /
  tokenizer_config.json (and generation_config.json) when present."""
  src, out = Path(src_path), Path(out_dir)
  if src.is_file() and src.suffix == ".gguf":
    if (out / "tokenizer.model").exists():
      return

    try:
      (out / "tokenizer.model").write_bytes(model_proto_from_gguf(GGUFFile(src)))
    except NotImplementedError as e:  # e.g. Gemma 4 GGUF vocabularies (BPE merges)
      log(f"tokenizer not written: {e}")
    return
  folder = src if src.is_dir() else src.parent
  for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json"):
    if (folder / name).is_file() and not (out / name).exists():
      shutil.copyfile(folder / name, out / name)

"""Export to a Hugging Face directory: what `gemma.io.formats.hf` reads, written back.

    out, notes = export_hf(params, cfg, "out_dir", dtype="bfloat16", tokenizer_source=ckpt)

The directory holds `config.json` (`hf_config.to_hf_config`: `Gemma4ForCausalLM` /
`Gemma3ForCausalLM`), `generation_config.json` (the config's BOS/EOS/PAD ids over the
source's own generation settings, if any), the weights as `model.safetensors` or as shards
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, and the tokenizer files
the source checkpoint has. Tensor names are "model." + the names of `hf.TABLE` run backwards
(`inverse.source_tensors`): one table for both directions. Fused projections are split,
quantized weights dequantized, everything cast to `dtype` (`inverse.named_arrays`, whose notes
say what is lost). The tied LM head is not written (`tie_word_embeddings`). The directory is
written atomically (`gemma.io.atomic`): an existing output is refused without `force`, and a
failed export leaves no partial directory.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma.io import atomic
from gemma.io.formats import hf
from gemma.io.formats.common import log, progress
from gemma.io.formats.gguf import GGUFFile
from gemma.io.formats.hf_config import to_hf_config
from gemma.io.formats.inverse import named_arrays, source_tensors
from gemma.io.tokenizer_gguf import model_proto_from_gguf
from gemma.model.config import ModelConfig
from gemma.model.params import Params

PREFIX = "model."  # Gemma4ForCausalLM / Gemma3ForCausalLM: the text model's tensors
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_TAGS = {np.dtype("<f4"): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype("<f2"): "F16",
         np.dtype("<i4"): "I32", np.dtype("<i8"): "I64"}


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def hf_tensors(params: Params, cfg: ModelConfig, dtype: str = "bfloat16"
               ) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
  """([(HF tensor name, array)] in name order, notes): the tensors of the exported checkpoint."""
  if str(dtype) not in DTYPES:
    raise ValueError(f"export dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
  named, notes = named_arrays(params, cfg, DTYPES[str(dtype)])
  # views of `named` (transposes, reshapes): each is made contiguous only as it is written, so
  # the host holds the model once at the export dtype, plus one tensor
  tensors = [(PREFIX + n, a) for n, a in source_tensors(hf.TABLE, named)]
  return sorted(tensors, key=lambda t: _natural(t[0])), notes


def plan_shards(tensors: list[tuple[str, np.ndarray]], max_shard_bytes: int
                ) -> list[list[tuple[str, np.ndarray]]]:
  """Consecutive groups of at most `max_shard_bytes` of data (a larger tensor is alone)."""
  shards: list[list[tuple[str, np.ndarray]]] = [[]]
  size = 0
  for name, a in tensors:
    if shards[-1] and size + a.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, a))
    size += a.nbytes
  return shards


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]],
                      on_tensor=None) -> int:
  """Writes one safetensors file (8-byte little-endian header length, JSON header padded with
  spaces to 8 bytes, then the tensors' little-endian bytes in order); returns the data bytes.
  `on_tensor(nbytes)` is called after each tensor is written."""
  header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, a in tensors:
    if a.dtype not in _TAGS:
      raise ValueError(f"{name}: dtype {a.dtype} has no safetensors tag here")
    header[name] = {"dtype": _TAGS[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for _, a in tensors:
      a = a.astype(a.dtype.newbyteorder("<"), copy=False) if a.dtype.byteorder == ">" else a
      f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
      if on_tensor is not None:
        on_tensor(a.nbytes)
  return offset


def write_weights(out: Path, tensors: list[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> list[str]:
  """`model.safetensors`, or shards plus `model.safetensors.index.json` when the data exceeds
  `max_shard_bytes`; returns the file names written. Progress goes to stderr."""
  shards = plan_shards(tensors, max_shard_bytes)
  total = sum(a.nbytes for _, a in tensors)
  count = [0, 0]

  def tick(nbytes: int) -> None:
    count[0] += 1
    count[1] += nbytes
    progress(count[0], len(tensors), "writing tensors", f"{count[1] / 1e9:.2f}/"
             f"{total / 1e9:.2f} GB")

  if len(shards) == 1:
    write_safetensors(out / SINGLE, shards[0], tick)
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for fname, shard in zip(names, shards, strict=True):
    write_safetensors(out / fname, shard, tick)
    weight_map.update({name: fname for name, _ in shard})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
  return [*names, INDEX]


def copy_tokenizer(source: str | Path | None, out: Path) -> list[str]:
  """Copies the tokenizer files of the source checkpoint (its folder) into `out`; a GGUF file's
  SentencePiece vocabulary is rebuilt as `tokenizer.model`. Returns notes on what is missing."""
  if source is None:
    return ["no tokenizer source given: the export has no tokenizer files (copy them from the "
            "original model)"]
  src = Path(source)
  if src.is_file() and src.suffix == ".gguf":
    try:
      (out / "tokenizer.model").write_bytes(model_proto_from_gguf(GGUFFile(src)))
    except (NotImplementedError, ValueError) as e:
      return [f"the GGUF source has no tokenizer files and its vocabulary cannot be rebuilt "
              f"({e}): the export has no tokenizer (copy it from the original model)"]
    return ["tokenizer.model rebuilt from the GGUF metadata (the source has no "
            "tokenizer.json / tokenizer_config.json / chat template files)"]
  folder = src if src.is_dir() else src.parent
  copied = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
  for name in copied:
    shutil.copyfile(folder / name, out / name)
  if not copied:
    return [f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...; an Orbax "
            "checkpoint has none): the export has no tokenizer (copy it from the original model)"]
  return []


def _multimodal_note(source: str | Path | None) -> list[str]:
  """A note when the source is a multimodal HF checkpoint (its towers are not exported)."""
  if source is None or not (Path(source) / "config.json").is_file():
    return []
  try:
    src = json.loads((Path(source) / "config.json").read_text())
  except (OSError, ValueError):
    return []
  towers = [k for k in ("vision_config", "audio_config") if src.get(k)]
  if not towers:
    return []
  return [f"text model only: the source's {' and '.join(t.split('_')[0] for t in towers)} "
          "tower(s) are not exported (the export is a CausalLM)"]


def generation_config(cfg: ModelConfig, source: str | Path | None) -> dict:
  """The source's `generation_config.json` (sampling defaults), if any, with the config's ids."""
  gen: dict = {}
  if source is not None:
    src = Path(source)
    f = (src if src.is_dir() else src.parent) / "generation_config.json"
    if f.is_file():
      gen = json.loads(f.read_text())
  eos = list(cfg.eos_ids)
  gen.update(bos_token_id=cfg.bos_id, pad_token_id=cfg.pad_id,
             eos_token_id=eos[0] if len(eos) == 1 else eos)
  gen.pop("transformers_version", None)
  return dict(sorted(gen.items()))


def is_hf_export(path: Path) -> bool:
  """What `--force` may replace: an HF directory (it has config.json)."""
  return (Path(path) / "config.json").is_file()


def export_hf(params: Params, cfg: ModelConfig, out: str | Path, *, dtype: str = "bfloat16",
              tokenizer_source: str | Path | None = None, force: bool = False,
              max_shard_bytes: int = 2_000_000_000) -> tuple[Path, list[str]]:
  """Writes `params` (fused or not, float or quantized) as a Hugging Face text CausalLM
  directory at `out` (see the module docstring). Returns (out path, notes): what the export
  loses (dequantized weights, narrowing casts) and what it lacks (tokenizer files).

  Raises ValueError for a config transformers cannot express (naming the field) or an unknown
  dtype, and `atomic.OutputExists` for an existing output without `force`; nothing is written
  then."""
  if max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
  if str(dtype) not in DTYPES:
    raise ValueError(f"export dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
  # before any work: refuse what HF cannot express
  config = dict(sorted({**to_hf_config(cfg), "dtype": str(dtype)}.items()))
  target = atomic.check_target(out, force, kind="Hugging Face checkpoint",
                               replaceable=is_hf_export)
  t0 = time.perf_counter()
  tensors, notes = hf_tensors(params, cfg, dtype)
  with atomic.atomic_dir(target, force, kind="Hugging Face checkpoint",
                         replaceable=is_hf_export) as tmp:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = generation_config(cfg, tokenizer_source)
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_weights(tmp, tensors, max_shard_bytes)
    notes = notes + copy_tokenizer(tokenizer_source, tmp) + _multimodal_note(tokenizer_source)
  size = sum(a.nbytes for _, a in tensors)
  log(f"wrote {target} ({len(tensors)} tensors, {size / 1e9:.2f} GB) in "
      f"{time.perf_counter() - t0:.1f} s")
  return target, notes

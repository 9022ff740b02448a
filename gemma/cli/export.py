"""`gemma4 export`: a checkpoint (any format we read, quantized or fine-tuned and merged) as a
Hugging Face directory or a GGUF file, or a LoRA run's adapters as a PEFT adapter (flags and
JSON fields are a contract).

  gemma4 export --checkpoint PATH --format hf --out DIR [--dtype bfloat16|float32]
  gemma4 export --checkpoint PATH --format gguf --out FILE.gguf [--type f32|f16|bf16|q8_0]
      [--any-config]
  gemma4 export --adapters RUN_DIR --format peft --out DIR

Every export is written atomically; an existing --out needs --force. What the target format
loses (dequantized weights, a narrowing cast, a missing tokenizer) is printed, one line each.
The last stdout line is JSON: format, out, notes (those lines).
"""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp

from gemma.io import checkpoint
from gemma.io.atomic import check_target
from gemma.io.formats import gguf_export, hf_export
from gemma.training import peft_export

FORMATS = ("hf", "gguf", "peft")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def add_parser(sub, presets) -> None:
  ex = sub.add_parser("export", help="write a Hugging Face directory or a GGUF file (other "
                      "engines load it), or a LoRA run's adapters as a PEFT adapter")
  ex.add_argument("--format", required=True, choices=FORMATS,
                  help="hf: config.json + safetensors; gguf: one file for llama.cpp / Ollama; "
                  "peft: adapter_config.json + adapter_model.safetensors of --adapters")
  ex.add_argument("--checkpoint", default=None, help="the model to export (hf, gguf)")
  ex.add_argument("--adapters", default=None, help="a `gemma4 finetune --out` LoRA run (peft)")
  ex.add_argument("--out", required=True, help="output directory (hf, peft) or .gguf file")
  ex.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                  help="hf: stored float dtype (default bfloat16)")
  ex.add_argument("--type", choices=GGUF_TYPES, default=None,
                  help="gguf: tensor type of the weight matrices (default f32; norms stay f32)")
  ex.add_argument("--any-config", action="store_true",
                  help="gguf: also write a config that llama.cpp's runtime cannot run (e.g. a "
                  "KV-sharing layout it does not take); our loader reads it back")
  ex.add_argument("--preset", choices=list(presets), default=None,
                  help="config of an official Orbax checkpoint (default: inferred)")
  ex.add_argument("--no-verify", dest="verify", action="store_false",
                  help="skip the CRC-32 check of a converted checkpoint's arrays")
  ex.add_argument("--force", action="store_true", help="overwrite an existing --out")


def _check_flags(args) -> None:
  """Refuses flag combinations that do not fit the format, before anything is read."""
  if args.format == "peft":
    if args.adapters is None or args.checkpoint is not None:
      raise ValueError("--format peft exports a LoRA run: pass --adapters RUN_DIR (its base "
                       "checkpoint is recorded in the run), not --checkpoint")
  elif args.checkpoint is None or args.adapters is not None:
    raise ValueError(f"--format {args.format} exports a model: pass --checkpoint PATH (merge a "
                     "LoRA run first with `gemma4 merge-lora`, or export its adapters with "
                     "--format peft)")
  if args.any_config and args.format != "gguf":
    raise ValueError(f"--any-config is for --format gguf, not {args.format}")
  if args.type is not None and args.format != "gguf":
    raise ValueError(f"--type is for --format gguf, not {args.format} (use --dtype)")
  if args.dtype is not None and args.format != "hf":
    raise ValueError(f"--dtype is for --format hf, not {args.format}"
                     + (" (use --type)" if args.format == "gguf" else ""))
  if args.format == "gguf" and not args.out.endswith(".gguf"):
    raise ValueError(f"--out {args.out}: a GGUF export is one file named *.gguf")


def _check_out(out: str, fmt: str, force: bool) -> None:
  """Refuses an output that cannot be written: a GGUF file over a directory or an existing file
  without --force; a directory as `check_target` refuses it (never replacing an unrelated
  non-empty folder)."""
  if fmt != "gguf":
    check_target(out, force, kind="Hugging Face directory" if fmt == "hf" else "PEFT adapter",
                 replaceable=lambda p: any((p / f).exists() for f in (
                     "config.json", "adapter_config.json")))
    return
  gguf_export.check_out(out, force)


def cmd_export(args) -> int:
  _check_flags(args)
  _check_out(args.out, args.format, args.force)  # before reading anything
  if args.format == "peft":
    out, notes = peft_export.export_peft(args.adapters, args.out, force=args.force)
  else:
    # a bfloat16 HF export is read in bfloat16 (half the host memory, the same values);
    # everything else in float32, which every stored dtype and type rounds from exactly
    bf16 = args.format == "hf" and (args.dtype or "bfloat16") == "bfloat16"
    cfg, params = checkpoint.load(args.checkpoint, jnp.bfloat16 if bf16 else jnp.float32,
                                  preset=args.preset, verify=args.verify)
    if args.format == "hf":
      out, notes = hf_export.export_hf(params, cfg, args.out, dtype=args.dtype or "bfloat16",
                                       tokenizer_source=args.checkpoint, force=args.force)
    else:
      out, notes = gguf_export.export_gguf(params, cfg, args.out, type=args.type or "f32",
                                           tokenizer_source=args.checkpoint, force=args.force,
                                           strict=not args.any_config)
  for note in notes:
    print(f"note: {note}", file=sys.stderr)
  print(f"wrote {out}")
  print(json.dumps(dict(format=args.format, out=str(out), notes=list(notes))))
  return 0

"""`gemma4 finetune` and `gemma4 merge-lora` (flags and JSON fields are a contract).

  gemma4 finetune [--config configs/NAME.py] [--checkpoint PATH] [--data FILE.jsonl]
                  [--mode lora|full] [--quant RECIPE] [--steps N] [--seed S] [--out DIR] ...
  gemma4 merge-lora --checkpoint BASE --adapters RUN_DIR --out DIR [--dtype bfloat16]

finetune: the config file's `get_config()` gives a `gemma.training.FinetuneConfig`; each flag
given replaces one field. The last stdout line is JSON: loss_first, loss_last, steps, losses,
tokens_per_s, compile_s, trainable_params, resumed_from, out, model, mode. Rerunning with the
same --out resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp

from gemma.io.atomic import check_target
from gemma.io.checkpoint import convert
from gemma.io.formats.converted import is_converted, save_converted
from gemma.training import FinetuneConfig, load_trained, lora, run_model_config, train
from gemma.training.config_file import load_config_file

# FinetuneConfig fields settable by a flag (--seq-len for seq_len) -> type
_FIELDS = {
    "checkpoint": str, "preset": str, "tokenizer": str, "data": str, "mode": str, "quant": str,
    "dtype": str, "seq_len": int, "batch_size": int, "grad_accum": int, "lora_rank": int,
    "lora_alpha": float, "steps": int, "lr": float, "warmup_steps": int, "weight_decay": float,
    "clip_norm": float, "seed": int, "out": str, "save_every": int, "keep": int, "mesh": str,
}


def add_parsers(sub, presets, recipes) -> None:
  ft = sub.add_parser("finetune", help="LoRA / QLoRA / full fine-tuning with optax and Orbax "
                      "training checkpoints (resumes from --out)")
  ft.add_argument("--config", help="a Python file whose get_config() returns a FinetuneConfig")
  for name, typ in _FIELDS.items():
    kw = dict(type=typ, default=None, dest=name)
    if name == "mode":
      kw["choices"] = ("lora", "full")
    if name == "quant":
      kw["choices"] = list(recipes)
      kw["help"] = "quantize the frozen base (QLoRA)"
    if name == "preset":
      kw["choices"] = list(presets)
    if name == "dtype":
      kw["choices"] = ("float32", "bfloat16")
    ft.add_argument("--" + name.replace("_", "-"), **kw)
  ft.add_argument("--lora-targets", default=None,
                  help="comma-separated: q,k,v,o,gate,up,down (default all)")
  ft.add_argument("--quiet", action="store_true", help="no progress bar")

  mg = sub.add_parser("merge-lora", help="fold a run's LoRA adapters into its base weights "
                      "(or write a full fine-tune's weights) as a checkpoint")
  mg.add_argument("--checkpoint", default=None, help="base checkpoint (default: the run's)")
  mg.add_argument("--adapters", required=True, help="the finetune --out directory")
  mg.add_argument("--out", required=True, help="output directory (loads like any checkpoint)")
  mg.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  mg.add_argument("--force", action="store_true", help="overwrite an existing --out")


def finetune_config(args):
  """The FinetuneConfig of --config with each given flag replacing one field."""
  base = load_config_file(args.config, FinetuneConfig) if args.config else None
  deltas = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
  if args.lora_targets:
    deltas["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
  if base is None:
    if "checkpoint" not in deltas and "preset" not in deltas:
      raise ValueError("finetune needs --config or --checkpoint")
    return FinetuneConfig(**deltas)
  if "checkpoint" in deltas:  # a checkpoint replaces the config's random-init model
    deltas.setdefault("preset", None)
    deltas.update(model=(), ablations=())
  return dataclasses.replace(base, **deltas)


def cmd_finetune(args) -> int:
  cfg = finetune_config(args)
  summary = train(cfg, show_progress=not args.quiet)
  print(f"{summary['model']} ({cfg.mode}): loss {summary['loss_first']:.4f} -> "
        f"{summary['loss_last']:.4f} in {summary['steps']} steps, "
        f"{summary['tokens_per_s']:,.0f} tokens/s" + (f"; saved to {cfg.out}" if cfg.out else ""))
  print(json.dumps(summary))
  return 0


def cmd_merge_lora(args) -> int:
  check_target(args.out, args.force, replaceable=is_converted)  # before loading anything
  trained, run_cfg, meta = load_trained(args.adapters)
  dtype = jnp.dtype(args.dtype)
  if run_cfg.mode == "full":  # the trained weights are the whole model
    if args.checkpoint is not None:
      raise ValueError("--checkpoint is for LoRA runs; a full fine-tune is its own model")
    tokenizer = run_cfg.tokenizer if (run_cfg.tokenizer or "").endswith(".model") else None
    out = save_converted(args.out, run_model_config(run_cfg),
                         jax.tree.map(lambda x: x.astype(dtype), trained),
                         tokenizer_file=tokenizer, force=args.force)
  else:
    base = args.checkpoint or run_cfg.checkpoint
    if base is None:
      raise ValueError("the run has no base checkpoint; pass --checkpoint")
    out = convert(base, args.out, dtype, force=args.force, load_dtype=jnp.float32,
                  transform=lambda p: lora.merge(p, trained, run_cfg.lora_scale))
  print(json.dumps(dict(out=str(out), mode=run_cfg.mode, steps=len(meta["losses"]))))
  return 0

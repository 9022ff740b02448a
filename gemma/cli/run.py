"""`gemma4 generate`, `chat`, `logits`, `info` and `convert`: flags onto `gemma.Model`."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma.cli.common import load_model, prompt_text, sampling_kwargs
from gemma.io.checkpoint import convert, inspect
from gemma.io.formats import converted
from gemma.model.config import get_preset
from gemma.model.params import abstract, count_breakdown
from gemma.parallel import distributed
from gemma.quant.footprint import size_report


def _print_ids(ids: list[int]) -> None:
  print(f"{ids[0]} ", end="", flush=True)


def _run(model, send, show: bool, kwargs: dict):
  """Runs `send(**kwargs)` (Model.generate or ChatSession.send), printing text as it is decoded
  (or ids, without a tokenizer) when `show`. Returns the Completion."""
  if show and model.tokenizer is not None:
    pieces = send(stream=True, **kwargs)
    for piece in pieces:
      print(piece, end="", flush=True)
    return pieces.completion
  return send(on_token=_print_ids if show else None, **kwargs)


def cmd_generate(args) -> int:
  kwargs = sampling_kwargs(args)
  text = prompt_text(args)
  use_chat = args.chat or args.system is not None or args.thinking
  if use_chat and text is None:
    raise ValueError("--chat, --system and --thinking need --prompt TEXT or --prompt-file")
  model = load_model(args, require_tokenizer=text is not None)
  main_process = distributed.is_main_process()  # in a multi-host run only process 0 prints
  if use_chat:
    send = model.chat(system=args.system, thinking=args.thinking).send
    kwargs.update(text=text, seed=args.seed)
  else:
    send = model.generate
    kwargs.update(prompt=text if text is not None else args.prompt_ids, seed=args.seed)
  c = _run(model, send, main_process and not args.json, kwargs)
  out = dict(token_ids=c.token_ids, prompt_ids=c.prompt_ids,
             prefill_tokens_per_s=c.prefill_tokens_per_s,
             decode_tokens_per_s=c.decode_tokens_per_s, compile_s=c.compile_s,
             dtype=str(model.dtype), model=model.name, kv_quant=args.kv_quant,
             kv_cache_bytes=c.kv_cache_bytes, draft=c.draft, draft_tokens=c.draft_tokens,
             acceptance_rate=c.acceptance_rate,
             mean_accepted_per_step=c.mean_accepted_per_step)
  if c.text is not None:
    out["text"] = c.text
  if not main_process:
    return 0
  if args.json:
    print(json.dumps(out))
  else:
    drafts = (f", {c.draft} drafts of {c.draft_tokens}: {100 * c.acceptance_rate:.0f} % kept, "
              f"{1 + c.mean_accepted_per_step:.2f} tokens per step" if c.draft else "")
    print(f"\n[prefill {c.prefill_tokens_per_s:.1f} tok/s, decode {c.decode_tokens_per_s:.1f} "
          f"tok/s, compile {c.compile_s:.1f} s{drafts}]")
  return 0


def cmd_chat(args, stdin=None) -> int:
  """Interactive chat: each input line is a user turn (the first one may come from
  --prompt-file); an empty line or EOF ends it. The session keeps its KV cache between turns."""
  kwargs = sampling_kwargs(args)
  first = prompt_text(args)
  model = load_model(args, require_tokenizer=True)
  session = model.chat(system=args.system, thinking=args.thinking)
  stdin = stdin or sys.stdin
  print(f"{model.name}: chat (empty line or Ctrl-D to quit)", file=sys.stderr)
  turn = 0
  while True:
    if first is not None:
      line, first = first, None
    else:
      print("> ", end="", flush=True, file=sys.stderr)
      line = stdin.readline().rstrip("\n")
    if not line.strip():
      return 0
    c = _run(model, session.send, True, dict(kwargs, text=line, seed=args.seed + turn))
    print(f"\n[{c.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    turn += 1


def cmd_logits(args) -> int:
  text = prompt_text(args)
  model = load_model(args, require_tokenizer=text is not None)
  ids = model.encode(text) if text is not None else args.prompt_ids
  logits = model.logits(ids)  # every process takes part; process 0 writes
  if distributed.is_main_process():
    np.save(args.out, logits)
    print(f"saved logits {tuple(logits.shape)} to {args.out}")
  return 0


def cmd_info(args) -> int:
  fmt, cfg = inspect(args.checkpoint, preset=args.preset)
  path = Path(args.checkpoint)
  files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
  print(f"checkpoint: {path}\nformat: {fmt}\nmodel: {cfg.name}")
  print(f"files: {len(files)}, {sum(f.stat().st_size for f in files) / 1e9:.3f} GB on disk")
  if fmt == "converted":
    recipe = converted.read_recipe(path)
    how = "" if recipe is None or not recipe.calibration else f" ({recipe.calibration})"
    print(f"quantization: {'none (float)' if recipe is None else recipe.name + how}")
    if recipe is not None:
      report = size_report(converted.expected_tree(cfg, "bfloat16", recipe))
      print("bits per weight by class: " + ", ".join(
          f"{c} {8 * v['bytes'] / v['params']:.3f}" for c, v in report["classes"].items()))
    print("checksums: " + ("CRC-32 per array, verified on load (--no-verify skips)"
                           if converted.has_checksums(path) else
                           "none recorded (written before checksums; not verified)"))
  elif fmt == "gguf":
    print("checksums: none in the format (non-finite values are still refused on load)")
  print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in count_breakdown(cfg).items()))
  for dtype in ("bfloat16", "float32"):
    n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract(cfg, dtype)))
    print(f"bytes as {dtype}: {n:,} ({n / 1e9:.3f} GB)")
  print("config:")
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if field.name == "layer_types":
      value = "".join("G" if t.name == "GLOBAL" else "L" for t in value)
    print(f"  {field.name}: {value}")
  return 0


def cmd_convert(args) -> int:
  cfg = get_preset(args.preset) if args.preset else None
  out = convert(args.checkpoint, args.out, jnp.dtype(args.dtype or "bfloat16"), cfg=cfg,
                force=args.force)
  print(f"wrote {out}")
  return 0

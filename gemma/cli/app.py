"""The `gemma4` command line. Flags and JSON fields here are a contract: add, never rename.

  gemma4 generate --checkpoint PATH (--prompt TEXT | --prompt-file PATH | --prompt-ids 2,17,5)
                  --max-new-tokens N
                  [--temperature T] [--top-k K] [--top-p P] [--seed S]
                  [--dtype float32|bfloat16] [--quant RECIPE] [--kv-quant KV] [--json]
                  [--chat [--system TEXT] [--thinking]] [--mesh DxM] [--ple-on-host]
  gemma4 logits   --checkpoint PATH (--prompt-ids 2,17,5 | --prompt T | --prompt-file PATH)
                  --out FILE.npy [--dtype float32]
                  [--quant RECIPE] [--mesh DxM] [--ple-on-host]
  gemma4 chat     --checkpoint PATH [--system TEXT] [--thinking] [--max-new-tokens N] [sampling]
                  [--prompt-file PATH (the first turn; - for standard input)]
                  [--quant RECIPE] [--kv-quant KV] [--mesh DxM] [--ple-on-host]
  gemma4 eval     --checkpoint PATH --text FILE [--quant RECIPE] [--kv-quant KV] [--context 1024]
                  [--stride N] [--max-tokens N] [--mesh DxM] [--reference PATH] [--json]
  gemma4 info     --checkpoint PATH
  gemma4 convert  --checkpoint IN --out DIR [--dtype bfloat16]
  gemma4 quantize --checkpoint IN --recipe RECIPE --out DIR [--dtype bfloat16]
                  [--calibrate TEXT [--calib-tokens N] [--calib-context C]
                  [--method gptq|awq-scale] [--target-bpw B]]   (gemma/cli/quant.py)
  gemma4 finetune [--config FILE.py] [--checkpoint PATH] [--data FILE.jsonl] [--mode lora|full]
                  [--quant RECIPE] [--steps N] [--seed S] [--out DIR] ...   (gemma/cli/train.py)
  gemma4 merge-lora --checkpoint BASE --adapters RUN_DIR --out DIR [--dtype bfloat16]
  gemma4 plan     --preset P [--quant RECIPE] [--kv-quant KV] --mesh DxM --context T [--batch B]
                  [--device-memory 80] [--ple-on-host] [--devices N] [--json]
                  (exit 3 if it does not fit)
  gemma4 export   --checkpoint PATH --format hf|gguf --out DIR|FILE.gguf [--dtype bfloat16]
                  [--type f32|f16|bf16|q8_0] | --adapters RUN_DIR --format peft --out DIR
                  [--force]   (gemma/cli/export.py)

RECIPE: tq4, tq3, tq2, tq-mixed (TurboQuant), int8, int4 (g128), nf4, bf16 (gemma.quant.recipes),
    and variants <tq2..tq5|nf4|int4>[-g64|-g32][-embed8].
KV: bf16, f32, or a TurboQuant KV cache tq2, tq2.5, tq3, tq3.5, tq4 (gemma.kv.quant), each
    optionally with +sN (positions < N also kept in bfloat16: the attention sink) and +rN (the
    newest N tokens too), e.g. tq3.5+s1+r128.
generate --json reports kv_cache_bytes: the bytes of the cache actually allocated.
Every command maps its flags onto `gemma.load` / `gemma.Model` (gemma/api.py) and prints.
Commands that read a checkpoint take --no-verify (skip a converted checkpoint's CRC-32 check).
Errors are one line, exit 2 (130 on Ctrl-C); `gemma4 --debug ...` or GEMMA_DEBUG=1 shows the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from gemma.cli import common, export, quant, run, scale, train
from gemma.io.checkpoint import CheckpointError
from gemma.model.config import PRESETS
from gemma.parallel import distributed
from gemma.quant.recipes import RECIPES


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="gemma4", description="Gemma 4 in JAX")
  ap.add_argument("--debug", action="store_true",
                  help="show the traceback of an error (also GEMMA_DEBUG=1)")
  sub = ap.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="generate tokens from a prompt")
  common.add_checkpoint(gen)
  common.add_quant(gen)
  common.add_kv_quant(gen)
  common.add_prompt(gen, required=True)
  common.add_sampling(gen)
  gen.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
  gen.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn in the model's chat template")
  common.add_chat(gen)

  ch = sub.add_parser("chat", help="interactive chat, streaming tokens as they are decoded; "
                      "the KV cache is kept between turns")
  common.add_checkpoint(ch)
  common.add_quant(ch)
  common.add_kv_quant(ch)
  common.add_sampling(ch, max_new_tokens=512)
  common.add_chat(ch)
  common.add_prompt(ch, required=False, ids=False)

  info = sub.add_parser("info", help="format, config, parameter count and bytes")
  info.add_argument("--checkpoint", required=True)
  info.add_argument("--preset", choices=list(PRESETS), default=None)

  conv = sub.add_parser("convert", help="write an Orbax checkpoint of our params")
  common.add_checkpoint(conv, dtype_help="stored dtype (default bfloat16)")
  conv.add_argument("--out", required=True, help="output directory")
  conv.add_argument("--force", action="store_true", help="overwrite an existing --out")

  lg = sub.add_parser("logits", help="save float32 logits [T, V] of one forward pass")
  common.add_checkpoint(lg)
  common.add_quant(lg)
  common.add_prompt(lg, required=True)
  lg.add_argument("--out", required=True, help="output .npy file")

  ev = sub.add_parser("eval", help="perplexity of a text file; with --quant also KL divergence "
                      "and top-1 agreement against the unquantized model")
  common.add_checkpoint(ev)
  common.add_quant(ev)
  quant.add_eval_flags(ev)
  common.add_kv_quant(ev)

  quant.add_quantize_parser(sub)
  train.add_parsers(sub, PRESETS, RECIPES)
  scale.add_parsers(sub, PRESETS, RECIPES)
  export.add_parser(sub, PRESETS)
  for p in (gen, ch, lg, ev):
    p.add_argument("--mesh", default=None, help="DxM device mesh: params sharded by "
                   "gemma.parallel.sharding (tensor parallel over model, FSDP over data)")
  for p in (gen, lg):  # multi-host: one command per host (docs/MULTIHOST.md)
    distributed.add_flags(p)
  for p in (gen, ch):
    common.add_prefill_chunk(p)
    common.add_draft(p)
  for p in (gen, ch, lg):
    p.add_argument("--ple-on-host", action="store_true", help="keep the per-layer-embedding "
                   "table in host memory; send each step only its tokens' rows (E2B/E4B)")
  return ap


COMMANDS = {"generate": run.cmd_generate, "logits": run.cmd_logits, "chat": run.cmd_chat,
            "info": run.cmd_info, "convert": run.cmd_convert, "quantize": quant.cmd_quantize,
            "eval": quant.cmd_eval, "finetune": train.cmd_finetune,
            "merge-lora": train.cmd_merge_lora, "plan": scale.cmd_plan,
            "export": export.cmd_export}


def _out_of_memory(e: BaseException) -> bool:
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def main(argv: list[str] | None = None) -> int:
  """Runs one command. Expected failures print one line and exit 2 (bad input, unreadable or
  unwritable paths, corrupt data, out of memory) or 130 (Ctrl-C); GEMMA_DEBUG=1 (or --debug)
  shows the traceback instead."""
  args = _parser().parse_args(argv)
  debug = args.debug or os.environ.get("GEMMA_DEBUG", "") not in ("", "0")
  try:
    distributed.initialize(args)  # before any JAX use; a no-op without the multi-host flags
    return COMMANDS[args.command](args)
  except BrokenPipeError:  # stdout closed early (e.g. `| head`): nothing to report
    sys.stderr.close()
    return 141
  except KeyboardInterrupt:
    if debug:
      raise
    print("\ngemma4: interrupted (nothing half-written was kept)", file=sys.stderr)
    return 130
  except (CheckpointError, ValueError, OSError, ArithmeticError) as e:
    if debug:
      raise
    print(f"gemma4: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    if debug or not _out_of_memory(e):
      raise
    print(f"gemma4: error: out of memory ({str(e).splitlines()[0][:200]}); lower the batch, "
          "--max-new-tokens or --context, or use --quant / --kv-quant (see `gemma4 plan`)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

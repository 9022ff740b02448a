"""What the `gemma4` commands share: flag groups, prompts from flags, and the model from flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gemma
from gemma.kv.quant import parse_kv_cache
from gemma.model.config import PRESETS
from gemma.quant.recipes import RECIPES

DTYPES = ("float32", "bfloat16")


def parse_ids(text: str) -> list[int]:
  """`--prompt-ids 2,17,5` as a list of ints; `@PATH` reads the ids (comma- or
  whitespace-separated) from a file, for prompts longer than a command line."""
  if text.startswith("@"):
    try:
      text = ",".join(Path(text[1:]).read_text().split())
    except OSError as e:
      raise argparse.ArgumentTypeError(f"cannot read prompt ids from {text[1:]}: "
                                       f"{e.strerror}") from None
  try:
    ids = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not ids:
    raise argparse.ArgumentTypeError("empty --prompt-ids")
  return ids


def add_checkpoint(p, dtype_help="parameter/activation dtype (default: float32 on CPU, else "
                   "bfloat16)") -> None:
  p.add_argument("--checkpoint", required=True,
                 help="HF directory, .gguf file, Orbax checkpoint or converted directory")
  p.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
  p.add_argument("--preset", choices=list(PRESETS), default=None,
                 help="config of an official Orbax checkpoint (default: inferred)")
  p.add_argument("--no-verify", dest="verify", action="store_false",
                 help="skip the CRC-32 check of a converted checkpoint's arrays")


def add_sampling(p, max_new_tokens: int | None = None) -> None:
  p.add_argument("--max-new-tokens", type=int, required=max_new_tokens is None,
                 default=max_new_tokens)
  p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
  p.add_argument("--top-p", type=float, default=1.0, help="1 disables top-p")
  p.add_argument("--seed", type=int, default=0)


def add_quant(p) -> None:
  p.add_argument("--quant", choices=list(RECIPES), default=None,
                 help="quantize the weights on load with this recipe")


def add_kv_quant(p) -> None:
  p.add_argument("--kv-quant", type=parse_kv_cache, default=None,
                 help="KV cache storage: bf16/f32, or TurboQuant at 2-4 bits per channel "
                      "(default: the activation dtype)")


def add_prefill_chunk(p) -> None:
  p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                 help="prefill the prompt in chunks of N tokens against the KV cache (a working "
                 "set independent of the prompt's length; default 2048)")


def add_draft(p) -> None:
  p.add_argument("--draft", default=None, metavar="ngram|PATH",
                 help="speculative decoding: 'ngram' (prompt lookup, any checkpoint) or the path "
                 "of a Gemma 4 MTP assistant checkpoint; the output is unchanged")
  p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                 help="tokens drafted per round (default 4 for ngram, 2 for an MTP drafter)")


def add_chat(p) -> None:
  p.add_argument("--system", default=None, help="system prompt of the chat")
  p.add_argument("--thinking", action="store_true", help="Gemma 4 thinking mode")


def add_prompt(p, required: bool, ids: bool = True) -> None:
  """--prompt TEXT | --prompt-file PATH (- for standard input) | --prompt-ids 2,17,5."""
  g = p.add_mutually_exclusive_group(required=required)
  g.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint)")
  g.add_argument("--prompt-file", metavar="PATH", help="prompt text from a UTF-8 file ('-': "
                 "standard input); one trailing newline is dropped")
  if ids:
    g.add_argument("--prompt-ids", type=parse_ids,
                   help="comma-separated prompt token ids (@PATH: read them from a file)")


def prompt_text(args) -> str | None:
  """The text of --prompt or --prompt-file (None when neither was given)."""
  if getattr(args, "prompt_file", None) is None:
    return args.prompt
  path = args.prompt_file
  if path == "-":
    text = sys.stdin.read()
  else:
    if not Path(path).is_file():
      raise FileNotFoundError(f"--prompt-file {path} does not exist")
    text = Path(path).read_text(encoding="utf-8")
  return text.removesuffix("\n")


def sampling_kwargs(args) -> dict:
  """Model.generate / ChatSession.send keywords of the sampling flags."""
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k or None, top_p=args.top_p)


def load_model(args, quantize: bool = True, dtype=None,
               require_tokenizer: bool = False) -> gemma.Model:
  """`gemma.load` of --checkpoint with the flags that describe it: --dtype, --preset, --quant
  (unless `quantize` is False), --kv-quant, --mesh, --ple-on-host."""
  return gemma.load(args.checkpoint, dtype=dtype or args.dtype, preset=args.preset,
                    quant=getattr(args, "quant", None) if quantize else None,
                    kv_quant=getattr(args, "kv_quant", None),
                    mesh=getattr(args, "mesh", None) or None,
                    ple_on_host=getattr(args, "ple_on_host", False),
                    verify=getattr(args, "verify", True),
                    require_tokenizer=require_tokenizer,
                    prefill_chunk=getattr(args, "prefill_chunk", None),
                    draft=getattr(args, "draft", None),
                    draft_tokens=getattr(args, "draft_tokens", None))

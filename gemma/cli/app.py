"""The `gemma4` command line. Flags and JSON fields here are a contract: add, never rename.

  gemma4 generate --checkpoint PATH (--prompt TEXT | --prompt-ids 2,17,5) --max-new-tokens N
                  [--temperature T] [--top-k K] [--top-p P] [--seed S]
                  [--dtype float32|bfloat16] [--quant RECIPE] [--kv-quant KV] [--json]
                  [--chat [--system TEXT] [--thinking]] [--mesh DxM] [--ple-on-host]
  gemma4 logits   --checkpoint PATH --prompt-ids 2,17,5 --out FILE.npy [--dtype float32]
                  [--quant RECIPE] [--mesh DxM] [--ple-on-host]
  gemma4 chat     --checkpoint PATH [--system TEXT] [--thinking] [--max-new-tokens N] [sampling]
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
                  [--device-memory 80] [--ple-on-host] [--json]   (exit 3 if it does not fit)

RECIPE: tq4, tq3, tq2, tq-mixed (TurboQuant), int8, int4 (g128), nf4, bf16 (gemma.quant.recipes),
    and variants <tq2..tq5|nf4|int4>[-g64|-g32][-embed8].
KV: bf16, f32, or a TurboQuant KV cache tq2, tq2.5, tq3, tq3.5, tq4 (gemma.kv.quant), each
    optionally with +sN (positions < N also kept in bfloat16: the attention sink) and +rN (the
    newest N tokens too), e.g. tq3.5+s1+r128.
generate --json reports kv_cache_bytes: the bytes of the cache actually allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from gemma.cli import quant as cli_quant
from gemma.cli import scale as cli_scale
from gemma.cli import train as cli_train
from gemma.cli.common import _load, _mesh, _tokenizer
from gemma.cli.quant import cmd_eval, cmd_quantize
from gemma.cli.scale import cmd_plan
from gemma.cli.train import cmd_finetune, cmd_merge_lora
from gemma.inference import chat
from gemma.inference.chat import Message
from gemma.inference.decode import generate
from gemma.inference.sampling import Sampler
from gemma.io.checkpoint import CheckpointError, convert, inspect
from gemma.kv.quant import parse_kv_cache
from gemma.model.config import PRESETS, get_preset
from gemma.model.params import abstract, count_breakdown
from gemma.model.transformer import forward
from gemma.parallel import distributed
from gemma.parallel.distributed import is_main_process
from gemma.parallel.host_ple import offload
from gemma.parallel.sharding import shard_params
from gemma.quant.recipes import RECIPES

DTYPES = ("float32", "bfloat16")


def _ids(text: str) -> list[int]:
  try:
    ids = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not ids:
    raise argparse.ArgumentTypeError("empty --prompt-ids")
  return ids


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="gemma4", description="Gemma 4 in JAX")
  sub = ap.add_subparsers(dest="command", required=True)

  def common(p, dtype_help="parameter/activation dtype (default: float32 on CPU, else bfloat16)"):
    p.add_argument("--checkpoint", required=True,
                   help="HF directory, .gguf file, Orbax checkpoint or converted directory")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="config of an official Orbax checkpoint (default: inferred)")

  def sampling(p, max_new_tokens=None):
    p.add_argument("--max-new-tokens", type=int, required=max_new_tokens is None,
                   default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables top-p")
    p.add_argument("--seed", type=int, default=0)

  def quant_flag(p):
    p.add_argument("--quant", choices=list(RECIPES), default=None,
                   help="quantize the weights on load with this recipe")

  def kv_flag(p):
    p.add_argument("--kv-quant", type=parse_kv_cache, default=None,
                   help="KV cache storage: bf16/f32, or TurboQuant at 2-4 bits per channel "
                        "(default: the activation dtype)")

  def chat_flags(p):
    p.add_argument("--system", default=None, help="system prompt of the chat")
    p.add_argument("--thinking", action="store_true", help="Gemma 4 thinking mode")

  gen = sub.add_parser("generate", help="generate tokens from a prompt")
  common(gen)
  quant_flag(gen)
  kv_flag(gen)
  prompt = gen.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint)")
  prompt.add_argument("--prompt-ids", type=_ids, help="comma-separated prompt token ids")
  sampling(gen)
  gen.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
  gen.add_argument("--chat", action="store_true",
                   help="wrap --prompt as one user turn in the model's chat template")
  chat_flags(gen)

  ch = sub.add_parser("chat", help="interactive chat, streaming tokens as they are decoded")
  common(ch)
  quant_flag(ch)
  kv_flag(ch)
  sampling(ch, max_new_tokens=512)
  chat_flags(ch)

  info = sub.add_parser("info", help="format, config, parameter count and bytes")
  info.add_argument("--checkpoint", required=True)
  info.add_argument("--preset", choices=list(PRESETS), default=None)

  conv = sub.add_parser("convert", help="write an Orbax checkpoint of our params")
  common(conv, dtype_help="stored dtype (default bfloat16)")
  conv.add_argument("--out", required=True, help="output directory")
  conv.add_argument("--force", action="store_true", help="overwrite an existing --out")

  lg = sub.add_parser("logits", help="save float32 logits [T, V] of one forward pass")
  common(lg)
  quant_flag(lg)
  lg.add_argument("--prompt-ids", type=_ids, required=True)
  lg.add_argument("--out", required=True, help="output .npy file")

  ev = sub.add_parser("eval", help="perplexity of a text file; with --quant also KL divergence "
                      "and top-1 agreement against the unquantized model")
  common(ev)
  quant_flag(ev)
  ev.add_argument("--text", required=True, help="UTF-8 text file to score")
  ev.add_argument("--context", type=int, default=1024,
                  help="window length in tokens, BOS included (default 1024)")
  ev.add_argument("--stride", type=int, default=None,
                  help="strided (sliding-window) perplexity: a window starts every N text "
                  "tokens and scores only its last N, so each token is scored once with >= "
                  "context-1-N tokens of history; 1 <= N <= context-1 (default context-1: "
                  "non-overlapping windows)")
  ev.add_argument("--max-tokens", type=int, default=0,
                  help="score only the first N tokens of the text (0: all)")
  ev.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
  kv_flag(ev)

  cli_quant.add_reference_flag(ev)

  cli_quant.add_quantize_parser(sub, common, RECIPES)

  cli_train.add_parsers(sub, PRESETS, RECIPES)
  cli_scale.add_parsers(sub, PRESETS, RECIPES)
  for p in (gen, ch, lg, ev):
    p.add_argument("--mesh", default=None, help="DxM device mesh: params sharded by "
                   "gemma.parallel.sharding (tensor parallel over model, FSDP over data)")

  for p in (gen, lg):  # multi-host: one command per host (docs/MULTIHOST.md)
    distributed.add_flags(p)
  for p in (gen, ch, lg):
    p.add_argument("--ple-on-host", action="store_true", help="keep the per-layer-embedding "
                   "table in host memory; send each step only its tokens' rows (E2B/E4B)")
  return ap








def _eos_ids(cfg, checkpoint: str) -> tuple[int, ...]:
  """EOS ids of the config plus those of generation_config.json, if the checkpoint has one."""
  ids = set(cfg.eos_ids)
  gen_cfg = Path(checkpoint) / "generation_config.json"
  if gen_cfg.exists():
    eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
  return tuple(sorted(ids))




def _sampler(args):

  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  return Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _check_ids(ids, cfg) -> None:
  bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
  if bad:
    raise ValueError(f"prompt ids out of range [0, {cfg.vocab_size}): {bad[:10]}")


def _messages(args, user: str):

  system = [Message("system", args.system)] if args.system else []
  return [*system, Message("user", user)]


class _Stream:
  """Prints decoded text as tokens arrive (re-decoding the tail keeps multi-byte pieces whole)."""

  def __init__(self, tokenizer, enabled: bool = True):
    self.tokenizer, self.enabled, self.ids, self.shown = tokenizer, enabled, [], ""

  def __call__(self, ids):
    if not self.enabled:
      return
    self.ids.append(ids[0])
    if self.tokenizer is None:
      print(f"{ids[0]} ", end="", flush=True)
      return
    text = self.tokenizer.decode(self.ids)
    if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
      print(text[len(self.shown):], end="", flush=True)
      self.shown = text


def cmd_generate(args) -> int:

  sampler = _sampler(args)
  use_chat = args.chat or args.system is not None or args.thinking
  if use_chat and args.prompt is None:
    raise ValueError("--chat, --system and --thinking need --prompt TEXT")
  tokenizer = _tokenizer(args.checkpoint) if args.prompt is not None else None
  cfg, params = _load(args)
  eos = set(_eos_ids(cfg, args.checkpoint))
  if use_chat:
    prompt = chat.chat_prompt(tokenizer, _messages(args, args.prompt), thinking=args.thinking)
    eos.update(chat.stop_ids(tokenizer))
  else:
    prompt = tokenizer.encode(args.prompt) if tokenizer else args.prompt_ids
  _check_ids(prompt, cfg)

  main_process = is_main_process()  # in a multi-host run only process 0 prints
  result = generate(params, cfg, [prompt], args.max_new_tokens, sampler, seed=args.seed,
                    eos_ids=sorted(eos),
                    on_token=_Stream(tokenizer, enabled=main_process and not args.json),
                    kv_quant=args.kv_quant, mesh=_mesh(args), ple_on_host=args.ple_on_host)
  out = dict(
      token_ids=result.tokens[0], prompt_ids=list(prompt),
      prefill_tokens_per_s=result.prefill_tokens_per_s,
      decode_tokens_per_s=result.decode_tokens_per_s, compile_s=result.compile_s,
      dtype=str(params.embed.dtype), model=cfg.name, kv_quant=args.kv_quant,
      kv_cache_bytes=result.kv_cache_bytes)
  if tokenizer:
    out["text"] = tokenizer.decode(result.tokens[0])
  if not main_process:
    return 0
  if args.json:
    print(json.dumps(out))
  else:
    print(f"\n[prefill {out['prefill_tokens_per_s']:.1f} tok/s, "
          f"decode {out['decode_tokens_per_s']:.1f} tok/s, compile {result.compile_s:.1f} s]")
  return 0


def cmd_chat(args, stdin=None) -> int:
  """Interactive chat: each input line is a user turn; an empty line or EOF ends it."""

  sampler = _sampler(args)
  tokenizer = _tokenizer(args.checkpoint)
  cfg, params = _load(args)
  stop = sorted(set(_eos_ids(cfg, args.checkpoint)) | set(chat.stop_ids(tokenizer)))
  mesh = _mesh(args)
  history = [chat.Message("system", args.system)] if args.system else []
  stdin = stdin or sys.stdin
  print(f"{cfg.name}: chat (empty line or Ctrl-D to quit)", file=sys.stderr)
  turn = 0
  while True:
    print("> ", end="", flush=True, file=sys.stderr)
    line = stdin.readline()
    if not line.strip():
      return 0
    history.append(chat.Message("user", line.rstrip("\n")))
    prompt = chat.chat_prompt(tokenizer, history, thinking=args.thinking)
    result = generate(params, cfg, [prompt], args.max_new_tokens, sampler,
                      seed=args.seed + turn, eos_ids=stop, on_token=_Stream(tokenizer),
                      kv_quant=args.kv_quant, mesh=mesh, ple_on_host=args.ple_on_host)
    reply = [i for i in result.tokens[0] if i not in stop]
    history.append(chat.Message("model", tokenizer.decode(reply)))
    print(f"\n[{result.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    turn += 1


def cmd_info(args) -> int:
  import jax


  fmt, cfg = inspect(args.checkpoint, preset=args.preset)
  path = Path(args.checkpoint)
  files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
  print(f"checkpoint: {path}\nformat: {fmt}\nmodel: {cfg.name}")
  print(f"files: {len(files)}, {sum(f.stat().st_size for f in files) / 1e9:.3f} GB on disk")
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
  import jax.numpy as jnp


  cfg = get_preset(args.preset) if args.preset else None
  out = convert(args.checkpoint, args.out, jnp.dtype(args.dtype or "bfloat16"), cfg=cfg,
                force=args.force)
  print(f"wrote {out}")
  return 0


def cmd_logits(args) -> int:
  import jax
  import jax.numpy as jnp


  cfg, params = _load(args)
  ids = args.prompt_ids
  _check_ids(ids, cfg)
  mesh = _mesh(args)
  tokens = jnp.asarray([ids], jnp.int32)
  if args.ple_on_host:
    from jax.sharding import NamedSharding, PartitionSpec


    rows_to = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    params, table = offload(params, cfg.ple_vocab_size, rows_to)
    params = table.attach(params, tokens)
  if mesh is not None:

    params = shard_params(params, mesh)
  positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
  logits, _ = jax.jit(forward, static_argnames="cfg")(params, tokens, positions, cfg)

  logits = distributed.to_host(logits)  # every process takes part; process 0 writes
  if distributed.is_main_process():
    np.save(args.out, np.asarray(logits[0], np.float32))
    print(f"saved logits {tuple(logits.shape[1:])} to {args.out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)

  try:

    distributed.initialize(args)  # before any JAX use; a no-op without the multi-host flags
    commands = {"generate": cmd_generate, "logits": cmd_logits, "chat": cmd_chat,
                "info": cmd_info, "convert": cmd_convert, "quantize": cmd_quantize,
                "eval": cmd_eval, "finetune": cmd_finetune, "merge-lora": cmd_merge_lora,
                "plan": cmd_plan}
    return commands[args.command](args)
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"gemma4: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

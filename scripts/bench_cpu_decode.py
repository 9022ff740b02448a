"""CPU decode of the real Gemma 3 270M against llama.cpp on the same GGUF file, in one run, and
the compiled decode step's call count (never a test).

  .venv/bin/python scripts/bench_cpu_decode.py [--gguf FILE] [--tokens 64] [--threads 2]
      [--repeats 3] [--llama-python /tmp/llvenv/bin/python] [--json-out FILE]
  .venv/bin/python scripts/bench_cpu_decode.py --presets gemma4-e2b gemma4-31b ...

--presets only counts: the compiled decode step of each preset (abstract bfloat16 params,
nothing allocated, a cache of 1024 columns), projections separate and fused.

Ours: `gemma.load` of the GGUF (float32, the weights dequantized), greedy generation of
`--tokens` tokens after the same prompt, `decode_tokens_per_s` of the best of `--repeats` runs,
for the projections separate (`fuse=False`) and fused (the default). Runs alternate between the
variants so that a busy machine slows both alike. Call count: the ops of the compiled decode
step's entry computation (fusions, dots, copies, custom calls: each one a call on a CPU and a
kernel launch on a GPU).

llama.cpp: llama-cpp-python (built from source, see scripts/llamacpp_requantize.py) in its own
venv, `--threads` threads, the same prompt ids, greedy; tokens/s from llama.cpp's own
perf counters (`llama_perf_context`: eval time over eval tokens, the prompt excluded), the best of
one run after each round of ours. Skipped with a message when that interpreter is absent.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gemma  # noqa: E402
from gemma.inference import steps  # noqa: E402
from gemma.kv.cache import init_cache  # noqa: E402
from gemma.model import config as C  # noqa: E402
from gemma.model import params as P  # noqa: E402

try:
  from gemma.model import fused
except ImportError:  # a checkout from before fusion (the "before" row)
  fused = None

PROMPT = "The history of the city of Rome begins"
COUNTED = ("fusion", "dot", "copy", "custom-call", "concatenate", "dynamic-update-slice",
           "while", "conditional")

LLAMA = textwrap.dedent("""
    import json, sys
    import llama_cpp
    import llama_cpp.llama_cpp as lc
    path, threads, n, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    default = lc.llama_model_default_params
    def params():  # its AMX repack buffers crash on this CPU kind (SIGILL)
      p = default()
      p.use_extra_bufts = False
      return p
    lc.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=len(ids) + n + 8, verbose=False)
    best = 0.0
    for _ in range(int(sys.argv[5])):
      llm.reset()
      lc.llama_perf_context_reset(llm.ctx)
      out = []
      for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
          break
      perf = lc.llama_perf_context(llm.ctx)
      best = max(best, perf.n_eval / (perf.t_eval_ms / 1e3))
    print(json.dumps(dict(tokens_per_s=best, token_ids=out)))
""")


def call_count(params, cfg, context: int = 128) -> dict[str, int]:
  """Ops of the compiled decode step's entry computation, by kind (params may be abstract)."""
  cache = jax.eval_shape(lambda: init_cache(cfg, 1, context, params.embed.dtype))
  tok = jax.ShapeDtypeStruct((1,), jnp.int32)
  text = steps.decode_step.lower(params, tok, cache, jax.random.key(0), cfg=cfg,
                                 sampler=steps.GREEDY).compile().as_text()
  ops = collections.Counter(re.findall(r"= \S+ ([\w-]+)\(", text[text.index("ENTRY"):]))
  counts = {k: ops.get(k, 0) for k in COUNTED}
  counts["calls"] = sum(counts.values())
  return counts


def count_presets(names) -> int:
  """Prints the decode step's call count of each preset, projections separate and fused."""
  print("| preset | layers | separate: calls (fusions / dots / copies) | fused: calls (fusions / "
        "dots / copies) | calls per layer, separate -> fused |")
  print("|---|---|---|---|---|")
  for name in names:
    cfg = C.get_preset(name)
    tree = P.abstract(cfg, jnp.bfloat16)
    rows = [call_count(t, cfg, 1024) for t in (tree, jax.eval_shape(fused.fuse, tree))]
    cells = [f"{c['calls']} ({c['fusion']} / {c['dot']} / {c['copy']})" for c in rows]
    per_layer = " -> ".join(f"{c['calls'] / cfg.num_layers:.1f}" for c in rows)
    print(f"| {name} | {cfg.num_layers} | {cells[0]} | {cells[1]} | {per_layer} |", flush=True)
  return 0


def llama_cpp_run(python: str, path: str, threads: int, n: int, ids: list[int], repeats: int):
  if not Path(python).exists():
    print(f"llama.cpp: {python} not found, skipped (build it: scripts/llamacpp_requantize.py)")
    return None
  out = subprocess.run([python, "-c", LLAMA, path, str(threads), str(n), json.dumps(ids),
                        str(repeats)], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gguf", default=None, help="default: the cached Gemma 3 270M Q4_K_M file")
  ap.add_argument("--tokens", type=int, default=64)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--llama-python", default="/tmp/llvenv/bin/python")
  ap.add_argument("--json-out", default=None)
  ap.add_argument("--presets", nargs="+", default=None, help="only count these presets' calls")
  args = ap.parse_args(argv)
  if args.presets:
    return count_presets(args.presets)
  path = args.gguf or subprocess.run([sys.executable, str(ROOT / "scripts/gemma3_270m_path.py")],
                                     capture_output=True, text=True, check=True).stdout.strip()

  try:
    models = {"separate": gemma.load(path, dtype="float32", fuse=False),
              "fused": gemma.load(path, dtype="float32")}
  except TypeError:  # a checkout from before fusion (the "before" row): one variant
    models = {"separate": gemma.load(path, dtype="float32")}
  ids = models["separate"].encode(PROMPT)
  result = dict(gguf=path, tokens=args.tokens, threads=args.threads, prompt_ids=ids,
                jax=jax.__version__, ours={})
  best = {name: 0.0 for name in models}
  tokens, peer = {}, None
  for _ in range(args.repeats):  # llama.cpp runs between ours: a machine's drift hits both
    for name, model in models.items():
      out = model.generate(ids, max_new_tokens=args.tokens)
      best[name] = max(best[name], out.decode_tokens_per_s)
      tokens[name] = out.token_ids
      print(f"ours ({name}): {out.decode_tokens_per_s:.2f} tok/s", flush=True)
    run = llama_cpp_run(args.llama_python, path, args.threads, args.tokens, ids, 1)
    if run is not None:
      print(f"llama.cpp: {run['tokens_per_s']:.2f} tok/s", flush=True)
      peer = run if peer is None or run["tokens_per_s"] > peer["tokens_per_s"] else peer
  for name, model in models.items():
    result["ours"][name] = dict(tokens_per_s=best[name], calls=call_count(model.params, model.cfg),
                                token_ids=tokens[name])
  if tokens["separate"] != tokens.get("fused", tokens["separate"]):
    print("WARNING: the fused model generated different tokens")
  result["llama_cpp"] = peer

  print("\n| variant | decode tok/s | calls per step (fusions / dots / copies) | vs llama.cpp |")
  print("|---|---|---|---|")
  for name, r in result["ours"].items():
    c = r["calls"]
    ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
    print(f"| ours, {name} | {r['tokens_per_s']:.2f} | {c['calls']} ({c['fusion']} / {c['dot']} "
          f"/ {c['copy']}) | {ratio} |")
  if peer:
    print(f"| llama.cpp ({args.threads} threads) | {peer['tokens_per_s']:.2f} | - | 1.00x |")
    ours = tokens.get("fused", tokens["separate"])
    same = sum(a == b for a, b in zip(peer["token_ids"], ours, strict=False))
    print(f"\nllama.cpp and ours agree on the first {same} of {args.tokens} greedy tokens "
          "(ours runs the dequantized weights in float32, llama.cpp the quantized blocks)")
  if args.json_out:
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

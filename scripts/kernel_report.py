"""Compile the Pallas Triton kernels for sm_90 / sm_80 without a GPU and report their resources.

For each kernel configuration of the benchmark shapes, `pallas_kernels.compile_report` lowers
the kernel for an abstract H100, captures the Triton IR that Pallas hands to XLA, runs the TTIR
passes XLA runs (triton's make_ttir) and compiles it with the `triton` package (TTGIR -> LLVM ->
PTX -> cubin) for GPUTarget("cuda", cc, 32). No GPU and no CUDA install are needed: ptxas,
cuobjdump and nvdisasm ship in the triton wheel. Printed per kernel and arch:
  regs     registers per thread (ptxas -v), spill  spill store / load bytes (ptxas -v),
  smem     shared memory bytes Triton allocates (dynamic, per CTA),
  warps/SM occupancy limit from registers and shared memory (64 warps/SM max, 65536 registers,
           256-register warp allocation granularity; 228 KiB smem on sm_90, 164 KiB on sm_80),
  loop     SASS instructions of the main loop (the longest backward branch; "kernel" for kernels
           with no loop: then the whole kernel is counted), with its instruction mix,
  i/w      thread-instructions per weight: loop instructions x 32 x warps / weights handled per
           loop iteration by one CTA (a warp instruction does the work of 32 lanes). For the
           matmul a weight is one element of the [g, bn] (or [bn, g]) code tile decoded per
           iteration; for KV attention one channel code of one cache slot; for flash attention
           one element of the [bk, H] key tile (the V tile has as many).
  budget   thread-instructions per weight that an H100 SXM can issue while streaming the weights
           from HBM: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz / (3.35 TB/s x 8 / bits).
Counts are static (each instruction of the loop body once, whatever path a branch takes).

The Triton used here is the `triton` wheel, not the fork that XLA links into jaxlib, so register
counts and SASS are close to, not identical with, what runs under XLA (other pass pipeline,
other ptxas: see the printed versions).

Setup: the project's `test` extra installs triton==3.9.0 on Linux x86_64 (`make venv`); any venv
with jax==0.11.2, jaxlib==0.11.2, numpy, scipy and triton==3.9.0 works too.
Usage (repository root; jax on CPU):
  JAX_PLATFORMS=cpu .venv/bin/python scripts/kernel_report.py [--arch 90 80]
      [--only SUBSTRING ...] [--json FILE] [--keep DIR]
--keep DIR writes each kernel's TTIR, PTX, cubin and SASS there.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses FMAs too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import codebook_matmul as cm  # noqa: E402
from pallas_kernels import compile_report as cr  # noqa: E402
from pallas_kernels import flash_attention as fa  # noqa: E402
from pallas_kernels import tq_attention as tqa  # noqa: E402
from pallas_kernels.compile_report import CLASSES, MIX, Case  # noqa: E402

SD = jax.ShapeDtypeStruct


def _codebook_module():
  """gemma/quant/codebook.py alone (numpy + scipy): `gemma/__init__` pulls in the whole model."""
  spec = importlib.util.spec_from_file_location("_codebook", ROOT / "gemma/quant/codebook.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


CB = _codebook_module()


def table(bits: int, d: int, law: str) -> tuple[float, ...]:
  if law == "int":
    return tuple(float(v) for v in np.arange(2 ** bits) - (2 ** bits - 1) / 2)
  return tuple(float(v) for v in CB.sphere_codebook(bits, d, law)[0])


# ----------------------------------------------------------------------------- configurations
def matmul_case(bits, law, m=1, k=4096, n=4096, transposed=False, rotated=False, block=128):
  tbl = table(bits, block, law)
  words = (n, k * bits // 32) if transposed else (k * bits // 32, n)
  sc = (n, k // block) if transposed else (k // block, n)
  args = [SD((m, k), jnp.bfloat16), SD(words, jnp.uint32), SD(sc, jnp.float16)]
  kw = dict(table=tbl, bits=bits, block=block, transposed=transposed)
  if rotated:
    args.append(SD((block, block), jnp.float32))
    fn = lambda x, c, s, r: cm.codebook_matmul(x, c, s, rotation=r, **kw)  # noqa: E731
  else:
    fn = functools.partial(cm.codebook_matmul, **kw)
  bm, bn, split = cm.plan(m, k, n, block)
  tiling = "decode" if m <= 16 else "prefill"
  name = "lm_head" if transposed else ("rotated" if rotated else tiling)
  cfg = f"tq{bits} {law} {name} M={m} K={k} N={n} bm={bm} bn={bn} split={split}"
  return Case("codebook_matmul", cfg, fn, tuple(args), block * bn, bits)


def scores_case(bits, n, g, s=4096, heads=4, qjl=True):
  tbl = table(bits, n, "beta")
  args = (SD((1, heads, g, n), jnp.float32), SD((1, heads, g, n), jnp.float32) if qjl else None,
          SD((1, s, heads, n * bits // 32), jnp.uint32),
          SD((1, s, heads, n // 32), jnp.uint32) if qjl else None,
          SD((1, s, heads), jnp.float16), SD((1, s, heads), jnp.float16) if qjl else None)
  present = [i for i, a in enumerate(args) if a is not None]

  def fn(*xs):
    full = [None] * 6
    for i, x in zip(present, xs, strict=True):
      full[i] = x
    return tqa.tq_scores(*full, bits=bits, table=tbl)

  bs = tqa._tiles(g, s, None)
  cfg = f"{bits}b n={n} G={g} S={s} bs={bs}{' +qjl' if qjl else ''}"
  return Case("tq_scores", cfg, fn, tuple(args[i] for i in present), bs * n, bits)


def mix_case(bits, n, g, s=4096, heads=4):
  tbl = table(bits, n, "beta")
  args = (SD((1, heads, g, s), jnp.float32), SD((1, s, heads, n * bits // 32), jnp.uint32),
          SD((1, s, heads), jnp.float16))
  bs = tqa._tiles(g, s, None)
  return Case("tq_mix", f"{bits}b n={n} G={g} S={s} bs={bs}",
              functools.partial(tqa.tq_mix, bits=bits, table=tbl), args, bs * n, bits)


def flash_case(h, g, window, cap, t=1024, s=2048, heads=2):
  args = (SD((1, t, heads, g, h), jnp.bfloat16), SD((1, s, heads, h), jnp.bfloat16),
          SD((1, s, heads, h), jnp.bfloat16), SD((1, t), jnp.int32), SD((1, s), jnp.int32))
  rows, bk = fa._kernel_tiles(s, h, None, None)
  fn = functools.partial(fa.flash_attention, scale=1.0, window=window, cap=cap)
  cfg = f"H={h} G={g} T={t} S={s} M={rows} bk={bk} window={window} cap={cap}"
  return Case("flash_attention", cfg, fn, args, bk * h, None)


def cases() -> list[Case]:
  out = [matmul_case(b, "beta") for b in (4, 3, 2)]
  out += [matmul_case(b, "poly") for b in (4, 3, 2)]
  out += [matmul_case(4, "int"), matmul_case(4, "beta", rotated=True)]
  out += [matmul_case(b, "beta", m=256) for b in (4, 2)]
  out += [matmul_case(b, "beta", k=4096, n=262144, transposed=True) for b in (4, 2)]
  out += [scores_case(b, 256, 2) for b in (4, 3, 2)]
  out += [scores_case(4, 256, 2, qjl=False), scores_case(4, 512, 8)]
  out += [mix_case(b, 256, 2) for b in (4, 3, 2)] + [mix_case(4, 512, 8)]
  out += [flash_case(256, 4, 512, None), flash_case(512, 8, None, None),
          flash_case(256, 2, 1024, 50.0)]
  return out


# ----------------------------------------------------------------------------- report
def print_tables(rows: list[dict]) -> None:
  print("| kernel | config | sm | warps/stages | regs | spill st/ld B | smem B | warps/SM (limit) "
        "| loop instr | weights/iter | thread-instr/weight | budget |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['kernel']} | {r['config']} | {r['sm']} | ERROR: {r['error']} |")
      continue
    loop = r["loop_instructions"] or f"kernel {r['kernel_instructions']}"
    bud = f"{r['budget']:.1f}" if r["budget"] else "-"
    print(f"| {r['kernel']} | {r['config']} | {r['sm']} | {r['warps']}/{r['stages']} | "
          f"{r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['smem']} | "
          f"{r['warps_per_sm']} ({r['occupancy_limit']}) | {loop} | {r['weights_per_iter']} | "
          f"{r['instr_per_weight']:.2f} | {bud} |")
  print("\nSASS instruction mix of the main loop (whole kernel where there is no loop); classes: "
        + "; ".join(f"{c}: {CLASSES[c] or 'U* opcodes'}" for c in MIX[:-1]))
  print("| kernel | config | sm | " + " | ".join(MIX) + " | top opcodes |")
  print("|---|---|---|" + "---|" * (len(MIX) + 1))
  for r in rows:
    if "error" in r:
      continue
    top = ", ".join(f"{op} {n}" for op, n in list(r["top_ops"].items())[:8])
    print(f"| {r['kernel']} | {r['config']} | {r['sm']} | "
          + " | ".join(str(r["mix"].get(c, 0)) for c in MIX) + f" | {top} |")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--arch", nargs="+", type=int, default=[90, 80])
  ap.add_argument("--only", nargs="+", default=None, help="substrings of kernel + config")
  ap.add_argument("--json", default=None, help="write the rows as JSON to this file")
  ap.add_argument("--keep", default=None, help="directory for TTIR, PTX, cubin and SASS")
  args = ap.parse_args(argv)
  print(cr.versions(), flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, case in enumerate(cases()):
      label = f"{case.kernel} {case.config}"
      if args.only and not any(s in label for s in args.only):
        continue
      try:
        kernels = cr.capture(case.fn, *case.args)
      except Exception as e:  # reported; the next case runs
        rows += [dict(kernel=case.kernel, config=case.config, sm=cc,
                      error=f"lowering: {type(e).__name__}: {str(e)[:300]}") for cc in args.arch]
        continue
      for kernel in kernels:
        if kernel["modifiers"]:
          print(f"# WARNING {label}: non-default load/store modifiers {kernel['modifiers']} are "
                "not carried over to the triton wheel's IR", file=sys.stderr)
        for cc in args.arch:
          work = Path(args.keep or tmp) / f"{i:02d}_{kernel['name']}"
          try:
            res = cr.compile_kernel(kernel, cc, work)
          except Exception as e:  # reported; the next case runs
            msg = " ".join(str(e).split())[:400]
            rows.append(dict(kernel=case.kernel, config=case.config, sm=cc,
                             error=f"compile: {type(e).__name__}: {msg}"))
            continue
          rows.append(cr.analyse(case, kernel, cc, res))
          r = rows[-1]
          print(f"# {label} sm_{cc}: {r['regs']} regs, spill {r['spill_st']}/{r['spill_ld']}, "
                f"smem {r['smem']}, loop {r['loop_instructions']}, "
                f"{r['instr_per_weight']:.2f} instr/weight", file=sys.stderr, flush=True)
  print_tables(rows)
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

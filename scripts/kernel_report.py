"""Compile the Pallas Triton kernels for sm_90 / sm_80 without a GPU and report their resources.

For each kernel configuration of the benchmark shapes, jax lowers the kernel for an abstract H100
(`pallas_kernels.export_check.export_cuda`); the Triton IR that Pallas hands to XLA is captured,
printed as text and compiled by the `triton` package (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for
GPUTarget("cuda", cc, 32). No GPU and no CUDA install are needed: ptxas, cuobjdump and nvdisasm
ship in the triton wheel. Printed per kernel and arch:
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

Setup (a separate venv: the triton wheel must not enter the project's .venv; Python 3.12):
  python3.12 -m venv /tmp/tritonvenv
  /tmp/tritonvenv/bin/pip install jax==0.11.2 jaxlib==0.11.2 ml_dtypes==0.7.0 numpy scipy \\
      triton==3.9.0
Usage (repository root; jax on CPU):
  JAX_PLATFORMS=cpu /tmp/tritonvenv/bin/python scripts/kernel_report.py [--arch 90 80]
      [--only SUBSTRING ...] [--json FILE] [--keep DIR]
--keep DIR writes each kernel's TTIR, PTX, cubin and SASS there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses FMAs too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.interpreters import mlir as jax_mlir  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as pcr  # noqa: E402

from pallas_kernels import codebook_matmul as cm  # noqa: E402
from pallas_kernels import flash_attention as fa  # noqa: E402
from pallas_kernels import tq_attention as tqa  # noqa: E402
from pallas_kernels.export_check import export_cuda  # noqa: E402

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
@dataclasses.dataclass
class Case:
  kernel: str
  config: str
  fn: Callable
  args: tuple
  weights_per_iter: int  # per CTA and loop iteration (whole kernel when there is no loop)
  bits: int | None  # for the HBM budget (None: no budget)


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


# ----------------------------------------------------------------------------- capture
def capture(case: Case) -> list[dict]:
  """The Triton kernels of one jax function: [{name, ttir (text), bytecode, num_warps, ...}]."""
  texts, calls = [], []
  lower, custom_call = pcr.lowering.lower_jaxpr_to_triton_module, jax_mlir.custom_call

  def lower_hook(*a, **k):
    res = lower(*a, **k)
    op = res.module.operation
    texts.append((op.get_asm(), op.get_asm(print_generic_op_form=True)))
    return res

  def call_hook(*a, **k):
    if k.get("call_target_name") == "__gpu$xla.gpu.triton":
      cfg = k["backend_config"]
      calls.append(dict(
          name=cfg["name"].value, bytecode=cfg["ir"].value_bytes,
          num_warps=int(cfg["num_warps"].value), num_stages=int(cfg["num_stages"].value),
          grid=[int(cfg[f"grid_{d}"].value) for d in "xyz"]))
    return custom_call(*a, **k)

  pcr.lowering.lower_jaxpr_to_triton_module, pcr.mlir.custom_call = lower_hook, call_hook
  try:
    export_cuda(case.fn, *case.args)
  finally:
    pcr.lowering.lower_jaxpr_to_triton_module, pcr.mlir.custom_call = lower, custom_call
  return [dict(c, ttir=t, modifiers=_modifiers(generic))
          for c, (t, generic) in zip(calls, texts, strict=True)]


def _modifiers(generic: str) -> list[str]:
  """Non-default cache / eviction modifiers of tt.load / tt.store (generic form). The textual IR
  is only equivalent under triton 3.9 (whose tt.load has `cachePolicy` instead of jax's `cache` and
  `evict`) when there are none: the defaults (1: none / evict_normal) are elided in the text."""
  return sorted({f"{k}={v}" for k, v in re.findall(r"\b(cache|evict) = (\d+) : i32", generic)
                 if v != "1"})


# ----------------------------------------------------------------------------- compile
def _bin(tool: str) -> str:
  import triton
  return str(Path(triton.__file__).parent / "backends/nvidia/bin" / tool)


def _ptxas(cc: int) -> str:
  from triton.backends.nvidia.compiler import get_ptxas
  return get_ptxas(cc).path


def compile_kernel(kernel: dict, cc: int, work: Path) -> dict:
  """triton.compile of the captured TTIR text; resources from ptxas -v, SASS from cuobjdump."""
  import triton
  from triton.backends.compiler import GPUTarget
  src = work / f"{kernel['name']}.ttir"
  src.write_text(kernel["ttir"])
  compiled = triton.compile(str(src), target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=kernel["num_warps"],
                                         num_stages=kernel["num_stages"]))
  ptx, cubin = work / f"{kernel['name']}.sm{cc}.ptx", work / f"{kernel['name']}.sm{cc}.cubin"
  ptx.write_text(compiled.asm["ptx"])
  cubin.write_bytes(compiled.asm["cubin"])
  arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"  # what triton passes to ptxas
  log = subprocess.run([_ptxas(cc), "-lineinfo", "-v", "--regAllocOptLevel=2",
                        f"--gpu-name={arch}", str(ptx), "-o", str(work / "ptxas.o")],
                       capture_output=True, text=True, check=True).stderr
  regs = int(re.search(r"Used (\d+) registers", log).group(1))
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                        text=True, check=True).stdout
  (work / f"{kernel['name']}.sm{cc}.sass").write_text(sass)
  return dict(regs=regs, spill_st=int(spill.group(1)), spill_ld=int(spill.group(2)),
              smem=int(compiled.metadata.shared), ptxas=log, sass=sass)


# ----------------------------------------------------------------------------- SASS analysis
CLASSES = {
    "int": ("IMAD IADD3 IADD LOP3 LOP SHF SHL SHR LEA LEA.HI ISETP IMNMX VIMNMX SEL IABS BMSK "
            "SGXT BFE BFI POPC FLO IMUL ISCADD IDP VIADD VIADDMNMX BREV"),
    "uniform": "",  # every U* opcode
    "mov": "MOV CS2R S2R S2UR R2UR SHFL MOVM P2R R2P PLOP3 VOTE VOTEU",
    "cvt": "F2F F2FP I2F I2FP F2I FRND I2I F2IP",
    "prmt": "PRMT",
    "fp32": "FFMA FMUL FADD FSEL FSETP FMNMX FCHK FSWZADD FSET",
    "fp16x2": "HFMA2 HMUL2 HADD2 HSET2 HSETP2 HMNMX2",
    "mufu": "MUFU",
    "tensor": "HMMA HGMMA IMMA GMMA WGMMA BGMMA QGMMA WARPGROUP",
    "ldg": "LDG LD LDGSTS UTMALDG LDGDEPBAR",
    "lds": "LDS LDSM",
    "sts": "STS",
    "stg": "STG ST RED ATOM ATOMG",
    "local": "LDL STL",
}
_OP_CLASS = {op: cls for cls, ops in CLASSES.items() for op in ops.split()}
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
  """[(address, opcode, operands)] of the first function in cuobjdump -sass output."""
  return [(int(a, 16), op, rest) for a, op, rest in _LINE.findall(sass)]


def classify(op: str) -> str:
  if op in _OP_CLASS:
    return _OP_CLASS[op]
  if op.startswith("U") and op not in ("UTMALDG",):
    return "uniform"
  return "other"


def main_loop(instrs):
  """(instructions of the longest loop body, number of backward branches); (all, 0) if none."""
  loops = []
  for addr, op, rest in instrs:
    target = re.search(r"0x([0-9a-f]+)", rest) if op in ("BRA", "JMP") else None
    if target and int(target.group(1), 16) < addr:
      loops.append((int(target.group(1), 16), addr))
  if not loops:
    return instrs, 0
  lo, hi = max(loops, key=lambda lh: lh[1] - lh[0])
  return [i for i in instrs if lo <= i[0] <= hi], len(loops)


def budget(bits: int) -> float:
  lanes_per_s = 132 * 4 * 32 * 1.98e9
  return lanes_per_s / (3.35e12 * 8 / bits)


def occupancy(regs: int, smem: int, warps: int, cc: int) -> tuple[int, str]:
  """(resident warps per SM, limiting resource)."""
  per_warp = -(-regs * 32 // 256) * 256
  ctas_regs = (65536 // per_warp) // warps
  smem_sm = (228 if cc >= 90 else 164) * 1024
  ctas_smem = smem_sm // (smem + 1024) if smem else 32
  ctas_warps = 64 // warps
  limits = {"regs": ctas_regs, "smem": ctas_smem, "warps": ctas_warps, "ctas": 32}
  lim = min(limits, key=limits.get)
  return limits[lim] * warps, lim


# ----------------------------------------------------------------------------- report
MIX = ("int", "uniform", "mov", "cvt", "prmt", "fp32", "fp16x2", "mufu", "tensor", "ldg", "lds",
       "sts", "local", "other")


def analyse(case: Case, kernel: dict, cc: int, res: dict) -> dict:
  instrs = sass_instructions(res["sass"])
  loop, n_loops = main_loop(instrs)
  mix = Counter(classify(op) for _, op, _ in loop)
  ops = Counter(op for _, op, _ in loop)
  warps = kernel["num_warps"]
  per_w = len(loop) * 32 * warps / case.weights_per_iter
  occ, lim = occupancy(res["regs"], res["smem"], warps, cc)
  return dict(kernel=case.kernel, config=case.config, triton_name=kernel["name"], sm=cc,
              warps=warps, stages=kernel["num_stages"], grid=kernel["grid"], regs=res["regs"],
              spill_st=res["spill_st"], spill_ld=res["spill_ld"], smem=res["smem"],
              warps_per_sm=occ, occupancy_limit=lim, kernel_instructions=len(instrs),
              loop_instructions=len(loop) if n_loops else None, backward_branches=n_loops,
              weights_per_iter=case.weights_per_iter, instr_per_weight=per_w,
              budget=budget(case.bits) if case.bits else None,
              mix={c: mix[c] for c in MIX if mix[c]}, top_ops=dict(ops.most_common(12)))


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


def versions() -> str:
  import triton
  out = [f"jax {jax.__version__}", f"triton {triton.__version__}"]
  for cc in (90, 80):
    v = subprocess.run([_ptxas(cc), "--version"], capture_output=True, text=True).stdout
    out.append(f"ptxas for sm_{cc}: {Path(_ptxas(cc)).name} {v.strip().splitlines()[-2]}")
  v = subprocess.run([_bin("cuobjdump"), "--version"], capture_output=True, text=True).stdout
  out.append(f"cuobjdump {v.strip().splitlines()[-2]}")
  return "; ".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--arch", nargs="+", type=int, default=[90, 80])
  ap.add_argument("--only", nargs="+", default=None, help="substrings of kernel + config")
  ap.add_argument("--json", default=None, help="write the rows as JSON to this file")
  ap.add_argument("--keep", default=None, help="directory for TTIR, PTX, cubin and SASS")
  args = ap.parse_args(argv)
  print(versions(), flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, case in enumerate(cases()):
      label = f"{case.kernel} {case.config}"
      if args.only and not any(s in label for s in args.only):
        continue
      try:
        kernels = capture(case)
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
          work.mkdir(parents=True, exist_ok=True)
          try:
            res = compile_kernel(kernel, cc, work)
          except Exception as e:  # reported; the next case runs
            msg = " ".join(str(e).split())[:400]
            rows.append(dict(kernel=case.kernel, config=case.config, sm=cc,
                             error=f"compile: {type(e).__name__}: {msg}"))
            continue
          rows.append(analyse(case, kernel, cc, res))
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

"""Compile Pallas Triton kernels for an NVIDIA target without a GPU and measure their resources.

Shared by `scripts/kernel_report.py` (the report over every kernel configuration) and
`tests/test_kernel_compile.py` (the CI bound on the 4-bit decode matmul). Needs the `triton`
wheel (ptxas, cuobjdump and nvdisasm ship inside it; no CUDA install, no GPU).

Path: jax lowers the kernel for an abstract H100 (`export_check.export_cuda`); the Triton IR that
Pallas hands to XLA is captured and printed as *text*; the TTIR passes XLA runs on it before its
own TTGIR pipeline (XLA's `MakeTTIR`, the same as triton's `make_ttir`: canonicalize, combine,
reorder-broadcast, CSE, loop unroll) are applied; then the `triton` package compiles it (TTGIR ->
LLVM -> PTX -> cubin) for `GPUTarget("cuda", cc, 32)`. Registers and spills come from `ptxas -v`,
the SASS from `cuobjdump`.

Why text: jaxlib 0.11.2's `tt.load` carries `cache`, `evict`, `isVolatile` where triton 3.9 has
`cachePolicy`, `isVolatile`; MLIR bytecode stores attributes by position, so bytecode misparses
("expected mlir::BoolAttr"), while text names each attribute. The kernels use only the default
modifiers (`capture` reports any that are not). The wheel is not the Triton fork linked into
jaxlib, so registers and SASS are close to, not identical with, what XLA would run.

Thread-instructions per weight = loop SASS instructions x 32 x warps / weights one CTA handles per
loop iteration (a warp instruction does the work of 32 lanes). Counts are static: each
instruction of the loop body once, whatever path a branch takes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from jax._src.interpreters import mlir as jax_mlir
from jax._src.pallas.triton import pallas_call_registration as pcr

from pallas_kernels.export_check import export_cuda


@dataclasses.dataclass
class Case:
  kernel: str
  config: str
  fn: Callable
  args: tuple  # ShapeDtypeStructs
  weights_per_iter: int  # per CTA and loop iteration (whole kernel when there is no loop)
  bits: int | None  # for the HBM budget (None: no budget)


# ----------------------------------------------------------------------------- capture
def capture(fn: Callable, *args) -> list[dict]:
  """The Triton kernels of one jax function: [{name, ttir (text), num_warps, num_stages, grid,
  modifiers}] (modifiers: non-default load/store cache modifiers that the text would drop)."""
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
          name=cfg["name"].value, num_warps=int(cfg["num_warps"].value),
          num_stages=int(cfg["num_stages"].value),
          grid=[int(cfg[f"grid_{d}"].value) for d in "xyz"]))
    return custom_call(*a, **k)

  pcr.lowering.lower_jaxpr_to_triton_module, pcr.mlir.custom_call = lower_hook, call_hook
  try:
    export_cuda(fn, *args)
  finally:
    pcr.lowering.lower_jaxpr_to_triton_module, pcr.mlir.custom_call = lower, custom_call
  return [dict(c, ttir=t, modifiers=_modifiers(generic))
          for c, (t, generic) in zip(calls, texts, strict=True)]


def _modifiers(generic: str) -> list[str]:
  """Non-default cache / eviction modifiers of tt.load / tt.store (generic form): the defaults (1:
  none / evict_normal) are elided in the text, others would be lost."""
  return sorted({f"{k}={v}" for k, v in re.findall(r"\b(cache|evict) = (\d+) : i32", generic)
                 if v != "1"})


# ----------------------------------------------------------------------------- compile
def triton_available() -> bool:
  try:
    import triton  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
  except ImportError:
    return False
  return True


def tool(name: str) -> str:
  """Path of a CUDA tool shipped in the triton wheel (cuobjdump, nvdisasm)."""
  import triton
  return str(Path(triton.__file__).parent / "backends/nvidia/bin" / name)


def ptxas(cc: int) -> str:
  from triton.backends.nvidia.compiler import get_ptxas
  return get_ptxas(cc).path


def make_ttir(text: str, cc: int, work: Path, name: str) -> Path:
  """The TTIR passes XLA applies to a Pallas kernel (triton's `make_ttir`), on the IR text;
  returns the file of the result. `triton.compile` skips them for IR given as a file."""
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget
  from triton.compiler.compiler import make_backend
  raw = work / f"{name}.pallas.ttir"
  raw.write_text(text)
  backend = make_backend(GPUTarget("cuda", cc, 32))
  ctx = ir.context()
  ir.load_dialects(ctx)
  backend.load_dialects(ctx)
  mod = ir.parse_mlir_module(str(raw), ctx)
  mod.context = ctx  # as triton.compile does for IR files
  backend.make_ttir(mod, {}, backend.parse_options({}), cc)
  out = work / f"{name}.ttir"
  out.write_text(str(mod))
  return out


def compile_kernel(kernel: dict, cc: int, work: Path) -> dict:
  """Compile one captured kernel for sm_`cc`: {regs, spill_st, spill_ld, smem, ptxas, sass}.
  Writes the TTIR, PTX, cubin and SASS under `work`."""
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses FMAs too
  import triton
  from triton.backends.compiler import GPUTarget
  work.mkdir(parents=True, exist_ok=True)
  name = kernel["name"]
  src = make_ttir(kernel["ttir"], cc, work, name)
  compiled = triton.compile(str(src), target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=kernel["num_warps"],
                                         num_stages=kernel["num_stages"]))
  ptx, cubin = work / f"{name}.sm{cc}.ptx", work / f"{name}.sm{cc}.cubin"
  ptx.write_text(compiled.asm["ptx"])
  cubin.write_bytes(compiled.asm["cubin"])
  arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"  # what triton passes to ptxas
  log = subprocess.run([ptxas(cc), "-lineinfo", "-v", "--regAllocOptLevel=2",
                        f"--gpu-name={arch}", str(ptx), "-o", str(work / "ptxas.o")],
                       capture_output=True, text=True, check=True).stderr
  regs = int(re.search(r"Used (\d+) registers", log).group(1))
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                        text=True, check=True).stdout
  (work / f"{name}.sm{cc}.sass").write_text(sass)
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
MIX = ("int", "uniform", "mov", "cvt", "prmt", "fp32", "fp16x2", "mufu", "tensor", "ldg", "lds",
       "sts", "local", "other")
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
  """Thread-instructions per weight an H100 SXM issues while streaming b-bit weights from HBM:
  132 SMs x 4 schedulers x 32 lanes x 1.98 GHz / (3.35 TB/s x 8 / bits)."""
  return 132 * 4 * 32 * 1.98e9 / (3.35e12 * 8 / bits)


def occupancy(regs: int, smem: int, warps: int, cc: int) -> tuple[int, str]:
  """(resident warps per SM, limiting resource): 64 warps/SM, 65536 registers, 256-register warp
  allocation granularity, 228 KiB shared memory on sm_90 (164 KiB on sm_80)."""
  per_warp = -(-regs * 32 // 256) * 256
  ctas_regs = (65536 // per_warp) // warps
  smem_sm = (228 if cc >= 90 else 164) * 1024
  ctas_smem = smem_sm // (smem + 1024) if smem else 32
  limits = {"regs": ctas_regs, "smem": ctas_smem, "warps": 64 // warps, "ctas": 32}
  lim = min(limits, key=limits.get)
  return limits[lim] * warps, lim


def analyse(case: Case, kernel: dict, cc: int, res: dict) -> dict:
  """One report row: resources, loop size, instructions per weight and the loop's opcode mix."""
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


def report(case: Case, cc: int, work: Path) -> list[dict]:
  """Capture, compile and analyse every Triton kernel of one case for sm_`cc`."""
  return [analyse(case, k, cc, compile_kernel(k, cc, work / f"{i}_{k['name']}"))
          for i, k in enumerate(capture(case.fn, *case.args))]


def versions() -> str:
  import jax
  import triton
  out = [f"jax {jax.__version__}", f"triton {triton.__version__}"]
  for cc in (90, 80):
    v = subprocess.run([ptxas(cc), "--version"], capture_output=True, text=True).stdout
    out.append(f"ptxas for sm_{cc}: {Path(ptxas(cc)).name} {v.strip().splitlines()[-2]}")
  v = subprocess.run([tool("cuobjdump"), "--version"], capture_output=True, text=True).stdout
  out.append(f"cuobjdump {v.strip().splitlines()[-2]}")
  return "; ".join(out)

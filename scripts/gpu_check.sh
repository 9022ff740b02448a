#!/usr/bin/env bash
# One command for a GPU machine (jax preinstalled, no network), within 8 minutes:
#   1. the kernel tests compiled for the GPU (interpret=False) on fresh random inputs: quantized
#      matmuls, the TurboQuant KV decode-attention kernels and flash attention (forward and
#      gradients against the dense attention), and the Mosaic GPU 4-bit decode matmul against
#      its reference (Hopper only: its numerics tests skip themselves on other cards),
#   2. bench_kernels.py --check compiled on the GPU,
#   3. the kernel benchmark tables (Gemma 4 31B / E4B layer shapes, 4 and 2 bits),
#   4. decode speed (random weights): gemma4-e4b at bf16 and tq4, gemma4-31b at tq4, and
#      gemma4-e4b tq4 at 8K context with a bf16, a tq3.5 and a tq3.5+s1+r128 KV cache,
#   5. where the `triton` package is installed, scripts/kernel_report.py for the decode
#      matmuls (registers, spills, SASS per weight), to compare with the report made without
#      a GPU (docs/BENCHMARKS.md).
# Everything goes to stdout and, when $OUT is set, to $OUT/gpu_check.txt (+ JSON files).
# Usage (repository root): bash scripts/gpu_check.sh      [PYTHON=python3]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false GEMMA_KERNEL_TEST_IMPL=pallas
OUT_DIR=${OUT:-}
LOG=${OUT_DIR:+$OUT_DIR/gpu_check.txt}
status=0

step() {  # step SECONDS NAME CMD...: runs CMD with a time limit, tees its output, keeps going
  local limit=$1 name=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "${LOG:-/dev/null}"
  timeout "$limit" "$@" 2>&1 | tee -a "${LOG:-/dev/null}"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc=$rc)" | tee -a "${LOG:-/dev/null}"; status=1; }
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "${LOG:-/dev/null}"
step 120 "kernel tests (compiled)" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
  -k "not lower_for_cuda and not model_logits and not bench_"
step 60 "KV attention kernel tests (compiled)" "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_tq_attention.py -k "not lower_for_cuda"
step 90 "flash attention kernel tests (compiled)" "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_flash_attention.py -k "kernel and not lowers"
export GEMMA_KERNEL_MOSAIC=1  # opt-in: the registry picks the Mosaic kernel on Hopper
if ! step 90 "Mosaic GPU codebook matmul tests (compiled, sm_90 only)" "$PY" -m pytest -q -x -rs \
    -p no:cacheprovider tests/test_mosaic_kernels.py -k "not lowers_for_cuda"; then
  # keep the Triton figures below coming
  export GEMMA_KERNEL_MOSAIC=0
  echo "=== GEMMA_KERNEL_MOSAIC=0 for the remaining steps" | tee -a "${LOG:-/dev/null}"
fi
step 45 "bench_kernels --check (compiled)" "$PY" scripts/bench_kernels.py --check --device gpu
step 120 "kernel benchmark" "$PY" scripts/bench_kernels.py --device gpu --bits 4 2 --json
for run in "gemma4-e4b bf16 1024 bf16" "gemma4-e4b tq4 1024 bf16" "gemma4-31b tq4 1024 bf16" \
           "gemma4-e4b tq4 8192 bf16" "gemma4-e4b tq4 8192 tq3.5" \
           "gemma4-e4b tq4 8192 tq3.5+s1+r128"; do
  set -- $run
  step 40 "decode $1 $2 context $3 kv $4" "$PY" scripts/bench_decode.py --preset "$1" \
    --quant "$2" --context "$3" --kv-quant "$4" --new-tokens 32 --json
done
if "$PY" -c "import triton" 2>/dev/null; then  # the same compile report as without a GPU
  step 120 "kernel compile report (triton wheel, sm_90)" "$PY" scripts/kernel_report.py \
    --arch 90 --only decode
else
  echo "=== kernel compile report skipped: no triton package here" | tee -a "${LOG:-/dev/null}"
fi
echo "=== done, status $status" | tee -a "${LOG:-/dev/null}"
exit $status

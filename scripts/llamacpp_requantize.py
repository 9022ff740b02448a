"""Requantize a GGUF file with llama.cpp's own quantizer (side-by-side rows; never a test).

Needs llama-cpp-python, which has no wheel here: build it once in its own venv (~14 minutes on
2 cores), e.g.

  python3.12 -m venv /tmp/llvenv
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" /tmp/llvenv/bin/pip install \\
    llama-cpp-python==0.3.36
  /tmp/llvenv/bin/python scripts/llamacpp_requantize.py --src FILE.gguf --out-dir DIR \\
      --types IQ4_XS Q4_0 Q4_K_S

then score the files with our evaluation beside our own rows:

  .venv/bin/python scripts/calibrated_quality.py --rtn --gptq --awq --bpw \\
      --gguf llama.cpp-IQ4_XS=DIR/IQ4_XS.gguf ...

Writes DIR/<TYPE>.gguf for each type (`llama_model_quantize` with allow_requantize: the source's
tensors are dequantized and quantized again, as llama.cpp's quantize tool does).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--src", required=True, help="source GGUF")
  ap.add_argument("--out-dir", required=True)
  ap.add_argument("--types", nargs="+", default=["IQ4_XS", "Q4_0", "Q4_K_S"])
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args(argv)
  import llama_cpp

  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in args.types:
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
      raise SystemExit(f"llama.cpp has no file type {name!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = args.threads
    params.allow_requantize = True
    out = out_dir / f"{name}.gguf"
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(args.src).encode(), str(out).encode(),
                                        ctypes.byref(params))
    if rc != 0:
      raise SystemExit(f"llama_model_quantize failed for {name} (code {rc})")
    print(f"{name}: {out} ({out.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

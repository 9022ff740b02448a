"""Quantized-matmul kernels: correctness check (any machine) and GPU benchmark tables.

  python scripts/bench_kernels.py --check            # interpret mode on CPU (compiled on a GPU)
  python scripts/bench_kernels.py --device gpu [--bits 4 3 2] [--m 1 4 16 64 256] [--json]

--check runs `codebook_matmul` on a set of cases against `codebook_matmul_reference` (and an
exact float64 product) and prints as its last line
  {"cases": N, "max_rel_err_f32": x, "max_rel_err_bf16": y}
--device gpu prints one table per Gemma 4 31B / E4B layer shape and bit width: for M in
{1, 4, 16, 64, 256}, the median time of the Pallas kernel, GB/s over all bytes read (codes, scales,
activations), % of the device-to-device copy bandwidth measured in the same run, and the speedup
vs a bf16 XLA dot and vs XLA dequantize-then-dot. Times are per call, from one jitted program that
chains calls over enough weight copies to exceed the L2 cache (so each call reads HBM).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma.model import config as C  # noqa: E402
from gemma.quant import codebook, packing  # noqa: E402
from pallas_kernels import codebook_matmul as cm  # noqa: E402

# (M, K, N, bits, block, transposed) cases of --check: decode and prefill tilings, every width,
# a row-major LM-head layout and a K that is not a power of two.
CHECK_CASES = [(m, k, n, b, g, t) for b in (2, 3, 4) for (m, k, n, g, t) in (
    (1, 640, 256, 128, False), (4, 384, 192, 128, False), (16, 256, 128, 64, False),
    (64, 384, 128, 128, False), (256, 256, 64, 128, False), (3, 640, 128, 128, True))]


def tq_table(bits: int, block: int) -> tuple[float, ...]:
  return tuple(float(v) for v in codebook.sphere_codebook(bits, block, "beta")[0])


def random_weight(rng, k: int, n: int, bits: int, block: int, transposed: bool = False):
  """(codes, scales, table) of a random K x N weight in the kernel's layout."""
  codes = packing.pack(jnp.asarray(rng.integers(0, 2 ** bits, (k, n)), jnp.uint32), bits, axis=0)
  scales = jnp.asarray(rng.uniform(0.5, 1.5, (k // block, n)), jnp.float16)
  if transposed:
    codes, scales = codes.T, scales.T
  return codes, scales, tq_table(bits, block)


def check(interpret: bool) -> dict:
  rng = np.random.default_rng(0)
  worst = {"float32": 0.0, "bfloat16": 0.0}
  for m, k, n, bits, block, transposed in CHECK_CASES:
    codes, scales, table = random_weight(rng, k, n, bits, block, transposed)
    for dtype in worst:
      x = jnp.asarray(rng.standard_normal((m, k)), dtype)
      kw = dict(bits=bits, block=block, transposed=transposed)
      got = cm.codebook_matmul(x, codes, scales, table, interpret=interpret, poison=True, **kw)
      ref = cm.codebook_matmul_reference(x, codes, scales, table, **kw)
      got, ref = (np.asarray(a.astype(jnp.float32), np.float64) for a in (got, ref))
      err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
      worst[dtype] = max(worst[dtype], err if np.all(np.isfinite(got)) else float("inf"))
  print(f"{len(CHECK_CASES) * 2} kernel calls ({len(CHECK_CASES)} cases x f32/bf16) against "
        f"the reference", file=sys.stderr)
  return {"cases": len(CHECK_CASES) * 2, "max_rel_err_f32": worst["float32"],
          "max_rel_err_bf16": worst["bfloat16"]}


# ----------------------------------------------------------------------------- GPU benchmark
def layer_shapes(preset: str) -> list[tuple[str, int, int, bool]]:
  """(name, K, N, transposed) of the matmuls of one layer (and the tied LM head) of a preset."""
  c = C.get_preset(preset)
  d, h, hd, kv = c.embed_dim, c.num_heads, c.head_dim, c.num_kv_heads
  return [(f"{preset} attn q", d, h * hd, False), (f"{preset} attn k", d, kv * hd, False),
          (f"{preset} attn o", h * hd, d, False), (f"{preset} mlp gate/up", d, c.ffn_dim, False),
          (f"{preset} mlp down", c.ffn_dim, d, False),
          (f"{preset} lm head", d, c.vocab_size, True)]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Device-to-device copy bandwidth, bytes moved (read + write) per second, median of 10."""
  x = jnp.ones(nbytes // 4, jnp.float32)
  f = jax.jit(lambda a: a + 1)  # one read and one write of every byte
  f(x).block_until_ready()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * nbytes / statistics.median(times)


def per_call_seconds(call, x, weights, repeats: int = 10) -> float:
  """Median seconds per call of call(x, *w) over weight copies chained in one jitted program."""
  def chained(x, weights):
    acc = jnp.zeros((), jnp.float32)
    for w in weights:  # each call depends on the previous one, so none is hoisted or merged
      y = call(x + (acc * 0).astype(x.dtype), *w)
      acc = acc + y[0, 0].astype(jnp.float32)
    return acc
  f = jax.jit(chained)
  f(x, weights).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x, weights).block_until_ready()
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / len(weights)


def bench_gpu(presets, bits_list, ms, l2_bytes: int = 256 << 20) -> list[dict]:
  rng = np.random.default_rng(0)
  bw = copy_bandwidth()
  print(f"device {jax.devices()[0].device_kind}; copy bandwidth {bw / 1e9:.0f} GB/s "
        f"(read + write)", flush=True)
  rows, dense_us = [], {}
  for preset in presets:
    for name, k, n, transposed in layer_shapes(preset):
      for bits in bits_list:
        block = 128
        codes, scales, table = random_weight(rng, k, n, bits, block, transposed)
        wbytes = codes.nbytes + scales.nbytes
        copies = int(min(32, max(2, -(-l2_bytes // wbytes))))
        qweights = [(codes + np.uint32(i), scales) for i in range(copies)]
        dense_shape = (n, k) if transposed else (k, n)
        dense = [] if any(key[0] == name for key in dense_us) else [
            (jnp.asarray(rng.standard_normal(dense_shape) * 0.02, jnp.bfloat16),)
            for _ in range(int(min(copies, max(2, -(-l2_bytes // (2 * k * n))))))]
        kw = dict(table=table, bits=bits, block=block, transposed=transposed)
        print(f"\n{name} K={k} N={n} {bits}-bit ({copies} weight copies)")
        print("|    M | kernel us | GB/s | % copy bw | vs bf16 dot | vs XLA dequant+dot |")
        print("|---|---|---|---|---|---|")
        for m in ms:
          x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
          t_k = per_call_seconds(functools.partial(cm.codebook_matmul, **kw), x, qweights)
          t_x = per_call_seconds(functools.partial(cm.codebook_matmul_reference, **kw), x,
                                 qweights)
          if (name, m) not in dense_us:  # the bf16 baseline does not depend on the bit width
            dense_us[name, m] = per_call_seconds(
                lambda x, w, t=transposed: jnp.dot(x, w.T if t else w,
                                     preferred_element_type=jnp.float32), x, dense)
          t_d = dense_us[name, m]
          read = cm.bytes_read(m, k, n, bits, block)
          row = dict(shape=name, k=k, n=n, bits=bits, m=m, kernel_us=t_k * 1e6,
                     gb_s=read / t_k / 1e9, pct_copy_bw=100 * read / t_k / bw,
                     speedup_vs_bf16_dot=t_d / t_k, speedup_vs_xla_dequant=t_x / t_k,
                     copy_bw_gb_s=bw / 1e9)
          rows.append(row)
          print(f"| {m:4d} | {row['kernel_us']:9.1f} | {row['gb_s']:6.0f} | "
                f"{row['pct_copy_bw']:5.1f}% | {row['speedup_vs_bf16_dot']:5.2f}x | "
                f"{row['speedup_vs_xla_dequant']:5.2f}x |", flush=True)
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true", help="kernels vs references (last line JSON)")
  ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  ap.add_argument("--presets", nargs="+", default=["gemma4-31b", "gemma4-e4b"])
  ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
  ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64, 256])
  ap.add_argument("--json", action="store_true", help="with --device gpu: rows as JSON last")
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if args.device == "gpu" and not on_gpu:
    ap.error(f"--device gpu needs a GPU backend; jax has {jax.default_backend()!r}")
  if args.check or args.device == "cpu":
    print(json.dumps(check(interpret=not on_gpu)))
    return 0
  rows = bench_gpu(args.presets, args.bits, args.m)
  if args.json:
    print(json.dumps(rows))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  sys.exit(main())

"""One registry of kernel implementations and the dispatch every caller goes through.

  registry.call("codebook_matmul", *args, impl=None, **kwargs)

impl: "pallas" (compiled for the GPU), "interpret" (the Pallas kernel in interpret mode: CPU
tests), "xla" (the plain-jnp `*_reference`), or None: the process default (`set_default_impl`,
or the environment variable GEMMA_KERNEL_IMPL), else Pallas on a GPU backend and XLA elsewhere.
A kernel raises NotImplementedError for shapes it cannot take; dispatch then falls through to
XLA. Each (op, choice) is logged once (logger "pallas_kernels") and kept in `choices()`.

An op may also register a "mosaic" kernel (Pallas Mosaic GPU; today the 4-bit codebook matmul).
With GEMMA_KERNEL_MOSAIC=1 on a Hopper GPU (compute capability 9.x, `mosaic_device()`),
"pallas" and "interpret" try it first, then the Triton kernel, then XLA, each on
NotImplementedError; other cards keep Triton. It is opt-in until it has been compiled and run on
a GPU (`scripts/gpu_check.sh` does both): a compile error on the device would not fall through.
`choices()` names them "mosaic" and "mosaic-interpret".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import jax

from pallas_kernels import codebook_matmul as _cm
from pallas_kernels import codebook_matmul_mosaic as _cmm
from pallas_kernels import flash_attention as _fa
from pallas_kernels import tq_attention as _tqa

IMPLS = ("pallas", "interpret", "xla")
logger = logging.getLogger("pallas_kernels")

_KERNELS: dict[str, dict[str, Callable]] = {
    "codebook_matmul": {"pallas": _cm.codebook_matmul, "mosaic": _cmm.codebook_matmul,
                        "xla": _cm.codebook_matmul_reference},
    "tq_scores": {"pallas": _tqa.tq_scores, "xla": _tqa.tq_scores_reference},
    "tq_mix": {"pallas": _tqa.tq_mix, "xla": _tqa.tq_mix_reference},
    "flash_attention": {"pallas": _fa.flash_attention, "xla": _fa.flash_attention_reference},
}
_default: list[str | None] = [os.environ.get("GEMMA_KERNEL_IMPL") or None]
_seen: dict[tuple[str, str], str] = {}


def set_default_impl(impl: str | None) -> None:
  """Process-wide impl for calls with impl=None (None: Pallas on GPU, XLA elsewhere).

  The choice is made while tracing, so a change clears jax's compilation caches.
  """
  _check_impl(impl)
  if impl != _default[0]:
    jax.clear_caches()
  _default[0] = impl


def default_impl() -> str | None:
  return _default[0]


def mosaic_device() -> bool:
  """True on a CUDA GPU of compute capability 9.x: the Mosaic kernels use wgmma (sm_90a only;
  Blackwell's tensor cores take tcgen05.mma), when GEMMA_KERNEL_MOSAIC=1 (opt-in)."""
  if os.environ.get("GEMMA_KERNEL_MOSAIC", "0") != "1" or jax.default_backend() != "gpu":
    return False
  cc = str(getattr(jax.devices()[0], "compute_capability", "") or "")
  return cc.split(".")[0] == "9"


def choices() -> dict[tuple[str, str], str]:
  """{(op, impl used): reason} for every choice made so far in this process."""
  return dict(_seen)


def _check_impl(impl):
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"unknown kernel impl {impl!r}; expected one of {IMPLS} or None")


def _note(op: str, impl: str, reason: str) -> None:
  if (op, impl) not in _seen:
    _seen[(op, impl)] = reason
    logger.info("%s: using %s (%s)", op, impl, reason)


def call(op: str, *args, impl: str | None = None, **kwargs):
  """Runs `op` with the chosen implementation, falling through to XLA on NotImplementedError."""
  if op not in _KERNELS:
    raise ValueError(f"unknown kernel op {op!r}; registered: {sorted(_KERNELS)}")
  _check_impl(impl)
  impl = impl or _default[0]
  reason = "requested"
  if impl is None:
    on_gpu = jax.default_backend() == "gpu"
    impl, reason = ("pallas", "GPU backend") if on_gpu else ("xla", "no GPU backend")
  if impl != "xla":
    kernels = [(impl, _KERNELS[op]["pallas"])]
    if "mosaic" in _KERNELS[op] and mosaic_device():
      label = "mosaic" if impl == "pallas" else "mosaic-interpret"
      kernels.insert(0, (label, _KERNELS[op]["mosaic"]))
    for label, kernel in kernels:
      try:
        out = kernel(*args, interpret=impl == "interpret", **kwargs)
        _note(op, label, reason)
        return out
      except NotImplementedError as e:
        reason = f"fell through: {e}"
    impl = "xla"
  _note(op, impl, reason)
  return _KERNELS[op]["xla"](*args, **kwargs)

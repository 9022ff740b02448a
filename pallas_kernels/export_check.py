"""Lower a jitted function for CUDA on a machine without a GPU (abstract H100), to catch Pallas
lowering errors (unsupported primitives, non-power-of-two blocks) in CPU-only CI. Triton and
Mosaic GPU kernels alike (Mosaic GPU runs its layout inference and lowering in Python at this
point, assuming sm_90 when no device is attached; its PTX is made by the custom call on a GPU).

It does not catch Triton/PTX compile limits (registers, shared memory): only a GPU run does.
"""

from __future__ import annotations

import jax
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

H100 = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
# the custom calls Pallas emits: Triton kernels, Mosaic GPU kernels (codebook_matmul_mosaic)
TRITON_CALL, MOSAIC_CALL = "__gpu$xla.gpu.triton", "mosaic_gpu_v2"
CUSTOM_CALLS = (TRITON_CALL, MOSAIC_CALL)


def export_cuda(fn, *args) -> export.Exported:
  """`jax.export` of jit(fn) for CUDA under an abstract H100 mesh. args: ShapeDtypeStructs."""
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice(**H100))
  with jax.sharding.use_abstract_mesh(mesh):
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(name) for name in CUSTOM_CALLS])(*args)

"""Weight quantization: TurboQuant (mse / prod) and RTN / NF4 baselines behind one QArray type.

  codebook.py    Lloyd-Max codebooks (exact Beta law / Gaussian limit), NF4 and int grids
  rotation.py    Haar and randomized-Hadamard block rotations (static, seeded)
  packing.py     b-bit codes <-> uint32 words (bit planes, exact b bits per code)
  qarray.py      QuantSpec, Layout, the QArray pytree; dequantize / qmatmul / einsum / take
  turboquant.py  TurboQuant_mse and _prod for vectors (KV cache) and for weights
  baselines.py   round-to-nearest int8 / int4 and NF4 with absmax scales per block
  recipes.py     named recipes (tq4, tq3, tq2, tq-mixed, int8, int4, nf4), quantize_params
  footprint.py   bytes of every preset under every recipe, from abstract(cfg)
  montecarlo.py  the paper's distortion experiments (scripts/turboquant_distortion.py)
"""

from gemma.quant.qarray import (
    Layout,
    QArray,
    QuantSpec,
    bits_per_weight,
    dequantize,
    einsum,
    nbytes,
    qmatmul,
    ragged_dot,
    take,
)
from gemma.quant.recipes import RECIPES, Recipe, get_recipe, quantize, quantize_params

__all__ = [
    "Layout", "QArray", "QuantSpec", "RECIPES", "Recipe", "bits_per_weight", "dequantize",
    "einsum", "get_recipe", "nbytes", "qmatmul", "quantize", "quantize_params", "ragged_dot",
    "take",
]

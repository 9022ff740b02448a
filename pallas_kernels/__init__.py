"""Pallas GPU kernels (Triton backend) for TurboQuant and codebook-quantized matmuls.

Each op has its own file with the kernel, a jitted wrapper taking `interpret=` and block sizes,
and a `*_reference` in plain jnp with the same signature; `registry.call` picks one. This package
imports nothing from `gemma/`.

  codebook_matmul.py   y = x @ (scale ⊙ table[packed b-bit codes]), decode and prefill tilings
  codebook_matmul_mosaic.py  the 4-bit decode tiling in Pallas Mosaic GPU (Hopper, wgmma)
  tq_attention.py      decode attention over a TurboQuant KV cache: scores and value mix on codes
  flash_attention.py   memory-efficient float attention (online softmax over blocks), with backward
  registry.py          impl choice (Pallas on GPU, XLA elsewhere), NotImplementedError fall-through
  export_check.py      CUDA lowering on a CPU-only machine (abstract H100), for CI
"""

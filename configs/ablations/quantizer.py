"""Quantizer ablation: TurboQuant vs round-to-nearest int vs NF4, across bit widths.

Every weight class (embedding / LM head, attention, MLP) at one spec, block 128 with a float16
scale per (row, block): TurboQuant (Haar rotation, Lloyd-Max codebook, the `tqB` recipes),
round-to-nearest with an absmax scale per group of 128 (the `int4` / `int8` recipes) and NF4.
Real Gemma 3 270M weights; perplexity and KL against the float model vs bits per weight.
"""

from configs.experiment import EvalPoint, Experiment, Plot, grid, points


def get_config() -> Experiment:
  return Experiment(
      name="quantizer", kind="eval", base=EvalPoint(),
      description="TurboQuant vs int (RTN, absmax per group of 128) vs NF4, weights only",
      points=(grid("tq{bits}", method=("tq",), bits=(2, 3, 4, 5))
              + grid("int{bits}", method=("int",), bits=(3, 4, 5, 8))
              + points(("nf4", dict(method="nf4", bits=4)))),
      max_tokens=1023,  # one run in ~5 min on 2 CPU cores
      plots=(Plot("perplexity", "bits_per_weight", "quantizer", logy=True),
             Plot("mean_kl", "bits_per_weight", "quantizer", logy=True),
             Plot("top1_agreement", "bits_per_weight", "quantizer")))

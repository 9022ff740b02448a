"""TurboQuant bit width: every weight class at b bits (Haar rotation, block 128), plus the
`tq-mixed` recipe (4 bits for embedding / attention, 3 for the MLP). 6 bits ran out of memory on
the real Gemma 3 270M: a 43.6 GB buffer for its 262144 x 640 embedding (every coordinate compared
with all 63 bin boundaries at once, `searchsorted(method="compare_all")`).
"""

from configs.experiment import EvalPoint, Experiment, Plot, grid, points


def get_config() -> Experiment:
  return Experiment(
      name="bits", kind="eval", base=EvalPoint(method="tq"),
      description="TurboQuant weights at 2..5 bits and the tq-mixed recipe",
      points=grid("tq{bits}", bits=(2, 3, 4, 5)) + points(("tq-mixed", dict(recipe="tq-mixed"))),
      max_tokens=1023,  # one run in ~5 min on 2 CPU cores
      plots=(Plot("perplexity", "bits_per_weight", "quantizer", logy=True),
             Plot("mean_kl", "bits_per_weight", "quantizer", logy=True)))

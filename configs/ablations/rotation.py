"""Weight rotation of TurboQuant at 4 bits: dense Haar, 2-round randomized Hadamard, or none
(the Lloyd-Max codebook of the rotated-coordinate law applied to unrotated weights).
"""

from configs.experiment import EvalPoint, Experiment, Plot, grid


def get_config() -> Experiment:
  return Experiment(
      name="rotation", kind="eval", base=EvalPoint(method="tq", bits=4),
      description="TurboQuant tq4 weights with each rotation kind (QuantSpec.rotation)",
      points=grid("tq4-{rotation}", rotation=("haar", "hadamard", "none")),
      max_tokens=2046,  # one run in ~5 min on 2 CPU cores
      plots=(Plot("perplexity"), Plot("mean_kl"), Plot("top1_agreement")))

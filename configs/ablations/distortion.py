"""TurboQuant_mse distortion D_mse = E‖x - x̃‖² of unit vectors in R^128 against the paper's
bounds 4^-b <= D_mse <= √3·π/2·4^-b (arXiv:2504.19874 Thm 1 and 3), Haar vs randomized
Hadamard rotations.
"""

from configs.experiment import Distortion, Experiment, Plot, grid


def get_config() -> Experiment:
  return Experiment(
      name="distortion", kind="distortion", base=Distortion(d=128, draws=20, vectors=4000),
      description="Monte Carlo D_mse of TurboQuant_mse vs the paper's bounds",
      points=grid("{rotation}-b{bits}", rotation=("haar", "hadamard"), bits=(1, 2, 3, 4, 5, 6)),
      plots=(Plot("d_mse", "bits", "rotation", logy=True, bounds=True, annotate=False),))

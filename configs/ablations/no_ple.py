"""Fine-tuning without per-layer embeddings: configs/finetune_tiny.py with and without the
`no_ple` structural ablation (`configs.ablations.ABLATIONS`).
"""

from configs.experiment import Experiment, Plot, points


def get_config() -> Experiment:
  from configs.finetune_tiny import get_config as finetune_config

  return Experiment(
      name="no_ple", kind="finetune", base=finetune_config(),
      description="tiny E2B-style fine-tuning run, with and without per-layer embeddings",
      points=points(("baseline", dict(ablations=())), ("no_ple", dict(ablations=("no_ple",)))),
      plots=(Plot("loss_last"),))

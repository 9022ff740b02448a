"""Fine-tuning without KV sharing: configs/finetune_tiny.py with and without the
`no_kv_sharing` structural ablation (every layer computes its own K/V).
"""

from configs.experiment import Experiment, Plot, points


def get_config() -> Experiment:
  from configs.finetune_tiny import get_config as finetune_config

  return Experiment(
      name="no_kv_sharing", kind="finetune", base=finetune_config(),
      description="tiny E2B-style fine-tuning run, with and without KV sharing",
      points=points(("baseline", dict(ablations=())),
                    ("no_kv_sharing", dict(ablations=("no_kv_sharing",)))),
      plots=(Plot("loss_last"),))

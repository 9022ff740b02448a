"""Fine-tuning: LoRA / QLoRA / full, optax AdamW, Orbax training checkpoints (see loop.py)."""

from gemma.training.config import FinetuneConfig, model_config
from gemma.training.loop import fit, load_trained, run_model_config, train

__all__ = ["FinetuneConfig", "fit", "load_trained", "model_config", "run_model_config", "train"]

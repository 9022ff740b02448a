"""What a fine-tuning run is: one frozen dataclass, built in code (configs/*.py `get_config()`).

Experiments are `dataclasses.replace` deltas of a base config; CLI flags override fields the same
way. The model comes from `checkpoint` (any format `gemma.io.checkpoint.load` reads) or, without
one, is initialized at random from `preset` plus `model` overrides and the named structural
`ablations` (configs/ablations). `tokenizer` defaults to the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from gemma.model import config as C
from gemma.model.ablations import ablate
from gemma.training.lora import DEFAULT_TARGETS, TARGETS

MODES = ("lora", "full")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  # model
  checkpoint: str | None = None
  preset: str | None = None  # random init (no checkpoint) or the config of an Orbax checkpoint
  model: tuple[tuple[str, Any], ...] = ()  # ModelConfig field overrides for a random init
  ablations: tuple[str, ...] = ()  # names in configs.ablations.ABLATIONS (random init only)
  init_std: float = 0.02
  tokenizer: str | None = None  # tokenizer.model / .json / .gguf; default: the checkpoint's
  quant: str | None = None  # quantize the frozen base with this recipe (QLoRA)
  dtype: str = "float32"
  # data: JSON lines, each {"messages": [{"role", "content"}...]}, {"prompt", "response"}
  # or {"text"}; only model turns (or the whole text) are in the loss
  data: str | None = None
  seq_len: int = 256  # tokens per example (longer ones are cut)
  batch_size: int = 4  # examples per micro-batch
  grad_accum: int = 1  # micro-batches per optimizer step
  # what trains
  mode: str = "lora"  # "lora" (adapters on `lora_targets`) or "full"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = DEFAULT_TARGETS
  # optimizer: AdamW, linear warmup then cosine decay to `end_lr_ratio`·lr
  steps: int = 100
  lr: float = 1e-4
  warmup_steps: int = 10
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  clip_norm: float = 1.0  # global gradient norm clipping (0: off)
  seed: int = 0
  mesh: str | None = None  # "DxM": params FSDP/tensor-parallel, batch rows over data (sharding)
  # outputs
  out: str | None = None  # run directory: Orbax checkpoints under out/checkpoints
  save_every: int = 0  # steps between checkpoints (0: only the last step)
  keep: int = 2  # checkpoints kept

  def __post_init__(self):
    problems = []
    if self.mode not in MODES:
      problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
    bad = [t for t in self.lora_targets if t not in TARGETS]
    if bad:
      problems.append(f"unknown LoRA targets {bad}; valid: {', '.join(TARGETS)}")
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "lora_rank", "keep"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.steps and self.warmup_steps >= self.steps:
      problems.append(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
    if self.lr <= 0:
      problems.append(f"lr must be > 0, got {self.lr}")
    if self.save_every < 0 or self.clip_norm < 0 or self.weight_decay < 0:
      problems.append("save_every, clip_norm and weight_decay must be >= 0")
    if self.checkpoint is None and self.preset is None:
      problems.append("give a checkpoint or a preset (random init)")
    if self.preset is not None and self.preset not in C.PRESETS:
      problems.append(f"unknown preset {self.preset!r}; valid: {', '.join(C.PRESETS)}")
    if self.quant is not None and self.mode == "full":
      problems.append("full fine-tuning needs float weights: drop quant or use mode='lora'")
    if self.checkpoint is not None and (self.ablations or self.model):
      problems.append("model overrides and ablations apply to a random init, not a checkpoint")
    if problems:
      raise ValueError("bad fine-tuning config: " + "; ".join(problems))

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def to_dict(self) -> dict:
    """JSON-able fields (tuples as lists, enums as their values); inverse: `from_dict`."""

    def plain(x):
      if isinstance(x, tuple | list):
        return [plain(v) for v in x]
      return x.value if isinstance(x, enum.Enum) else x

    return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, data: dict) -> FinetuneConfig:
    def tup(x):
      return tuple(tup(v) for v in x) if isinstance(x, list) else x

    fields = {k: tup(v) for k, v in data.items()}
    fields["model"] = tuple((k, tuple(C.AttentionType(t) for t in v) if k == "layer_types" else v)
                            for k, v in fields.get("model", ()))
    return cls(**fields)


def model_config(cfg: FinetuneConfig) -> C.ModelConfig:
  """The ModelConfig of a random-init run: preset + overrides + structural ablations."""
  model = dataclasses.replace(C.get_preset(cfg.preset), **dict(cfg.model))
  return ablate(model, *cfg.ablations)

"""A LoRA fine-tuning run's adapters as a Hugging Face PEFT adapter directory.

  path, notes = export_peft("runs/a", "runs/a-peft")
  # transformers + peft:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE),
  #                                                 "runs/a-peft")

Writes `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, the HF module
short names as target_modules, base_model_name_or_path = the run's base checkpoint) and
`adapter_model.safetensors` (float32), atomically.

The math. Ours (gemma/training/lora.py): a weight W [in..., out...] gets A [in..., R] and
B [R, out...], and the layer computes x W + (α/r)(x A) B. The HF loader's row for every LoRA
target is `linear` (gemma/io/formats/hf.py): the stored nn.Linear weight is
W_hf [O, I] = W.reshape(I, O).T with I, O the row-major products of the input and output axes
(so q [D, N, H] is q_proj [N·H, D], o [N, H, D] is o_proj [D, N·H]). PEFT computes
W_hf + (lora_alpha/r) · lora_B @ lora_A with lora_A [R, I] and lora_B [O, R]; hence

  lora_A.weight = A.reshape(I, R).T       lora_B.weight = B.reshape(R, O).T

gives (lora_B @ lora_A) = (A_flat B_flat).T, the same update in HF's layout, and PEFT's scale
lora_alpha / r is ours (use_rslora false). Tensor names are those of the HF export
(`gemma4 export --format hf`: Gemma4ForCausalLM / Gemma3ForCausalLM, modules "model." +
`inverse.source_name(hf.TABLE, param)` less ".weight"), under PEFT's "base_model.model." prefix:
  base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
A multimodal base (Gemma4ForConditionalGeneration) names its text layers
"model.language_model.layers...": apply the adapter to the text-only export of it instead.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from gemma.io.atomic import atomic_dir, check_target
from gemma.io.formats import hf
from gemma.io.formats.common import Mapped, linear
from gemma.io.formats.inverse import source_name
from gemma.training.loop import load_trained

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODULE_PREFIX = "model."  # Gemma4ForCausalLM / Gemma3ForCausalLM
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained writes before module names


def is_peft_dir(path: str | Path) -> bool:
  """Whether `path` holds a PEFT adapter (the only kind of folder `force` replaces)."""
  return (Path(path) / CONFIG_FILE).is_file()


def module_name(param: str) -> str:
  """The HF module a LoRA-targeted param lives in ("layers.3.attn.q" ->
  "model.layers.3.self_attn.q_proj"); ValueError when the HF table cannot express it as an
  nn.Linear weight (the only layout PEFT's LoRA layer adapts here)."""
  source = source_name(hf.TABLE, param)
  mapped = hf.TABLE(source) if source is not None else None
  if (source is None or not source.endswith(".weight") or not isinstance(mapped, Mapped)
      or mapped.targets != (param,) or mapped.transform is not linear):
    raise ValueError(f"PEFT cannot name the LoRA target {param!r}: the Hugging Face layout "
                     "holds it in no nn.Linear weight of its own")
  return MODULE_PREFIX + source.removesuffix(".weight")


def peft_tensors(adapters: dict, rank: int) -> dict[str, np.ndarray]:
  """{PEFT tensor name: float32 array} of {param name: LoraPair(a [in..., R], b [R, out...])}:
  lora_A.weight [R, I] = a.reshape(I, R).T, lora_B.weight [O, R] = b.reshape(R, O).T."""
  out = {}
  for param in sorted(adapters, key=_natural):
    pair = adapters[param]
    a = np.asarray(pair.a, np.float32)
    b = np.asarray(pair.b, np.float32)
    if a.shape[-1] != rank or b.shape[0] != rank:
      raise ValueError(f"{param}: adapter shapes A{a.shape} B{b.shape} do not have rank {rank}")
    module = PEFT_PREFIX + module_name(param)
    out[module + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
    out[module + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
  return out


def adapter_config(run_cfg, adapters: dict, base_model: str | None) -> dict:
  """adapter_config.json of a run: the fields PEFT's LoraConfig reads, PEFT's defaults for the
  features we do not use (dropout 0: it only matters while training)."""
  short = sorted({module_name(p).rsplit(".", 1)[-1] for p in adapters})
  alpha = run_cfg.lora_alpha
  return dict(
      peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
      r=run_cfg.lora_rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
      target_modules=short, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
      use_rslora=False, use_dora=False, init_lora_weights=True, modules_to_save=None,
      layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
      inference_mode=True, revision=None)


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _base_name(run_cfg, base_model: str | None) -> str | None:
  base = base_model or run_cfg.checkpoint
  if base is not None and Path(base).exists():
    return str(Path(base).absolute())
  return base


def export_peft(run_dir: str | Path, out: str | Path, *, force: bool = False,
                base_model: str | None = None) -> tuple[Path, list[str]]:
  """Writes the LoRA adapters of the fine-tuning run `run_dir` (a `finetune --out` directory)
  to `out` as a PEFT adapter. base_model: the base_model_name_or_path to record (default: the
  run's checkpoint, absolute when it is a local path). Returns (out, notes): what a user of the
  adapter should know (a quantized base during training, a random-init base).

  Raises OutputExists / OutputError (an existing `out` without `force`, or one that is not a
  PEFT adapter), ValueError for a full fine-tune (no adapters: export the model instead) and for
  targets PEFT cannot name, FileNotFoundError for a directory without training checkpoints."""
  target = check_target(out, force, kind="PEFT adapter", replaceable=is_peft_dir)
  trained, run_cfg, meta = load_trained(run_dir)
  if run_cfg.mode != "lora" or not isinstance(trained, dict):
    raise ValueError(f"{run_dir} is a {run_cfg.mode} fine-tune: it has no LoRA adapters to "
                     "export (export the trained model with --checkpoint instead)")
  tensors = peft_tensors(trained, run_cfg.lora_rank)
  base = _base_name(run_cfg, base_model)
  config = adapter_config(run_cfg, trained, base)
  notes = []
  if base is None:
    notes.append("the run started from a random init (no base checkpoint): "
                 "base_model_name_or_path is null; load the adapter onto that model yourself")
  if run_cfg.quant is not None:
    notes.append(f"the adapters were trained against the {run_cfg.quant}-quantized base "
                 "(QLoRA); PEFT applies them to the float base it loads")
  n = sum(math.prod(t.shape) for t in tensors.values())
  notes.append(f"{len(trained)} adapted weights, rank {run_cfg.lora_rank}, alpha "
               f"{run_cfg.lora_alpha}, {n:,} float32 values, step {len(meta['losses'])}")
  with atomic_dir(target, force, kind="PEFT adapter", replaceable=is_peft_dir) as tmp:
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  return target, notes

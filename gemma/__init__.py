"""Gemma 4 (and Gemma 3) in JAX: `gemma.load(path) -> Model`; `Model.generate`, `Model.chat`.

Subpackages, lowest first (imports run one way; tests/test_layout.py checks the graph):
  model/      config and presets, the params pytree, layers, attention, MoE, the forward pass
  kv/         KV cache: float and ring buffers, the TurboQuant-coded cache
  quant/      weight quantization: QArray, TurboQuant and baselines, recipes, calibration
  parallel/   device meshes and shardings, multi-host start-up, host-memory PLE, memory planning
  io/         checkpoint formats and tokenizers
  inference/  prefill/decode loop, sampling, chat templates and sessions, evaluation
  training/   LoRA and fine-tuning
  api         `load`, `Model`, `Completion`: the library in two calls
  nnx         the model as a Flax NNX module
  cli/        the `gemma4` command, a thin mapping of flags onto `api`
"""

from gemma.api import ChatSession, Completion, Model, TextStream, load

__all__ = ["ChatSession", "Completion", "Model", "TextStream", "load"]

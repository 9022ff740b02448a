"""The library in two calls: `gemma.load(path) -> Model`, then `model.generate(prompt)`.

    import gemma
    m = gemma.load("path/to/checkpoint", quant="tq4")       # any format; quantize on load
    print(m.generate("The capital of France is", max_new_tokens=16).text)
    for piece in m.generate("Once upon a time", max_new_tokens=64, stream=True):
      print(piece, end="", flush=True)
    chat = m.chat(system="Answer briefly.")                  # keeps its KV cache between turns
    print(chat.send("Hi!").text)

A `Model` holds the config, params, tokenizer and stop ids (resolved once by the loader) and
how it runs (KV cache storage, device mesh, host-memory PLE). Everything the `gemma4` command
does is a method here (`generate`, `chat`, `logits`, `evaluate`, `quantize`, `save`); the command
only maps flags onto them. Names and fields of `load`, `Model.generate` and `Completion` are a
contract, like the command's flags: added to, never renamed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma.inference import decode, speculative
from gemma.inference.decode import Runner, drain, runner
from gemma.inference.evaluate import EvalResult, check_stride, evaluate
from gemma.inference.sampling import Sampler
from gemma.inference.session import ChatSession
from gemma.inference.text import Completion, TextStream, completion
from gemma.io import checkpoint
from gemma.io.formats import converted
from gemma.kv.quant import parse_kv_cache
from gemma.model import fused
from gemma.model.config import ModelConfig
from gemma.model.params import Params
from gemma.model.transformer import forward
from gemma.parallel import distributed, host_ple, sharding
from gemma.quant import QArray, allocate, quantize_params
from gemma.quant.calibrate import Calibration, calibrate, calibration_windows
from gemma.quant.recipes import Recipe, resolve

__all__ = ["ChatSession", "Completion", "Model", "TextStream", "load"]


def default_dtype() -> jnp.dtype:
  """float32 on CPU, bfloat16 on accelerators."""
  return jnp.dtype("float32" if jax.default_backend() == "cpu" else "bfloat16")


def is_quantized(params) -> bool:
  return any(isinstance(x, QArray) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, QArray)))


@dataclasses.dataclass(eq=False)
class Model:
  """A loaded model: what it is (config, params, tokenizer, stop ids) and how it runs.

  kv_quant: KV cache storage of generation and chat (None: the params' dtype; "bf16", "f32",
    or TurboQuant "tq2".."tq4"). mesh: the `jax.sharding.Mesh` params (and caches) live on.
  ple_on_host: the per-layer-embedding table stays in host memory during generation.
  recipe: the quantization recipe of the weights (None: float).
  prefill_chunk: prompts (and chat turns) are prefilled in chunks of this many tokens against
    the cache (None: `gemma.inference.decode.DEFAULT_PREFILL_CHUNK`).
  draft: speculative decoding for generation and chat (`gemma.inference.speculative`:
    `speculative.Ngram(tokens=K)` or an MTP drafter from `speculative.make_draft(path)`);
    None: off. The output is the same as without it.
  """

  cfg: ModelConfig
  params: Params
  tokenizer: object | None = None
  stop_ids: tuple[int, ...] = ()
  path: str | None = None
  kv_quant: str | None = None
  mesh: Mesh | None = None
  ple_on_host: bool = False
  recipe: Recipe | None = None
  prefill_chunk: int | None = None
  draft: speculative.Draft | None = None
  _runner: Runner | None = dataclasses.field(default=None, init=False, repr=False)

  @property
  def name(self) -> str:
    return self.cfg.name

  @property
  def dtype(self):
    """The activation dtype (that of the embedding)."""
    return jnp.dtype(self.params.embed.dtype)

  # ------------------------------------------------------------------------------- prompts
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, <bos> first."""
    return self._tokenizer_for("a text prompt").encode(text)

  def _tokenizer_for(self, what: str):
    if self.tokenizer is None:
      raise ValueError(f"{self.path or self.name} has no tokenizer (tokenizer.model, "
                       f"tokenizer.json or GGUF metadata): {what} needs one; pass token ids "
                       "(--prompt-ids)")
    return self.tokenizer

  def prompts(self, prompt) -> tuple[list[list[int]], bool]:
    """(token ids per prompt, whether `prompt` was a batch) of a text, ids, or a list of
    either; ids are checked against the vocabulary."""
    if isinstance(prompt, str):
      rows, batch = [self.encode(prompt)], False
    elif isinstance(prompt, Sequence) and prompt and all(
        isinstance(i, int | np.integer) for i in prompt):
      rows, batch = [[int(i) for i in prompt]], False
    elif isinstance(prompt, Sequence) and prompt:
      rows = [self.prompts(p)[0][0] for p in prompt]
      batch = True
    else:
      raise ValueError(f"a prompt is a str, a list of token ids, or a non-empty list of those; "
                       f"got {prompt!r}")
    for row in rows:
      bad = [i for i in row if not 0 <= i < self.cfg.vocab_size]
      if bad:
        raise ValueError(f"prompt ids out of range [0, {self.cfg.vocab_size}): {bad[:10]}")
    return rows, batch

  # ---------------------------------------------------------------------------- generation
  def runner(self) -> Runner:
    """Params placed for generation (host PLE, mesh), built once."""
    if self._runner is None:
      self._runner = runner(self.params, self.cfg, self.mesh, self.ple_on_host)
    return self._runner

  def generate(self, prompt, *, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               stream: bool = False, max_length: int | None = None,
               on_token: Callable[[list[int]], None] | None = None
               ) -> Completion | TextStream:
    """Generates up to `max_new_tokens` per prompt, stopping at `stop_ids`.

    Args:
      prompt: text, token ids, or a batch (list) of either; text gets <bos> first.
      temperature: 0 is greedy; top_k / top_p: None is off. seed: the sampling key.
      stream: return a TextStream of str pieces (one prompt, needs a tokenizer) that join to
        the Completion's text, available as `.completion` once the stream is exhausted.
      max_length: KV cache length (default prompt + max_new_tokens).
      on_token: called with each step's new ids (one per prompt), e.g. to print ids.
    Returns:
      Completion: `.text`, `.token_ids`, `.prefill_tokens_per_s`, `.decode_tokens_per_s`
      (a list per field for a batch), `.prompt_ids`, `.compile_s`, `.kv_cache_bytes`.
    """
    rows, batch = self.prompts(prompt)
    sampler = Sampler.of(temperature, top_k, top_p)
    if stream and (batch or self.tokenizer is None):
      raise ValueError("stream=True takes one prompt and a model with a tokenizer")
    steps = decode.prompt_steps(self.runner(), rows, max_new_tokens, sampler, seed, max_length,
                                self.stop_ids, self.kv_quant, self.prefill_chunk, self.draft)
    finish = lambda value: completion(value[0], rows, self.tokenizer, self.stop_ids,  # noqa: E731
                                      batch)
    if stream:
      return TextStream(steps, self.tokenizer, self.stop_ids, finish)
    return finish(drain(steps, on_token))

  def chat(self, system: str | None = None, thinking: bool = False,
           max_length: int | None = None, draft: speculative.Draft | None = None
           ) -> ChatSession:
    """A chat session that keeps its KV cache between turns (`session.send(text)`); the
    template (Gemma 4 or Gemma 3) is the tokenizer's. Meaningful with instruction-tuned
    (`-it`) checkpoints. `draft`: speculative decoding (default: the model's `draft`)."""
    return ChatSession(self.runner(), self._tokenizer_for("chat"), self.stop_ids, system=system,
                       thinking=thinking, kv_quant=self.kv_quant, max_length=max_length,
                       prefill_chunk=self.prefill_chunk,
                       draft=self.draft if draft is None else draft)

  # ------------------------------------------------------------------------------ scoring
  def logits(self, ids) -> np.ndarray:
    """float32 logits of one forward pass: ids [T] -> [T, V], or a batch of equal-length rows
    [B, T] -> [B, T, V] (every process of a multi-host run takes part and gets them)."""
    rows, batch = self.prompts(list(ids))
    if len({len(r) for r in rows}) != 1:
      raise ValueError("logits takes rows of equal length")
    tokens = jnp.asarray(rows, jnp.int32)
    params = self.params
    if self.ple_on_host:
      rows_to = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
      params, table = host_ple.offload(params, self.cfg.ple_vocab_size, rows_to)
      params = table.attach(params, tokens)
    if self.mesh is not None:
      params = sharding.shard_params(params, self.mesh)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    out, _ = jax.jit(forward, static_argnames="cfg")(params, tokens, positions, self.cfg)
    out = np.asarray(distributed.to_host(out), np.float32)
    return out if batch else out[0]

  def text_ids(self, text: str | Sequence[int], max_tokens: int = 0) -> list[int]:
    """Token ids of a text to score (no <bos>), or the ids themselves; the first `max_tokens`
    (0: all)."""
    if max_tokens < 0:
      raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    ids = (self._tokenizer_for("a text").encode(text, add_bos=False)
           if isinstance(text, str) else list(text))
    return ids[:max_tokens] if max_tokens else ids

  def evaluate(self, text: str | Sequence[int], *, context: int = 1024,
               stride: int | None = None, max_tokens: int = 0, reference: Model | None = None,
               show_progress: bool = True) -> EvalResult:
    """Perplexity on a text (or its ids), in BOS-led windows of `context` tokens (`stride`:
    HF-style strided windows), with mean KL and top-1 agreement against `reference` — another
    model of the same tokenizer and vocabulary — or, without one, against this model's own
    weights with a plain KV cache when `kv_quant` is set (else KL 0, agreement 1)."""
    stride = check_stride(context, stride)
    ids = self.text_ids(text, max_tokens)
    ref_params, ref_cfg = None, None
    if reference is not None:
      if reference.cfg.vocab_size != self.cfg.vocab_size:
        raise ValueError(f"the reference {reference.path or reference.name} has a vocabulary of "
                         f"{reference.cfg.vocab_size}, {self.path or self.name} of "
                         f"{self.cfg.vocab_size}: KL needs the same vocabulary")
      if isinstance(text, str) and reference.tokenizer is not None and (
          reference.text_ids(text, max_tokens) != ids
          or reference.tokenizer.bos_id != self.tokenizer.bos_id):
        raise ValueError(f"the reference {reference.path or reference.name} tokenizes the text "
                         f"differently from {self.path or self.name}: they must share the "
                         "tokenizer")
      ref_params, ref_cfg = reference.params, reference.cfg
    elif self.kv_quant:
      ref_params = self.params
    params = self.params
    if self.mesh is not None:
      params = sharding.shard_params(params, self.mesh)
      ref_params = None if ref_params is None else sharding.shard_params(ref_params, self.mesh)
    bos = None if self.tokenizer is None else self.tokenizer.bos_id
    return evaluate(params, self.cfg, ids, context, reference=ref_params, bos_id=bos,
                    show_progress=show_progress, kv_quant=self.kv_quant, stride=stride,
                    reference_cfg=ref_cfg)

  # --------------------------------------------------------------------------- quantizing
  def quantize(self, recipe: Recipe | str, *, calibrate_on: str | Sequence[int] | None = None,
               calibration: Calibration | None = None, target_bpw: float | None = None,
               float_dtype=None, on_widths: Callable[[Recipe], None] | None = None) -> Model:
    """A copy with its weights quantized by `recipe` (`gemma.quant.recipes`).

    Data-free by default (round to nearest). With `calibrate_on` (a text or its ids), weights
    are rounded with the statistics of their inputs (`calibration`: GPTQ/LDLQ by default, see
    `gemma.quant.calibrate`), and `target_bpw` picks a width per tensor for that average of
    stored bits (`gemma.quant.allocate`; `on_widths` sees the chosen recipe). Float leaves are
    cast to `float_dtype` (default: unchanged).
    """
    recipe = resolve(recipe)
    if self.recipe is not None or is_quantized(self.params):
      raise ValueError(f"{self.path or self.name} is already quantized; quantize a float model")
    params = fused.unfuse(self.params, self.cfg)  # recipes, calibration: one weight each
    if calibrate_on is None:
      if target_bpw is not None or calibration is not None:
        raise ValueError("target_bpw and calibration need calibrate_on (a calibration text)")
      params = quantize_params(params, recipe)
    else:
      calib = calibration or Calibration()
      if target_bpw is not None:
        allocate.check_target(target_bpw, allocate.candidates(recipe))
      windows = calibration_windows(self.text_ids(calibrate_on), self._bos(), calib)
      if target_bpw is not None:
        recipe = allocate.allocate(params, self.cfg, recipe, windows, target_bpw)
        if on_widths is not None:
          on_widths(recipe)
      params = calibrate(params, self.cfg, recipe, windows, calib)
    if float_dtype is not None:
      params = jax.tree.map(lambda x: x if isinstance(x, QArray) else x.astype(float_dtype),
                            params, is_leaf=lambda x: isinstance(x, QArray))
    if fused.is_fused(self.params):
      params = fused.fuse(params, consume=True)
    return dataclasses.replace(self, params=params, recipe=recipe)

  def _bos(self) -> int:
    return self.cfg.bos_id if self.tokenizer is None else self.tokenizer.bos_id

  def save(self, out: str | Path, *, force: bool = False) -> Path:
    """Writes a converted checkpoint (loads with `gemma.load` like any other): params, config
    (with the recipe when quantized, and a CRC-32 per array), and the source's tokenizer and
    generation config; atomically (an existing checkpoint at `out` needs `force`)."""
    params = fused.unfuse(self.params, self.cfg)  # the checkpoint holds each weight by its name
    return converted.save_converted(out, self.cfg, params, force=force, recipe=self.recipe,
                                    tokenizer_source=self.path)


def load(path: str | Path, *, dtype=None, quant: Recipe | str | None = None,
         kv_quant: str | None = None, mesh: Mesh | str | None = None, ple_on_host: bool = False,
         preset: str | None = None, float_dtype=None, verify: bool = True,
         require_tokenizer: bool = False, prefill_chunk: int | None = None,
         draft: str | speculative.Draft | None = None, draft_tokens: int | None = None,
         fuse: bool = True) -> Model:
  """Loads any checkpoint (Hugging Face directory, .gguf file, official Orbax, converted).

  Args:
    dtype: params / activation dtype (default float32 on CPU, bfloat16 on accelerators).
    quant: a recipe (or its name) to quantize each weight with as it is read; a checkpoint
      already quantized loads as it is (asking for its own recipe is a no-op).
    kv_quant: KV cache storage for generation ("bf16", "f32", "tq2".."tq4", "+sN" / "+rN").
    mesh: a `jax.sharding.Mesh` or "DxM": every leaf is read straight into its shard.
    ple_on_host: keep the per-layer-embedding table in host memory during generation.
    preset: the config of an official Orbax checkpoint (default: inferred from its shapes).
    float_dtype: dtype of the leaves `quant` keeps in float (default `dtype`).
    verify: check a converted checkpoint's arrays against their recorded CRC-32s.
    require_tokenizer: refuse, before reading any weight, a checkpoint without a tokenizer.
    prefill_chunk: prefill prompts in chunks of this many tokens (None: the default, 2048).
    draft: speculative decoding for generate and chat: "ngram" (prompt lookup), the path of a
      Gemma 4 MTP assistant checkpoint, or a drafter object; draft_tokens: K per round.
    fuse: serve each layer's q/k/v and gate/up projections as single weights
      (`gemma.model.fused`: one matmul where there were three or two; the same values).
      `Model.params` then holds `attn.qkv` / `mlp.gate_up` instead of the separate weights
      (`fused.unfuse(model.params, model.cfg)` gives them back). Not done on a mesh.
  """
  decode.chunk_size(prefill_chunk)  # a bad chunk size fails before any weight is read
  speculative.check_draft_spec(draft, draft_tokens)  # before any weight is read
  dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
  kv_quant = None if kv_quant is None else parse_kv_cache(kv_quant)
  if isinstance(mesh, str):
    mesh = sharding.make_mesh(mesh)
  try:
    tokenizer = checkpoint.load_tokenizer(path)
  except FileNotFoundError:
    if require_tokenizer:
      raise ValueError(f"{path} has no tokenizer (tokenizer.model, tokenizer.json or GGUF "
                       "metadata): a text prompt needs one; pass token ids (--prompt-ids)"
                       ) from None
    tokenizer = None
  if tokenizer is not None:  # before reading any weight
    vocab = checkpoint.inspect(path, preset=preset)[1].vocab_size
    if tokenizer.vocab_size > vocab:
      raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} pieces, more than the "
                       f"model's vocabulary of {vocab}: they do not belong together")
  cfg, params = checkpoint.load(path, dtype, preset=preset, quant=quant,
                                float_dtype=float_dtype, mesh=mesh, verify=verify)
  if fuse and mesh is None:
    params = fused.fuse(params, consume=True)  # nothing else holds the loaded arrays
  recipe = resolve(quant) if quant is not None else None
  if checkpoint.detect_format(path) == "converted":
    recipe = converted.read_recipe(path) or recipe
  model = Model(cfg, params, tokenizer, checkpoint.stop_ids(cfg, tokenizer), path=str(path),
                kv_quant=kv_quant, mesh=mesh, ple_on_host=ple_on_host, recipe=recipe,
                prefill_chunk=prefill_chunk)
  model.draft = speculative.make_draft(draft, draft_tokens, params.embed.dtype)
  if model.draft is not None:
    speculative.check_compatible(model.draft, model.runner())
  return model

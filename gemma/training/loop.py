"""The fine-tuning loop: jitted train step, AdamW schedule, Orbax training checkpoints, resume.

  from gemma.training import FinetuneConfig, train
  result = train(FinetuneConfig(checkpoint=..., data="chat.jsonl", steps=200, out="runs/a"))

The train state is {step, trainable, opt_state}: the LoRA adapters ({leaf name: LoraPair}) or, for
full fine-tuning, the whole params tree. A checkpoint (Orbax `CheckpointManager` under
out/checkpoints) holds the state and, as JSON, the run config, the data position and the loss
history; `train` on the same `out` resumes from the latest one, and because batches are a pure
function of (seed, step) and the step is deterministic, the resumed loss trajectory equals the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gemma.io.atomic import check_target
from gemma.io.checkpoint import inspect, load, load_tokenizer
from gemma.io.formats.common import progress
from gemma.model.params import Params, abstract
from gemma.model.params import init as init_params
from gemma.model.transformer import forward
from gemma.parallel import sharding
from gemma.quant.recipes import quantize_params
from gemma.training import data as data_lib
from gemma.training import lora
from gemma.training.config import FinetuneConfig, model_config


@dataclasses.dataclass
class Run:
  """Everything a run needs besides its state."""

  cfg: FinetuneConfig
  model_cfg: object  # gemma.model.config.ModelConfig
  frozen: Params | None  # the base weights (LoRA); None for full fine-tuning
  initial: object  # the initial trainable tree
  examples: list
  tokenizer: object


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype {name!r}") from None


def build(cfg: FinetuneConfig, tokenizer=None, log=print) -> Run:
  """Loads (or initializes) the model, the tokenizer and the data; creates the adapters."""
  dtype = _dtype(cfg.dtype)
  key = jax.random.key(cfg.seed)
  init_key, lora_key = jax.random.split(key)
  if cfg.checkpoint is not None:
    model_cfg, params = load(cfg.checkpoint, dtype, preset=cfg.preset)
  else:
    model_cfg = model_config(cfg)
    params = init_params(init_key, model_cfg, dtype, std=cfg.init_std)
  if tokenizer is None:
    source = cfg.tokenizer or cfg.checkpoint
    if source is None:
      raise ValueError("a random-init run needs `tokenizer` (a tokenizer.model file)")
    tokenizer = load_tokenizer(source)
  if cfg.data is None:
    raise ValueError("no training data: set `data` (a JSONL file)")
  examples = data_lib.load_examples(cfg.data, tokenizer)
  too_big = max(max(ids) for ids, _ in examples)
  if too_big >= model_cfg.vocab_size:
    raise ValueError(f"token id {too_big} is outside the model's vocabulary "
                     f"({model_cfg.vocab_size}): tokenizer and model do not match")
  if cfg.mode == "full":
    return Run(cfg, model_cfg, None, params, examples, tokenizer)
  if cfg.quant is not None:
    log(f"quantizing the frozen base with {cfg.quant}")
    params = quantize_params(params, cfg.quant)
  adapters = lora.init_adapters(lora_key, params, cfg.lora_rank, cfg.lora_targets, jnp.float32)
  return Run(cfg, model_cfg, params, adapters, examples, tokenizer)


OPTIMIZER_FIELDS = ("steps", "lr", "warmup_steps", "end_lr_ratio", "weight_decay", "b1", "b2",
                    "clip_norm")


def optimizer(cfg: FinetuneConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with linear warmup and cosine decay."""
  return _optimizer(tuple(getattr(cfg, f) for f in OPTIMIZER_FIELDS))


def _optimizer(fields: tuple) -> optax.GradientTransformation:
  steps, lr, warmup, end_ratio, weight_decay, b1, b2, clip = fields
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=steps,
      end_value=lr * end_ratio)
  # no decay on vectors (norm scales, layer scalars)
  decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
  adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw


def _params_of(trainable, frozen, scale: float):
  return trainable if frozen is None else lora.with_adapters(frozen, trainable, scale)


def loss_sums(trainable, frozen, batch: dict, model_cfg, scale: float):
  """(Σ weighted nll, Σ weights) of one micro-batch [B, T] (float32)."""
  params = _params_of(trainable, frozen, scale)
  logits, _ = forward(params, batch["tokens"], batch["positions"], model_cfg)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # [B, T, V] -> [B, T]
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])


def make_train_step(run: Run):
  """jit(state, frozen, batch [A, B, T]) -> (state, loss, grad norm): the token-weighted mean
  loss over the A micro-batches, gradients accumulated in float32. Cached per (model config,
  optimizer settings, LoRA scale), so runs in one process share the compiled step."""
  cfg = run.cfg
  return _train_step(run.model_cfg, tuple(getattr(cfg, f) for f in OPTIMIZER_FIELDS),
                     cfg.lora_scale)


def accumulated_grads(trainable, frozen, batch: dict, model_cfg, scale: float):
  """(grads, loss) of the token-weighted mean loss over micro-batches batch [A, B, T]: per
  micro-batch gradients of Σ nll, summed in float32, divided by the total weight."""

  def sums(tr, mb):
    nll, n = loss_sums(tr, frozen, mb, model_cfg, scale)
    return nll, (nll, n)

  grad_of_sum = jax.grad(sums, has_aux=True)

  def micro(carry, mb):
    g_acc, nll_acc, n_acc = carry
    g, (nll, n) = grad_of_sum(trainable, mb)
    return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (g, nll, n), _ = jax.lax.scan(micro, init, batch)
  n = jnp.maximum(n, 1.0)
  return jax.tree.map(lambda x, p: (x / n).astype(p.dtype), g, trainable), nll / n


@functools.lru_cache(maxsize=16)
def _train_step(model_cfg, opt_fields: tuple, scale: float):
  tx = _optimizer(opt_fields)

  def step(state, frozen, batch):
    grads, loss = accumulated_grads(state["trainable"], frozen, batch, model_cfg, scale)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    new = dict(step=state["step"] + 1, trainable=trainable, opt_state=opt_state)
    return new, loss, optax.tree.norm(grads)

  return jax.jit(step, donate_argnums=(0,))


def init_state(run: Run, tx) -> dict:
  # a copy: the train step donates its state, run.initial stays usable
  trainable = jax.tree.map(
      lambda x: jnp.array(x, jnp.float32 if run.frozen is not None else x.dtype, copy=True),
      run.initial)
  return dict(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable))


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_manager(out: str | Path, cfg: FinetuneConfig):
  """Orbax's manager of a run directory: each step's checkpoint is written under a temporary
  name and renamed when complete, so a killed run resumes from the last complete step; the
  temporary directories a killed run leaves are removed when the next run starts."""
  import orbax.checkpoint as ocp

  check_target(out, force=True, kind="run directory",
               replaceable=lambda p: (Path(p) / "checkpoints").is_dir())
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Path(out).absolute() / "checkpoints", options=options)


def save(mgr, state: dict, meta: dict) -> None:
  import orbax.checkpoint as ocp

  step = int(state["step"])
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         meta=ocp.args.JsonSave(meta)), force=True)
  mgr.wait_until_finished()


def restore(mgr, like: dict, step: int | None = None) -> tuple[dict, dict]:
  """(state, meta) of a checkpoint (default the latest) into the structure of `like`."""
  import orbax.checkpoint as ocp

  step = mgr.latest_step() if step is None else step
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  if mgr.latest_step() is None:
    raise FileNotFoundError("no training checkpoint to restore")
  got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                  meta=ocp.args.JsonRestore()))
  return got.state, got.meta


def read_meta(mgr, step: int | None = None) -> dict:
  """The JSON part of a checkpoint: config, losses, data position."""
  import orbax.checkpoint as ocp

  step = mgr.latest_step() if step is None else step
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def run_model_config(cfg: FinetuneConfig):
  """The ModelConfig a run trains (from its checkpoint, or its random-init description)."""
  if cfg.checkpoint is None:
    return model_config(cfg)

  return inspect(cfg.checkpoint, cfg.preset)[1]


def abstract_state(cfg: FinetuneConfig, model_cfg) -> dict:
  """ShapeDtypeStructs of a run's train state (the template a checkpoint restores into)."""
  params = abstract(model_cfg, _dtype(cfg.dtype))
  if cfg.mode == "full":
    trainable = params
  else:
    trainable = jax.eval_shape(lambda: lora.init_adapters(
        jax.random.key(0), params, cfg.lora_rank, cfg.lora_targets, jnp.float32))
  return dict(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
              opt_state=jax.eval_shape(optimizer(cfg).init, trainable))


def load_trained(out: str | Path) -> tuple[object, FinetuneConfig, dict]:
  """(trained tree, run config, meta) of a run directory's latest checkpoint: the LoRA
  adapters {name: LoraPair} or, for a full fine-tune, the whole Params."""
  import orbax.checkpoint as ocp

  root = Path(out).absolute() / "checkpoints"
  if not root.is_dir():  # the manager would create it: a read must not write
    raise FileNotFoundError(f"{out}: no training checkpoint under {out}/checkpoints")
  mgr = ocp.CheckpointManager(root)
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{out}: no training checkpoint under {out}/checkpoints")
  meta = read_meta(mgr, step)
  cfg = FinetuneConfig.from_dict(meta["config"])
  state, _ = restore(mgr, abstract_state(cfg, run_model_config(cfg)), step)
  return state["trainable"], cfg, meta


# ---------------------------------------------------------------------------- the loop
def _place_on_mesh(run: Run, state: dict, mesh_text: str):
  """Shards the frozen base and the train state by `gemma.parallel.sharding`'s rules (optimizer
  moments like their params); batch rows go over `data`. Returns (state, batch placer)."""
  mesh = sharding.make_mesh(mesh_text)
  sizes = dict(mesh.shape)
  if run.frozen is not None:
    run.frozen = sharding.shard_params(run.frozen, mesh)
  state = sharding.shard(state, sharding.param_specs(state, sizes), mesh)
  rows = "data" if run.cfg.batch_size % sizes["data"] == 0 else None
  placement = NamedSharding(mesh, PartitionSpec(None, rows, None))  # [A, B, T]
  return state, lambda x: jax.device_put(x, placement)


RESUMABLE = ("out", "save_every", "keep", "steps", "mesh")  # may differ when resuming


def train(cfg: FinetuneConfig, show_progress: bool = True, stop_after: int | None = None) -> dict:
  """Runs (or resumes, when cfg.out holds a checkpoint) a fine-tuning run.

  stop_after: end after this many total steps (still saving), as if interrupted there.
  Returns a JSON-able dict: loss_first, loss_last, steps, losses (every step, resumed ones
  included), tokens_per_s (input tokens per second of the steps after the first), compile_s (the
  first step's seconds, compilation included), trainable_params, resumed_from, out, model, mode.
  """
  return fit(cfg, show_progress, stop_after=stop_after)[0]


def fit(cfg: FinetuneConfig, show_progress: bool = True, run: Run | None = None,
        stop_after: int | None = None) -> tuple[dict, dict, Run]:
  """`train`, also returning the final state {step, trainable, opt_state} and the Run."""
  log = (lambda m: print(m, file=sys.stderr, flush=True)) if show_progress else (lambda m: None)
  run = run or build(cfg, log=log)
  tx = optimizer(cfg)
  state = init_state(run, tx)
  losses: list[float] = []
  resumed_from = 0
  mgr = checkpoint_manager(cfg.out, cfg) if cfg.out else None
  if mgr is not None and mgr.latest_step() is not None:
    saved = read_meta(mgr)["config"]
    changed = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE and saved.get(k) != v]
    if changed:
      raise ValueError(f"{cfg.out} holds a run with other settings ({', '.join(changed)}); "
                       "resume with the same config or use a new --out")
    state, meta = restore(mgr, state)
    losses = list(meta["losses"])
    resumed_from = int(state["step"])
    log(f"resuming {cfg.out} at step {resumed_from}")
  put_batch = jnp.asarray
  if cfg.mesh:
    state, put_batch = _place_on_mesh(run, state, cfg.mesh)
  step_fn = make_train_step(run)
  end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
  tokens, timed, compile_s = 0, 0.0, None  # throughput excludes the first (compiling) step

  def meta():
    return dict(config=cfg.to_dict(), losses=losses, data_position=int(state["step"]) *
                cfg.batch_size * cfg.grad_accum, model=run.model_cfg.name)

  for s in range(int(state["step"]), end):
    batch = data_lib.step_batch(run.examples, cfg.seed, s, cfg.batch_size, cfg.grad_accum,
                                cfg.seq_len)
    t0 = time.perf_counter()
    state, loss, _ = step_fn(state, run.frozen, {k: put_batch(v) for k, v in batch.items()})
    loss = float(loss)  # waits for the step
    if compile_s is None:
      compile_s = time.perf_counter() - t0
    else:
      tokens += int(np.sum(batch["positions"] >= 0))
      timed += time.perf_counter() - t0
    if not math.isfinite(loss):
      raise FloatingPointError(f"loss is {loss} at step {s + 1}; lower lr or check the data")
    losses.append(loss)
    if show_progress:
      progress(s + 1, cfg.steps, "step", f"loss {loss:.4f} {tokens / max(timed, 1e-9):,.0f} tok/s")
    if mgr is not None and cfg.save_every and (s + 1) % cfg.save_every == 0:
      save(mgr, state, meta())
  if mgr is not None and mgr.latest_step() != int(state["step"]):
    save(mgr, state, meta())
  summary = dict(
      loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
      steps=int(state["step"]), losses=losses, tokens_per_s=tokens / max(timed, 1e-9),
      compile_s=compile_s,
      trainable_params=int(sum(x.size for x in jax.tree.leaves(state["trainable"]))),
      resumed_from=resumed_from, out=cfg.out, model=run.model_cfg.name, mode=cfg.mode)
  return summary, state, run

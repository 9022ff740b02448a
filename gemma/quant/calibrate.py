"""Calibrated quantization: statistics from a text, collected layer by layer on the quantized model.

`calibrate(params, cfg, recipe, windows)` quantizes a float model with a recipe using GPTQ/LDLQ
(or importance-weighted scales) instead of round-to-nearest, sequentially as GPTQ does:

  1. the token embeddings of the calibration windows (float table: the tied embedding is
     quantized last, as the LM head) and, for E2B/E4B, the per-layer inputs: H of the PLE
     projection from the embeddings, which is then quantized (the PLE table, read by row, is
     rounded to nearest);
  2. for each layer l: H = Σ x xᵀ of every linear input of layer l (per expert for MoE, from the
     tokens routed to it), with the inputs coming from layers < l ALREADY QUANTIZED; round
     layer l's weights with those statistics; run the quantized layer to make layer l+1's inputs
     (and the K/V that KV-sharing layers read). Only one layer's statistics live at a time;
  3. the tied embedding, calibrated as the LM head: H of the final normed hidden state.

A weight that received no input (e.g. an expert no calibration token was routed to) falls back to
round-to-nearest, and is counted in the returned report.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemma.io.formats.common import log, progress
from gemma.kv.view import FloatView
from gemma.model import transformer as M
from gemma.model.config import LayerSpec, ModelConfig
from gemma.model.layers import rms_norm
from gemma.model.params import Params, leaf_names, path_name
from gemma.quant import gptq, probe
from gemma.quant.recipes import Recipe, layout_of, quantize, resolve

MIN_CONTEXT = 16


@dataclasses.dataclass(frozen=True)
class Calibration:
  """How to calibrate: rounding method, amount of text, window length, GPTQ damping and refit."""

  method: str = "gptq"
  tokens: int = 8192
  context: int = 512
  damp: float = gptq.DAMP
  refit: bool = True

  def __post_init__(self):
    gptq.check_method(self.method)
    if self.context < MIN_CONTEXT:
      raise ValueError(f"calibration context must be >= {MIN_CONTEXT} tokens, got {self.context}")
    if self.tokens < self.context - 1:
      raise ValueError(f"calibration tokens ({self.tokens}) must fill at least one window of "
                       f"{self.context - 1} text tokens")
    if not 0 <= self.damp < 1:
      raise ValueError(f"damping must be in [0, 1), got {self.damp}")


def calibration_windows(ids: list[int], bos_id: int, calib: Calibration) -> np.ndarray:
  """Whole BOS-led windows of `calib.context` tokens from the first `calib.tokens` text tokens.

  Returns [W, context] int32. ValueError when the text is shorter than one window.
  """
  span = calib.context - 1
  ids = list(ids[:calib.tokens])
  count = len(ids) // span
  if count == 0:
    raise ValueError(f"the calibration text has {len(ids)} tokens; one window of --calib-context "
                     f"{calib.context} needs {span} (pass a longer text or a shorter context)")
  out = np.zeros((count, calib.context), np.int32)
  out[:, 0] = bos_id
  out[:, 1:] = np.asarray(ids[:count * span], np.int32).reshape(count, span)
  return out


# ----------------------------------------------------------------------------- jitted steps
@functools.partial(jax.jit, static_argnames=("spec", "cfg"))
def _layer_step(layer, h, positions, ple, shared, spec: LayerSpec, cfg: ModelConfig):
  """One decoder layer on one window, recording the probes' H. -> (h, (k, v, pos), {name: H})."""
  view = None if shared is None else FloatView(*shared)
  with probe.recording() as rec:
    out, view, _ = M.decoder_layer(
        layer, h, positions, spec, cfg, ple=ple, shared=view, cache=None, codec=None,
        start=jnp.zeros((), jnp.int32), num_columns=jnp.asarray(h.shape[1], jnp.int32))
  return out, (view.k, view.v, view.pos), rec.hessians


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ple_step(params, h, tokens, cfg: ModelConfig):
  with probe.recording() as rec:
    ple = M.per_layer_inputs(params, h, tokens, cfg)
  return ple, rec.hessians


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head_hessian(final_norm, h, cfg: ModelConfig):
  x = rms_norm(h, final_norm, eps=cfg.rms_eps, plus_one=cfg.norm_plus_one)
  return gptq.hessian_of(x.reshape(-1, x.shape[-1]))


# ----------------------------------------------------------------------------- helpers
def _replace(tree, prefix: str, new: dict):
  """`tree` with the leaves named prefix + path replaced by new[name]."""
  def one(path, leaf):
    return new.get(prefix + path_name(path), leaf)
  return jax.tree_util.tree_map_with_path(one, tree)


@dataclasses.dataclass
class Report:
  """What calibration did: the method used per weight ("rtn" for table lookups and for weights
  without statistics, which are also listed in no_data) and the wall time."""

  methods: dict[str, str] = dataclasses.field(default_factory=dict)
  no_data: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0


LOOKUPS = ("ple_embed",)  # tables only read by row: no matmul input, always rounded to nearest


def _quantize_leaves(tree, prefix: str, recipe: Recipe, hessians: dict, calib: Calibration,
                     report: Report, only: set[str] | None = None) -> dict:
  """Quantizes every leaf of `tree` (named prefix + path, restricted to `only`) that the recipe
  quantizes, with its H when there is one. -> {name: QArray}."""
  out = {}
  for name, leaf in zip(leaf_names(tree), jax.tree.leaves(tree), strict=True):
    name = prefix + name
    spec = recipe.spec_of(name)
    if spec is None or (only is not None and name not in only):
      continue
    h = hessians.get(name)
    no_data = h is None or not float(jnp.trace(h.reshape(-1, *h.shape[-2:]).sum(0))) > 0
    if name in LOOKUPS or no_data:
      out[name] = quantize(leaf, spec, layout_of(name))
      report.methods[name] = "rtn"
      if name not in LOOKUPS:
        report.no_data.append(name)
      continue
    if h.ndim == 3:  # experts: per-expert H; an expert without tokens gets H = I (RTN)
      empty = jnp.trace(h, axis1=1, axis2=2) <= 0
      h = jnp.where(empty[:, None, None], jnp.eye(h.shape[-1], dtype=h.dtype), h)
    out[name] = gptq.quantize_weight(leaf, h, spec, layout_of(name), calib.method, calib.damp,
                                     calib.refit)
    report.methods[name] = calib.method
  return out


def _sum(acc: dict, new: dict) -> dict:
  for k, v in new.items():
    acc[k] = v if k not in acc else acc[k] + v
  return acc


# ----------------------------------------------------------------------------- driver
Process = Callable[[object, str, dict, set], dict]


def walk(params: Params, cfg: ModelConfig, windows: np.ndarray, probed: Callable[[str], bool],
         process: Process, show_progress: bool = True, what: str = "calibrating layers") -> Params:
  """Runs the calibration windows through the model one stage at a time (PLE projection, each
  layer, the LM head), collecting H for every weight `probed(name)` selects and calling
  `process(tree, prefix, hessians, names)` after each stage; the leaves it returns ({name: new
  leaf}) replace the old ones BEFORE the stage's outputs are computed for the next stage, so
  later statistics see the processed (e.g. quantized) earlier stages.

  windows: [W, C] int32 (`calibration_windows`). Returns the params with every replacement.
  """
  t0 = time.perf_counter()
  dtype = params.embed.dtype
  tokens = [jnp.asarray(w[None]) for w in windows]
  positions = jnp.arange(windows.shape[1], dtype=jnp.int32)[None]
  # [1, C, D] scaled embeddings of each window (float table: the embedding is the LM head, last)
  hs = [M.embed(params, t, cfg, dtype) for t in tokens]
  ple = [None] * len(hs)
  if cfg.use_ple:
    names = {n for n in ("ple_proj", "ple_embed") if probed(n)}
    wrapped = probe.wrap(params, names)
    stats = {}
    for h, t in zip(hs, tokens, strict=True):
      stats = _sum(stats, _ple_step(wrapped, h, t, cfg)[1])
    params = _replace(params, "", process(params, "", stats, names))
    ple = [_ple_step(params, h, t, cfg)[0] for h, t in zip(hs, tokens, strict=True)]
  sources = {s.kv_source for s in cfg.layers if s.shares_kv}
  views: dict[int, list] = {}
  layers = list(params.layers)
  for spec in cfg.layers:
    i = spec.index
    prefix = f"layers.{i}."
    names = {prefix + n for n in leaf_names(layers[i]) if probed(prefix + n)}
    shared = views.get(spec.kv_source) if spec.shares_kv else None

    def run(layer, w, shared=shared, i=i, spec=spec):
      p = None if ple[w] is None else ple[w][:, :, i]
      return _layer_step(layer, hs[w], positions, p, None if shared is None else shared[w],
                         spec, cfg)

    stats = {}
    wrapped = probe.wrap(layers[i], names, prefix)
    for w in range(len(hs)):
      stats = _sum(stats, run(wrapped, w)[2])
    layers[i] = _replace(layers[i], prefix, process(layers[i], prefix, stats, names))
    del stats
    outs = []
    for w in range(len(hs)):
      hs[w], kv, _ = run(layers[i], w)
      outs.append(kv)
    if i in sources:
      views[i] = outs
    if show_progress:
      progress(i + 1, cfg.num_layers, what, f"({time.perf_counter() - t0:.0f} s)")
  params = dataclasses.replace(params, layers=tuple(layers))
  if probed("embed"):
    if show_progress:
      log(f"{what}: the tied embedding as the LM head {tuple(params.embed.shape)}")
    h_head = sum(_head_hessian(params.final_norm, h, cfg) for h in hs)
    params = _replace(params, "", process(params, "", {"embed": h_head}, {"embed"}))
  return params


def calibrate(params: Params, cfg: ModelConfig, recipe: Recipe | str, windows: np.ndarray,
              calib: Calibration = Calibration(), show_progress: bool = True,
              report: Report | None = None) -> Params:
  """Quantizes `params` with `recipe`, every quantized weight rounded with calibration statistics.

  Args:
    params: float params (float32 recommended).
    cfg: their config.
    recipe: the recipe (per-class and per-tensor specs). Float leaves are returned unchanged
      (the caller casts them to recipe.float_dtype).
    windows: [W, C] int32 calibration windows (`calibration_windows`).
    calib: method, damping, refit.
    report: filled with what was done per weight.
  Returns:
    params with the recipe's weights as QArrays (the same format round-to-nearest produces).
  """
  recipe = resolve(recipe)
  report = report if report is not None else Report()
  t0 = time.perf_counter()

  def process(tree, prefix, stats, names):
    return _quantize_leaves(tree, prefix, recipe, stats, calib, report, names)

  params = walk(params, cfg, windows, lambda n: recipe.spec_of(n) is not None, process,
                show_progress)
  report.seconds += time.perf_counter() - t0
  if report.no_data:
    log(f"calibration: {len(report.no_data)} weights had no calibration input and were rounded "
        f"to nearest: {', '.join(report.no_data[:8])}{' ...' if len(report.no_data) > 8 else ''}")
  return params

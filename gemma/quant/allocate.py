"""Bit allocation: choose a width per tensor to meet a target average of bits per weight.

Sensitivity proxy (measured once, not by one forward pass per tensor and width): the second-order
(diagonal Fisher) term of the loss change when tensor t alone is perturbed by its quantization
error ΔW_b at width b,

    S_t(b) = ½ Σ_tokens Σ_rows g² δy²  ≈  ½ Σ_r F_r · (ΔW_b H ΔW_bᵀ)_rr / N

where g = ∂NLL/∂y is the gradient of the calibration text's loss with respect to the tensor's
output y (one backward pass through the float model, taps on every output), F_r = Σ_tokens g_r²,
H = Σ x xᵀ of the tensor's inputs (N tokens) and ΔW_b the data-free quantization error. For a
table read by row (the embedding's lookup side, the PLE table) the term is exact in the rows the
text uses: ½ Σ_tokens Σ_d g_d² ΔW_b[token, d]². The tied embedding adds both of its roles.
Justification: the KL of a slightly perturbed model to the float model is, to second order,
½ δzᵀ F δz (F the Fisher of the output distribution); with a diagonal F and independence of
g and δy this is S_t; it ranks widths and tensors in one backward pass and one statistics pass,
where measuring the KL of each (tensor, width) would cost one forward pass per pair.

The widths then solve a multiple-choice knapsack: minimize Σ_t S_t(b_t) subject to
Σ_t n_t·bits(b_t) <= target·Σ_t n_t, by Lagrangian relaxation (bisection on the price of a
bit) followed by greedy upgrades with what the budget has left.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gemma.io.formats.common import log, progress
from gemma.model import transformer as M
from gemma.model.config import ModelConfig
from gemma.model.params import Params, leaf_names
from gemma.quant import probe
from gemma.quant.calibrate import walk
from gemma.quant.footprint import abstract_qarray
from gemma.quant.gptq import bits_of, row_errors
from gemma.quant.qarray import QArray, QuantSpec, bits_per_weight
from gemma.quant.recipes import Recipe, layout_of, quantize, resolve

TQ_WIDTHS = (2, 3, 4, 5)


def candidates(recipe: Recipe) -> tuple[QuantSpec, ...]:
  """The widths a tensor may get: the recipe's grid at 2..5 bits (TurboQuant or int, same block)
  and int8 (g128). NF4 has one width only, so it cannot be allocated."""
  specs = {s.method for _, s in recipe.specs}
  if not specs or specs - {"tq", "int"}:
    raise ValueError(f"bit allocation needs a TurboQuant or int recipe; {recipe.name} uses "
                     f"{sorted(specs)}")
  layer_specs = [s for c, s in recipe.specs if c != "embed"] or [s for _, s in recipe.specs]
  base = layer_specs[0]
  grid = [dataclasses.replace(base, bits=b) for b in TQ_WIDTHS]
  return (*grid, QuantSpec(method="int", bits=8, block=128, rotation="none"))


def check_target(target: float, cands: tuple[QuantSpec, ...]) -> float:
  lo = min(bits_of(s) for s in cands)
  if not target >= lo:
    raise ValueError(f"--target-bpw {target} is below the smallest width's {lo:.3f} bits/weight")
  return float(target)


# ----------------------------------------------------------------------------- gradients
def _nll(taps, params, tokens, positions, cfg: ModelConfig, names: frozenset):
  logits, _ = M.forward(probe.wrap(params, set(names), taps=taps), tokens, positions, cfg)
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))


_grad = jax.jit(jax.grad(_nll), static_argnames=("cfg", "names"))


def output_fisher(params: Params, cfg: ModelConfig, windows: np.ndarray, names: set[str],
                  show_progress: bool = True):
  """Σ_tokens g² of the loss gradient at each probed tensor's output rows, and at its lookups.

  Returns:
    ({name: F [n_out]}, {name: (unique ids [U], Σ g² [U, row width])} for lookups).
  """
  positions = jnp.arange(windows.shape[1], dtype=jnp.int32)[None]
  shapes = {}

  def shape_of(p):
    with probe.recording() as rec:
      M.forward(probe.wrap(p, names), jnp.asarray(windows[:1]), positions, cfg)
    shapes.update(rec.outputs)
    return 0

  jax.eval_shape(shape_of, params)
  leaves = _leaves(params)
  fisher, lookups = {}, {}
  for w in range(len(windows)):
    tokens = jnp.asarray(windows[w:w + 1])
    taps = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    grads = _grad(taps, params, tokens, positions, cfg, frozenset(names))
    for key, g in grads.items():
      g2 = np.asarray(jnp.square(g), np.float64)
      if key.endswith(probe.LOOKUP):
        name = key[:-len(probe.LOOKUP)]
        ids = np.asarray(tokens).reshape(-1)
        rows = g2.reshape(ids.size, -1)
        old_ids, old = lookups.get(name, (np.zeros(0, np.int64), np.zeros((0, rows.shape[1]))))
        all_ids = np.concatenate([old_ids, ids])
        uniq, inv = np.unique(all_ids, return_inverse=True)
        acc = np.zeros((uniq.size, rows.shape[1]))
        np.add.at(acc, inv, np.concatenate([old, rows]))
        lookups[name] = (uniq, acc)
      else:
        n_out = int(np.prod(layout_of(key).split(tuple(leaves[key].shape))[2]))
        f = g2.reshape(-1, n_out).sum(0)
        fisher[key] = f if key not in fisher else fisher[key] + f
    if show_progress:
      progress(w + 1, len(windows), "sensitivity: gradients")
  return fisher, lookups


def _leaves(params) -> dict:
  return dict(zip(leaf_names(params), jax.tree.leaves(params), strict=True))


# ----------------------------------------------------------------------------- errors
def lookup_errors(w: jax.Array, q: QArray, ids: np.ndarray, g2: np.ndarray) -> float:
  """Σ_rows Σ_d g² ΔW[row, d]² over the table rows the calibration text reads (q: w quantized)."""
  ids = jnp.asarray(ids)
  delta = (w[ids].astype(jnp.float32) - q[ids].astype(jnp.float32)).reshape(ids.size, -1)
  return float(np.sum(g2 * np.asarray(delta, np.float64) ** 2))


def sensitivities(params: Params, cfg: ModelConfig, windows: np.ndarray, recipe: Recipe,
                  cands: tuple[QuantSpec, ...], show_progress: bool = True) -> dict:
  """S_t(b) of every tensor the recipe quantizes at every candidate: {name: [len(cands)]}."""
  names = {n for n in leaf_names(params) if recipe.spec_of(n) is not None}
  fisher, lookups = output_fisher(params, cfg, windows, names, show_progress)
  tokens = windows.size
  leaves = _leaves(params)
  sens = {n: np.zeros(len(cands)) for n in names}

  def measure(tree, prefix, stats, probed):
    for name in sorted(probed):
      w = leaves[name]
      for i, spec in enumerate(cands):
        q = quantize(w, spec, layout_of(name))  # the data-free error ΔW at this width
        if name in stats and name in fisher:
          rows = 1 if stats[name].ndim == 2 else cfg.top_k_experts
          e = np.asarray(row_errors(w, q, stats[name]))
          sens[name][i] += 0.5 * float(np.dot(fisher[name], e)) / (tokens * rows)
        if name in lookups:
          sens[name][i] += 0.5 * lookup_errors(w, q, *lookups[name])
    return {}

  walk(params, cfg, windows, lambda n: n in names, measure, show_progress,
       "sensitivity: errors per width")
  return sens


# ----------------------------------------------------------------------------- knapsack
def solve(sens: dict[str, np.ndarray], bits: dict[str, np.ndarray], sizes: dict[str, int],
          target: float) -> dict[str, int]:
  """Width index per tensor minimizing Σ S subject to Σ n·bits <= target·Σ n.

  sens, bits: {name: [widths]} loss proxy and stored bits per weight of each width.
  """
  names = sorted(sens)
  s = np.stack([sens[k] for k in names])  # [tensors, widths]
  b = np.stack([bits[k] for k in names])
  n = np.asarray([sizes[k] for k in names], np.float64)
  budget = target * n.sum()

  def pick(lam):
    return np.argmin(s + lam * n[:, None] * b, axis=1)

  def cost(choice):
    return float(np.sum(n * b[np.arange(len(names)), choice]))

  if cost(np.argmin(b, axis=1)) > budget:
    raise ValueError(f"--target-bpw {target} is below what the smallest widths store "
                     f"({cost(np.argmin(b, axis=1)) / n.sum():.3f} bits/weight)")
  lo, hi = 0.0, 1.0
  while cost(pick(hi)) > budget:
    hi *= 4
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if cost(pick(mid)) <= budget else (mid, hi)
  choice = pick(hi)
  while True:  # greedy upgrades with the budget left: best loss decrease per extra bit first
    left = budget - cost(choice)
    cur = np.arange(len(names)), choice
    extra = n[:, None] * (b - b[cur][:, None])
    gain = s[cur][:, None] - s
    ratio = np.where((extra > 0) & (extra <= left) & (gain > 0), gain / np.where(
        extra > 0, extra, 1), 0)
    if not ratio.max() > 0:
      break
    t, j = np.unravel_index(np.argmax(ratio), ratio.shape)
    choice[t] = j
  return {k: int(c) for k, c in zip(names, choice, strict=True)}


def stored_bits(shape: tuple[int, ...], spec: QuantSpec, name: str) -> float:
  """Stored bits per weight of a `shape` tensor at `spec` (block planning and packing included)."""
  return bits_per_weight(abstract_qarray(tuple(shape), "float32", spec, layout_of(name)))


def allocate(params: Params, cfg: ModelConfig, recipe: Recipe | str, windows: np.ndarray,
             target: float, show_progress: bool = True) -> Recipe:
  """A recipe with a width per tensor (`Recipe.tensors`) meeting `target` bits per weight on
  average over the quantized weights (scales included)."""
  recipe = resolve(recipe)
  cands = candidates(recipe)
  check_target(target, cands)
  sens = sensitivities(params, cfg, windows, recipe, cands, show_progress)
  leaves = _leaves(params)
  shapes = {n: tuple(leaves[n].shape) for n in sens}
  sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
  bits = {n: np.asarray([stored_bits(shapes[n], c, n) for c in cands]) for n in sens}
  choice = solve(sens, bits, sizes, target)
  tensors = tuple((n, cands[choice[n]]) for n in sorted(choice))
  avg = sum(sizes[n] * bits[n][choice[n]] for n in choice) / sum(sizes.values())
  log(f"bit allocation for {target} bits/weight: {avg:.3f} on average; "
      + ", ".join(f"{_label(c)}: {sum(1 for n in choice if choice[n] == i)} tensors"
                  for i, c in enumerate(cands)))
  return Recipe(f"{recipe.name}-bpw{target:g}", recipe.specs, recipe.float_dtype, tensors,
                recipe.calibration)


def _label(spec: QuantSpec) -> str:
  return f"{spec.method}{spec.bits}" + (f"-g{spec.block}" if spec.block != 128 else "")


def widths_table(recipe: Recipe) -> str:
  """One line per tensor: name, width."""
  return "\n".join(f"  {n}: {_label(s) if s else 'float'}" for n, s in recipe.tensors)


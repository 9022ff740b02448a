"""Runs an experiment grid (configs/ablations/*.py): JSON rows, a Markdown table and PNG plots.

  .venv/bin/python scripts/ablate.py --config configs/ablations/quantizer.py --out DIR \
      [--max-tokens N] [--context N] [--checkpoint PATH] [--text FILE] [--only LABEL ...] \
      [--set FIELD=VALUE ...] [--fresh]

The config file is imported by path; its `get_config()` returns a `configs.experiment.Experiment`
whose grid points are `dataclasses.replace` deltas of a base setting. Every point appends one JSON
object to DIR/results.jsonl (label, deltas, the resolved setting and its measurements); the points
of this run then go to DIR/results.md (a Markdown table, also printed) and DIR/*.png (matplotlib,
Agg). Progress goes to stderr.

Kinds: eval (weights / KV cache quantization of a checkpoint, default the real Gemma 3 270M:
perplexity, KL and top-1 agreement against the float model; all points are scored in one pass
over the text, the reference model running once per window), distortion (Monte Carlo D_mse vs
the paper's bounds) and finetune (`gemma.training.train` per point; final loss).

--max-tokens / --context / --checkpoint / --text override the experiment's eval settings;
--set FIELD=VALUE replaces a field of the base setting (a Python literal, else a string), e.g.
`--set vectors=500` for a quicker distortion run or `--set steps=10` for fine-tuning;
--only runs the named points; --fresh empties results.jsonl first (it is appended to otherwise).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.experiment import Experiment, Plot, load_config, paper_bounds  # noqa: E402
from gemma.io.atomic import atomic_file, check_target  # noqa: E402
from gemma.io.formats.common import log  # noqa: E402

Row = dict
Emit = Callable[[Row], None]


# ------------------------------------------------------------------------------------- runners
def run_eval(exp: Experiment, emit: Emit, meta: dict) -> None:
  from gemma.inference.evaluate import evaluate_many
  from gemma.io.checkpoint import load, load_tokenizer
  from gemma.kv import quant as KV
  from gemma.quant.footprint import size_report
  from gemma.quant.recipes import quantize_params

  if exp.checkpoint:
    checkpoint = exp.checkpoint
  else:
    from scripts.quant_quality import default_checkpoint
    checkpoint = default_checkpoint()
  text = Path(exp.text) if Path(exp.text).is_absolute() else ROOT / exp.text
  tokenizer = load_tokenizer(checkpoint)
  ids = tokenizer.encode(text.read_text(encoding="utf-8"), add_bos=False)
  ids = ids[:exp.max_tokens] if exp.max_tokens else ids
  cfg, reference = load(checkpoint, jnp.dtype(exp.dtype))
  meta.update(model=cfg.name, checkpoint=Path(checkpoint).name, text=text.name, tokens=len(ids),
              max_tokens=exp.max_tokens, context=exp.context, dtype=exp.dtype,
              reference_kv_quant=exp.reference_kv_quant)
  models, info, kv_quants = {}, {}, {}
  resolved = exp.resolved()
  for i, (point, setting) in enumerate(resolved):
    t0 = time.perf_counter()
    recipe = setting.weight_recipe(point.label)
    model = reference if recipe is None else jax.block_until_ready(
        quantize_params(reference, recipe))
    report = size_report(model)
    kv = setting.kv_quant
    kv_bits = None
    if kv in KV.FLOAT_CACHES:
      kv_bits = 8.0 * jnp.dtype(KV.FLOAT_CACHES[kv]).itemsize
    elif kv is not None:
      kv_bits = KV.bits_per_channel(KV.get_kv_quant(kv), cfg.head_dim)
    models[point.label], kv_quants[point.label] = model, kv
    info[point.label] = dict(
        quantizer=setting.quantizer, recipe=None if recipe is None else recipe.name,
        bits_per_weight=report["quantized_bits_per_weight"] or report["bits_per_weight"],
        model_bits_per_weight=report["bits_per_weight"], total_bytes=report["total_bytes"],
        kv_quant=kv, kv_bits_per_channel=kv_bits, quantize_seconds=time.perf_counter() - t0)
    log(f"[{i + 1}/{len(resolved)}] {point.label}: {info[point.label]['bits_per_weight']:.3f} "
        f"bits/weight, kv {kv or 'none'} ({info[point.label]['quantize_seconds']:.1f} s)")
  log(f"scoring {len(models)} models on {len(ids)} tokens (context {exp.context})")
  results = evaluate_many(models, cfg, ids, exp.context, reference=reference,
                          bos_id=tokenizer.bos_id, kv_quants=kv_quants,
                          reference_kv_quant=exp.reference_kv_quant)
  for point, _ in resolved:
    r = results[point.label]
    i = info[point.label]
    emit(dict(
        **i, perplexity=float(r.perplexity),
        reference_perplexity=float(r.reference_perplexity),
        delta_pct=100 * (r.perplexity / r.reference_perplexity - 1), mean_kl=float(r.mean_kl),
        top1_agreement=float(r.top1_agreement), tokens=r.tokens, windows=r.windows,
        eval_seconds=r.seconds, seconds=i["quantize_seconds"] + r.seconds, model=cfg.name,
        context=exp.context, _point=point))


def run_distortion(exp: Experiment, emit: Emit, meta: dict) -> None:
  from gemma.quant import montecarlo

  resolved = exp.resolved()
  for i, (point, d) in enumerate(resolved):
    t0 = time.perf_counter()
    out = montecarlo.distortion(d.d, [d.bits], draws=d.draws, vectors=d.vectors, seed=d.seed,
                                kind=d.rotation, rounds=d.rounds, law=d.law)
    k = str(d.bits)
    lower, upper = paper_bounds(d.bits)
    row = dict(bits=d.bits, rotation=d.rotation, d=d.d, draws=d.draws, vectors=d.vectors,
               d_mse=out["mse"][k], d_mse_se=out["mse_se"][k], exact_mse=out["exact_mse"][k],
               lower_bound=lower, upper_bound=upper, ratio_to_lower=out["mse"][k] / lower,
               d_prod=out["prod"][k], predicted_prod=out["predicted_prod"][k],
               shrinkage=out["bias"][k], seconds=time.perf_counter() - t0, _point=point)
    log(f"[{i + 1}/{len(resolved)}] {point.label}: D_mse {row['d_mse']:.5f} "
        f"(bounds {lower:.5f} .. {upper:.5f}, {row['seconds']:.1f} s)")
    emit(row)
  meta.update(d=resolved[0][1].d)


def run_finetune(exp: Experiment, emit: Emit, meta: dict) -> None:
  from gemma.training import train

  resolved = exp.resolved()
  for i, (point, ft) in enumerate(resolved):
    if ft.out is not None:  # one run directory per point, or they would resume each other
      ft = dataclasses.replace(ft, out=str(Path(ft.out) / point.label))
    log(f"[{i + 1}/{len(resolved)}] {point.label}: ablations {list(ft.ablations)}")
    t0 = time.perf_counter()
    out = train(ft, show_progress=True)
    scalars = {k: v for k, v in out.items()
               if isinstance(v, (int, float, str, bool)) or v is None}
    emit(dict(scalars, ablations=list(ft.ablations), preset=ft.preset,
              loss_first=float(out["loss_first"]), loss_last=float(out["loss_last"]),
              steps=int(out["steps"]), seconds=time.perf_counter() - t0, _point=point))
    log(f"[{i + 1}/{len(resolved)}] {point.label}: loss {out['loss_first']:.4f} -> "
        f"{out['loss_last']:.4f} in {out['steps']} steps")


# ---------------------------------------------------------------------------- table and plots
def _fmt(v, spec: str) -> str:
  if v is None:
    return "—"
  if spec == "pct":
    return f"{v:+,.0f}%" if abs(v) >= 1000 else f"{v:+.2f}%"
  if spec == "g":
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return ", ".join(map(str, v)) or "none"
  return format(v, spec) if spec else str(v)


COLUMNS = {
    "eval": (("point", "label", ""), ("quantizer", "quantizer", ""),
             ("bits/weight", "bits_per_weight", ".3f"), ("KV cache", "kv_quant", ""),
             ("KV bits/channel", "kv_bits_per_channel", ".3f"), ("perplexity", "perplexity", "g"),
             ("Δ ppl", "delta_pct", "pct"), ("mean KL", "mean_kl", ".4f"),
             ("top-1 agreement", "top1_agreement", ".4f"), ("seconds", "seconds", ".0f")),
    "distortion": (("point", "label", ""), ("rotation", "rotation", ""), ("b", "bits", ""),
                   ("D_mse (MC)", "d_mse", ".4g"), ("± se", "d_mse_se", ".1e"),
                   ("exact (Lloyd-Max)", "exact_mse", ".4g"), ("lower 4^-b", "lower_bound", ".4g"),
                   ("upper √3π/2·4^-b", "upper_bound", ".4g"),
                   ("D_mse / lower", "ratio_to_lower", ".3f"), ("d·D_prod", "d_prod", ".4f"),
                   ("E⟨x,x̃⟩", "shrinkage", ".4f"), ("seconds", "seconds", ".1f")),
    "finetune": (("point", "label", ""), ("ablations", "ablations", ""), ("steps", "steps", ""),
                 ("loss first", "loss_first", ".4f"), ("loss last", "loss_last", ".4f"),
                 ("trainable params", "trainable_params", ","),
                 ("tokens/s", "tokens_per_s", ".0f"), ("seconds", "seconds", ".0f")),
}


def header(exp: Experiment, meta: dict) -> str:
  lines = [f"# Ablation `{exp.name}` ({exp.kind})", "", exp.description or "", ""]
  if exp.kind == "eval":
    ref = meta.get("reference_perplexity")
    lines.append(
        f"{meta['model']} ({meta['checkpoint']}), first {meta['tokens']:,} tokens of "
        f"{meta['text']} (max_tokens {meta['max_tokens'] or 'all'}), BOS-led windows of "
        f"{meta['context']} tokens, {meta['dtype']}; reference: the float model with "
        f"{meta['reference_kv_quant'] or 'no'} KV cache"
        + (f", perplexity {ref:.4f}" if ref is not None else "") + ".")
  elif exp.kind == "distortion":
    lines.append(f"Unit vectors in R^{meta.get('d')}; bounds from arXiv:2504.19874 Thm 1 (upper) "
                 "and Thm 3 (lower, any quantizer).")
  lines.append(f"{meta['date']}, {meta['machine']} ({meta['cpus']} CPUs), jax {meta['jax']}, "
               f"{meta['seconds']:.0f} s. Command: `{meta['command']}`")
  return "\n".join(lines) + "\n"


def markdown(exp: Experiment, rows: list[Row], meta: dict) -> str:
  cols = [c for c in COLUMNS[exp.kind] if any(r.get(c[1]) is not None for r in rows)]
  out = [header(exp, meta), "| " + " | ".join(c[0] for c in cols) + " |",
         "|" + "---|" * len(cols)]
  for r in rows:
    out.append("| " + " | ".join(_fmt(r.get(key), spec) for _, key, spec in cols) + " |")
  return "\n".join(out) + "\n"


def default_plots(kind: str) -> tuple[Plot, ...]:
  return {"eval": (Plot("perplexity", "bits_per_weight", "quantizer", logy=True),
                   Plot("mean_kl", "bits_per_weight", "quantizer", logy=True)),
          "distortion": (Plot("d_mse", "bits", "rotation", logy=True, bounds=True),),
          "finetune": (Plot("loss_last"),)}[kind]


LABELS = {"perplexity": "perplexity", "mean_kl": "mean KL(reference ‖ model) per token",
          "top1_agreement": "top-1 agreement with the reference",
          "bits_per_weight": "bits per weight (quantized tensors, scales included)",
          "kv_bits_per_channel": "KV cache bits per channel (norms included)",
          "d_mse": "D_mse = E‖x − x̃‖²", "bits": "bits per coordinate b",
          "loss_last": "final training loss", "loss_first": "first training loss"}


def plot(exp: Experiment, spec: Plot, rows: list[Row], meta: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  rows = [r for r in rows
          if r.get(spec.y) is not None and (spec.x is None or r.get(spec.x) is not None)]
  if spec.x is None:
    labels = [r["label"] for r in rows]
    ax.bar(labels, [r[spec.y] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
      ax.annotate(f"{r[spec.y]:.4g}", (i, r[spec.y]), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=30 if len(labels) > 4 else 0)
  else:
    groups: dict[str, list[Row]] = {}
    for r in rows:
      groups.setdefault(str(r.get(spec.group)) if spec.group else exp.name, []).append(r)
    for n, (name, series) in enumerate(groups.items()):
      series = sorted(series, key=lambda r: r[spec.x])
      xs, ys = [r[spec.x] for r in series], [r[spec.y] for r in series]
      ax.plot(xs, ys, marker="osD^v<>"[n % 7], linestyle=("-", "--", "-.", ":")[n % 4],
              markersize=max(3, 8 - 1.5 * n), label=name, alpha=0.85)
      for r, x, y in zip(series, xs, ys, strict=True):
        if spec.annotate:
          ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4),
                      fontsize=7)
    if all(isinstance(r[spec.x], int) for r in rows):
      ax.xaxis.get_major_locator().set_params(integer=True)
    if spec.bounds:
      bits = sorted({r[spec.x] for r in rows})
      b = [bits[0] + (bits[-1] - bits[0]) * i / 100 for i in range(101)]
      ax.plot(b, [paper_bounds(v)[1] for v in b], "k--", label="upper bound √3·π/2·4^-b")
      ax.plot(b, [paper_bounds(v)[0] for v in b], "k:", label="lower bound 4^-b")
    ax.set_xlabel(LABELS.get(spec.x, spec.x))
    ax.grid(True, which="both", alpha=0.3)
  ref = rows[0].get("reference_perplexity") if spec.y == "perplexity" and rows else None
  if ref is not None:
    ax.axhline(ref, color="gray", linestyle=":", label=f"reference ({ref:.2f})")
  if spec.x is not None or ref is not None:
    ax.legend(fontsize=8)
  if spec.logy:
    ax.set_yscale("log")
  ax.set_ylabel(LABELS.get(spec.y, spec.y))
  sub = (f"{meta['model']}, {meta['tokens']:,} tokens, context {meta['context']}"
         if exp.kind == "eval" else exp.description)
  title = spec.title or f"{exp.name}: {spec.y}" + (f" vs {spec.x}" if spec.x else "")
  ax.set_title(f"{title}\n{sub}", fontsize=9)
  fig.tight_layout()
  with atomic_file(path, "wb") as f:  # a killed run never leaves half a PNG
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def _literal(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def configure(exp: Experiment, args) -> Experiment:
  """The experiment with the command line's overrides applied."""
  changes = {k: v for k, v in (("checkpoint", args.checkpoint), ("text", args.text),
                               ("max_tokens", args.max_tokens), ("context", args.context))
             if v is not None}
  if args.set:
    fields = {}
    for item in args.set:
      name, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
      fields[name] = _literal(value)
    try:
      changes["base"] = dataclasses.replace(exp.base, **fields)
    except TypeError as e:
      raise ValueError(f"--set: {e}") from None
  if args.only:
    known = {p.label: p for p in exp.points}
    unknown = [label for label in args.only if label not in known]
    if unknown:
      raise ValueError(f"--only: unknown points {unknown}; valid: {', '.join(known)}")
    changes["points"] = tuple(known[label] for label in args.only)
  return dataclasses.replace(exp, **changes)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="an experiment file, configs/ablations/NAME.py")
  ap.add_argument("--out", required=True, help="directory for results.jsonl, results.md, PNGs")
  ap.add_argument("--max-tokens", type=int, default=None, help="eval: tokens scored (0: all)")
  ap.add_argument("--context", type=int, default=None, help="eval: window length in tokens")
  ap.add_argument("--checkpoint", default=None, help="eval: default the real Gemma 3 270M")
  ap.add_argument("--text", default=None, help="eval: the text scored")
  ap.add_argument("--only", nargs="+", default=None, metavar="LABEL", help="run these points")
  ap.add_argument("--set", nargs="+", default=None, metavar="FIELD=VALUE",
                  help="replace fields of the experiment's base setting")
  ap.add_argument("--fresh", action="store_true", help="empty results.jsonl first")
  args = ap.parse_args(argv)
  try:
    exp = configure(load_config(args.config), args)
  except ValueError as e:
    ap.error(str(e))
  try:  # appended to, never replaced: only a file in the way is refused
    out = check_target(args.out, force=True, kind="results directory")
  except ValueError as e:
    ap.error(str(e))
  out.mkdir(parents=True, exist_ok=True)
  jsonl = out / "results.jsonl"
  if args.fresh and jsonl.exists():
    jsonl.unlink()
  argv_text = " ".join(sys.argv[1:] if argv is None else argv)
  meta = dict(experiment=exp.name, kind=exp.kind, date=time.strftime("%Y-%m-%d"),
              machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
              jax=jax.__version__, command=f"python scripts/ablate.py {argv_text}")
  rows: list[Row] = []
  t_start = time.perf_counter()

  def emit(row: Row) -> None:
    point = row.pop("_point")
    row = dict(experiment=exp.name, kind=exp.kind, label=point.label,
               deltas=dict(point.deltas), setting=_jsonable(exp.resolve(point)), **row,
               date=meta["date"])
    rows.append(row)
    with jsonl.open("a", encoding="utf-8") as f:  # one write per row, flushed to disk
      f.write(json.dumps(row, default=str) + "\n")
      f.flush()
      os.fsync(f.fileno())

  log(f"experiment {exp.name} ({exp.kind}): {len(exp.points)} points -> {out}")
  if exp.kind == "eval":
    run_eval(exp, emit, meta)
    meta["reference_perplexity"] = rows[0]["reference_perplexity"]
  elif exp.kind == "distortion":
    run_distortion(exp, emit, meta)
  else:
    run_finetune(exp, emit, meta)
  meta["seconds"] = time.perf_counter() - t_start
  table = markdown(exp, rows, meta)
  with atomic_file(out / "results.md") as f:
    f.write(table)
  pngs = []
  for spec in exp.plots or default_plots(exp.kind):
    plot(exp, spec, rows, meta, out / spec.filename)
    pngs.append(spec.filename)
  print(table)
  log(f"wrote {jsonl}, {out / 'results.md'} and {', '.join(pngs)} in {meta['seconds']:.0f} s")
  return 0


def _jsonable(obj):
  """A resolved setting as JSON-ready data (dataclasses as dicts, tuples as lists)."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(x) for x in obj]
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  if isinstance(obj, str) and obj.startswith(str(ROOT) + os.sep):  # repo files: relative paths
    return os.path.relpath(obj, ROOT)
  return obj if isinstance(obj, (int, float, str, bool)) or obj is None else str(obj)


if __name__ == "__main__":
  sys.exit(main())

"""Issue 24 item 2 against the reference: PEFT applies our exported LoRA adapter to the HF base
and reproduces the logits of our `merge-lora`d model.

Two steps, one per venv (the reference venv has torch + transformers + peft, no jax):

  # 1. ours (.venv): a LoRA run on BASE (any checkpoint we load; non-zero random B on every
  #    target, or --run an existing `finetune --out` directory on it), the base exported as an
  #    HF directory (`export_hf`, float32: WORK/base_hf), the adapter exported for PEFT
  #    (`export_peft`: WORK/peft), `merge-lora`, and the merged model's logits (and the adapter
  #    path's, LoraWeight through forward) on the fixture's prompt (WORK/ours.npz)
  .venv/bin/python scripts/check_peft_reference.py ours --base tests/fixtures/e_style \
      --work /tmp/peft_e_style
  # 2. the reference (.venv-ref): AutoModelForCausalLM.from_pretrained(WORK/base_hf, or --base)
  #    + PeftModel.from_pretrained(model, WORK/peft), float32, eager attention, same prompt
  .venv-ref/bin/python scripts/check_peft_reference.py reference --work /tmp/peft_e_style

`reference` prints one JSON line: max|peft - merged| / max|merged| (must be <= 1e-4), the same
against the base without the adapter (how much the adapter moves the logits), and the PEFT model's
own merge_and_unload() logits against ours. Exit status 1 when the check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
RANK, ALPHA = 4, 8.0


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _prompt(base: Path) -> np.ndarray:
  ref = base / "reference.npz"
  if ref.exists():
    return np.asarray(np.load(ref)["prompt_ids"], np.int32)
  return np.asarray([2, 17, 5, 9, 33, 101, 7, 260, 45, 12, 64, 3], np.int32)


# ------------------------------------------------------------------------------ ours (.venv)
def _synthetic_run(run_dir: Path, base: Path, seed: int) -> None:
  """A LoRA run directory as `finetune --out` leaves it, with A as `init_adapters` makes it
  and B ~ N(0, 0.05²) (non-zero: an untrained run's B = 0 would check nothing)."""
  import jax
  import jax.numpy as jnp

  from gemma.io.checkpoint import load
  from gemma.training import FinetuneConfig, lora
  from gemma.training.loop import checkpoint_manager, optimizer, save

  cfg = FinetuneConfig(checkpoint=str(base), mode="lora", lora_rank=RANK, lora_alpha=ALPHA)
  _, params = load(base, jnp.float32)
  ka, kb = jax.random.split(jax.random.key(seed))
  adapters = lora.init_adapters(ka, params, RANK, cfg.lora_targets)
  keys = jax.random.split(kb, len(adapters))
  adapters = {n: lora.LoraPair(p.a, 0.05 * jax.random.normal(k, p.b.shape, jnp.float32))
              for (n, p), k in zip(sorted(adapters.items()), keys, strict=True)}
  state = dict(step=jnp.asarray(1, jnp.int32), trainable=adapters,
               opt_state=optimizer(cfg).init(adapters))
  save(checkpoint_manager(run_dir, cfg), state,
       dict(config=cfg.to_dict(), losses=[0.0], data_position=cfg.batch_size))


def ours(args) -> int:
  import os
  import types

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(ROOT))
  import jax
  import jax.numpy as jnp

  jax.config.update("jax_default_matmul_precision", "highest")
  from gemma.cli.train import cmd_merge_lora
  from gemma.io.checkpoint import load
  from gemma.io.formats.hf_export import export_hf
  from gemma.model.transformer import forward
  from gemma.training import load_trained, lora
  from gemma.training.peft_export import export_peft

  work = Path(args.work).absolute()
  work.mkdir(parents=True, exist_ok=True)
  run_dir = Path(args.run).absolute() if args.run else work / "run"
  if not args.run:
    _synthetic_run(run_dir, Path(args.base).absolute(), args.seed)
  cfg, base = load(Path(args.base), jnp.float32)
  _, notes = export_hf(base, cfg, work / "base_hf", dtype="float32", force=True)
  _, more = export_peft(run_dir, work / "peft", force=True, base_model=str(work / "base_hf"))
  for n in notes + more:
    print(n, file=sys.stderr)
  # `gemma4 merge-lora --adapters RUN --out WORK/merged --dtype float32 --checkpoint BASE`
  cmd_merge_lora(types.SimpleNamespace(adapters=str(run_dir), out=str(work / "merged"),
                                       dtype="float32", checkpoint=str(args.base), force=True))
  tokens = jnp.asarray(_prompt(Path(args.base)))[None]
  pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  _, merged = load(work / "merged", jnp.float32)
  logits, _ = forward(merged, tokens, pos, cfg)
  adapters, run_cfg, _ = load_trained(run_dir)
  adapted, _ = forward(lora.with_adapters(base, adapters, run_cfg.lora_scale), tokens, pos, cfg)
  np.savez(work / "ours.npz", tokens=np.asarray(tokens[0]), merged=np.asarray(logits[0]),
           adapter_path=np.asarray(adapted[0]))
  print(json.dumps(dict(work=str(work), adapted_weights=len(adapters), rank=run_cfg.lora_rank,
                        alpha=run_cfg.lora_alpha,
                        merged_vs_adapter_path=_rel(logits[0], adapted[0]))))
  return 0


# ------------------------------------------------------------------ reference (.venv-ref)
def reference(args) -> int:
  import peft
  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  torch.manual_seed(0)
  work = Path(args.work).absolute()
  saved = np.load(work / "ours.npz")
  tokens = torch.as_tensor(saved["tokens"], dtype=torch.long)[None]

  def logits_of(model):
    with torch.no_grad():
      return model(input_ids=tokens).logits[0].double().numpy()

  base = Path(args.base).absolute() if args.base else work / "base_hf"

  def base_model():
    return AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="eager").eval()

  plain = logits_of(base_model())
  model = peft.PeftModel.from_pretrained(base_model(), str(work / "peft")).eval()
  arch = type(model.get_base_model()).__name__
  lora_modules = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
  with_adapter = logits_of(model)
  merged_by_peft = logits_of(model.merge_and_unload())
  ours = saved["merged"]
  result = dict(
      base=str(base), model=arch, tokens=int(tokens.shape[1]),
      lora_modules=lora_modules, adapter_tensors=len(_adapter_keys(work / "peft")),
      peft_vs_merged=_rel(with_adapter, ours),
      peft_merge_and_unload_vs_merged=_rel(merged_by_peft, ours),
      peft_vs_adapter_path=_rel(with_adapter, saved["adapter_path"]),
      base_vs_merged=_rel(plain, ours),
      argmax_equal=bool(np.array_equal(with_adapter.argmax(-1), ours.argmax(-1))),
      peft=peft.__version__, transformers=transformers.__version__, torch=torch.__version__)
  result["ok"] = (result["peft_vs_merged"] <= TOLERANCE and result["base_vs_merged"] > 1e-3
                  and lora_modules * 2 == result["adapter_tensors"])
  print(json.dumps(result))
  return 0 if result["ok"] else 1


def _adapter_keys(peft_dir: Path) -> list[str]:
  from safetensors import safe_open

  with safe_open(str(peft_dir / "adapter_model.safetensors"), "np") as f:
    return list(f.keys())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="step", required=True)
  o = sub.add_parser("ours", help="(.venv) run, PEFT export, merge-lora, our logits")
  o.add_argument("--base", required=True, help="an HF directory (e.g. tests/fixtures/e_style)")
  o.add_argument("--work", required=True, help="folder for the run, exports and logits")
  o.add_argument("--run", help="an existing LoRA run on --base (default: a synthetic one)")
  o.add_argument("--seed", type=int, default=0)
  r = sub.add_parser("reference", help="(.venv-ref) PEFT on the HF base vs our logits")
  r.add_argument("--base", help="the HF base (default: WORK/base_hf, our export of it)")
  r.add_argument("--work", required=True)
  args = p.parse_args(argv)
  return ours(args) if args.step == "ours" else reference(args)


if __name__ == "__main__":
  sys.exit(main())

"""PEFT adapter export (issue 24 item 2): base + (lora_alpha/r)·lora_B @ lora_A, read back from
the exported files as PEFT would apply them, equals the weights `merge-lora` writes, for every
LoRA target kind (q, k, v, o, gate, up, down) on the four HF fixture families; errors for runs
PEFT cannot express."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma.cli.train import cmd_merge_lora
from gemma.io.atomic import OutputError, OutputExists
from gemma.io.checkpoint import load
from gemma.io.formats import hf
from gemma.io.formats.inverse import named_arrays, source_tensors
from gemma.training import FinetuneConfig, lora
from gemma.training.loop import checkpoint_manager, optimizer, save
from gemma.training.peft_export import CONFIG_FILE, WEIGHTS_FILE, export_peft, module_name

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SHORT = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def write_run(run_dir, cfg: FinetuneConfig, trainable, steps: int = 3) -> None:
  """A run directory as `finetune --out` leaves it (Orbax train state + JSON meta), without
  training: the test chooses the adapters."""
  state = dict(step=jnp.asarray(steps, jnp.int32), trainable=trainable,
               opt_state=optimizer(cfg).init(trainable))
  meta = dict(config=cfg.to_dict(), losses=[1.0] * steps, data_position=steps * cfg.batch_size)
  save(checkpoint_manager(run_dir, cfg), state, meta)


def lora_run(run_dir, base: str, rank: int = 4, alpha: float = 8.0, seed: int = 0, **kw):
  """A LoRA run on `base` with non-zero random B on every target (A as `init_adapters` makes
  it): returns (config, adapters)."""
  cfg = FinetuneConfig(checkpoint=base, mode="lora", lora_rank=rank, lora_alpha=alpha, **kw)
  _, params = load(base, jnp.float32)
  ka, kb = jax.random.split(jax.random.key(seed))
  adapters = lora.init_adapters(ka, params, rank, cfg.lora_targets)
  keys = jax.random.split(kb, len(adapters))
  adapters = {name: lora.LoraPair(p.a, 0.05 * jax.random.normal(k, p.b.shape, jnp.float32))
              for (name, p), k in zip(sorted(adapters.items()), keys, strict=True)}
  write_run(run_dir, cfg, adapters)
  return cfg, adapters


def hf_layout(path) -> dict[str, np.ndarray]:
  """{HF tensor name without "model.": array} of any checkpoint we load, as the HF loader's
  table stores it (nn.Linear [out, in])."""
  cfg, params = load(path, jnp.float32)
  return dict(source_tensors(hf.TABLE, named_arrays(params, cfg)[0]))


@pytest.mark.parametrize("family", ["e_style", "dense_keqv", "moe", "gemma3"])
def test_peft_update_reproduces_merge_lora(family, tmp_path, capsys):
  base = os.path.join(FIXTURES, family)
  run_cfg, adapters = lora_run(tmp_path / "run", base, rank=4, alpha=8.0)
  out, notes = export_peft(tmp_path / "run", tmp_path / "peft")
  assert out == (tmp_path / "peft").absolute() and any("rank 4" in n for n in notes)
  assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE]

  config = json.loads((out / CONFIG_FILE).read_text())
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == SHORT
  assert config["lora_dropout"] == 0 and config["bias"] == "none"
  assert not config["fan_in_fan_out"] and not config["use_rslora"]
  assert config["base_model_name_or_path"] == os.path.abspath(base)
  scale = config["lora_alpha"] / config["r"]
  assert scale == run_cfg.lora_scale

  tensors = load_file(str(out / WEIGHTS_FILE))
  assert len(tensors) == 2 * len(adapters)
  assert all(t.dtype == np.float32 for t in tensors.values())

  # `gemma4 merge-lora --adapters RUN --out MERGED --dtype float32`
  assert cmd_merge_lora(types.SimpleNamespace(
      adapters=str(tmp_path / "run"), out=str(tmp_path / "merged"), dtype="float32",
      checkpoint=None, force=False)) == 0
  capsys.readouterr()
  merged, original = hf_layout(tmp_path / "merged"), hf_layout(base)
  assert merged.keys() == original.keys()
  kinds = set()
  prefix = "base_model.model.model."
  for name, w in original.items():
    module = prefix + name.removesuffix(".weight")
    a_name, b_name = module + ".lora_A.weight", module + ".lora_B.weight"
    if a_name not in tensors:  # not adapted: merge-lora leaves it bit-identical
      np.testing.assert_array_equal(merged[name], w, err_msg=name)
      continue
    a, b = tensors.pop(a_name), tensors.pop(b_name)
    assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4), name
    delta = scale * (b.astype(np.float64) @ a.astype(np.float64))  # PEFT: W + s·B A
    assert np.max(np.abs(delta)) > 1e-3, name  # B is not zero: the check means something
    np.testing.assert_allclose(merged[name], w + delta, rtol=1e-5, atol=1e-6, err_msg=name)
    kinds.add(name.rsplit(".", 2)[-2])
  assert sorted(kinds) == SHORT
  assert not tensors  # every exported tensor is a module of the base


def test_export_refuses_what_peft_cannot_hold(tmp_path):
  base = os.path.join(FIXTURES, "e_style")
  lora_run(tmp_path / "run", base, lora_targets=("q", "o"))
  out, _ = export_peft(tmp_path / "run", tmp_path / "peft")
  config = json.loads((out / CONFIG_FILE).read_text())
  assert config["target_modules"] == ["o_proj", "q_proj"]
  with pytest.raises(OutputExists, match="--force"):
    export_peft(tmp_path / "run", tmp_path / "peft")
  before = (out / WEIGHTS_FILE).read_bytes()
  export_peft(tmp_path / "run", tmp_path / "peft", force=True)  # replaced atomically
  assert (out / WEIGHTS_FILE).read_bytes() == before
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(OutputError, match="not a PEFT adapter"):
    export_peft(tmp_path / "run", tmp_path / "other", force=True)
  assert (tmp_path / "other" / "notes.txt").read_text() == "mine"

  # a full fine-tune has no adapters
  cfg = FinetuneConfig(checkpoint=base, mode="full")
  _, params = load(base, jnp.float32)
  write_run(tmp_path / "full", cfg, params, steps=1)
  with pytest.raises(ValueError, match="full fine-tune"):
    export_peft(tmp_path / "full", tmp_path / "peft-full")
  assert not (tmp_path / "peft-full").exists()
  with pytest.raises(FileNotFoundError):
    export_peft(tmp_path / "nothing", tmp_path / "peft-none")

  # weights the HF layout does not hold as an nn.Linear of their own
  assert module_name("layers.3.attn.o") == "model.layers.3.self_attn.o_proj"
  assert module_name("layers.0.mlp.down") == "model.layers.0.mlp.down_proj"
  for param in ("layers.0.moe.gate", "layers.0.moe.down", "embed", "layers.0.attn.q_norm"):
    with pytest.raises(ValueError, match="PEFT cannot name"):
      module_name(param)

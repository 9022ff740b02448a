"""Fine-tuning: the tiny config overfits, resume is bit-exact, LoRA merge == adapter path, QLoRA,
gradient accumulation, chat masking, config errors."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.cli.app import main as cli_main
from gemma.inference import chat
from gemma.io.checkpoint import load, load_tokenizer
from gemma.model.config import pattern
from gemma.model.transformer import forward
from gemma.quant.qarray import QArray
from gemma.training import FinetuneConfig, fit, load_trained, lora, train
from gemma.training import data as data_lib
from gemma.training.loop import accumulated_grads, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = os.path.join(ROOT, "configs", "finetune_tiny.py")


def _tiny(**kw) -> FinetuneConfig:
  from configs.finetune_tiny import get_config

  return dataclasses.replace(get_config(), **kw)


def _small(**kw) -> FinetuneConfig:
  """The tiny config with 4 layers (still sliding + global, PLE, one KV-shared layer): quick to
  compile for tests that train several times."""
  from configs.finetune_tiny import MODEL

  model = dict(MODEL) | dict(num_layers=4, layer_types=pattern(4, 2), num_kv_shared_layers=1)
  return _tiny(**(dict(model=tuple(model.items()), seq_len=32, batch_size=2) | kw))


def _last_json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_config_overfits_via_cli(capsys):
  assert cli_main(["finetune", "--config", TINY, "--quiet"]) == 0
  out = _last_json(capsys)
  assert out["steps"] == 60 and len(out["losses"]) == 60
  assert out["loss_last"] < 0.5 * out["loss_first"], out


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
  cfg = _small(mode="lora", steps=6, warmup_steps=2, grad_accum=2, lora_rank=4, save_every=2,
               lr=1e-2)
  whole, state_a, _ = fit(dataclasses.replace(cfg, out=str(tmp_path / "a")), False)
  first = train(dataclasses.replace(cfg, out=str(tmp_path / "b")), False, stop_after=3)
  assert first["steps"] == 3
  rest, state_b, _ = fit(dataclasses.replace(cfg, out=str(tmp_path / "b")), False)
  assert rest["resumed_from"] == 3
  assert rest["losses"] == whole["losses"]  # bit-exact trajectory
  for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="lora_rank"):
    train(dataclasses.replace(cfg, out=str(tmp_path / "b"), lora_rank=2), False)


def _chat_data(path, tokenizer_vocab=512):
  rows = [{"prompt": "What is two plus two?", "response": "Four."},
          {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Name a colour."},
                        {"role": "model", "content": "Blue."},
                        {"role": "user", "content": "Another one?"},
                        {"role": "model", "content": "Green."}]},
          {"text": "Plain text is trained on every token."}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


@pytest.mark.slow
def test_merge_lora_equals_adapter_path(e_style_ckpt, tmp_path, capsys):
  data = _chat_data(tmp_path / "d.jsonl")
  run_dir = tmp_path / "run"
  assert cli_main(["finetune", "--checkpoint", str(e_style_ckpt), "--data", data, "--steps", "4",
                   "--warmup-steps", "1", "--lr", "0.01", "--seq-len", "48", "--batch-size", "2",
                   "--lora-rank", "4", "--lora-targets", "q,v,o,down", "--out", str(run_dir),
                   "--quiet"]) == 0
  assert _last_json(capsys)["steps"] == 4
  adapters, run_cfg, _ = load_trained(run_dir)
  assert sorted({k.rsplit(".", 1)[-1] for k in adapters}) == ["down", "o", "q", "v"]
  assert any(float(jnp.max(jnp.abs(p.b))) > 0 for p in adapters.values())  # it trained
  merged_dir = tmp_path / "merged"
  assert cli_main(["merge-lora", "--adapters", str(run_dir), "--out", str(merged_dir),
                   "--dtype", "float32"]) == 0
  cfg, base = load(e_style_ckpt, jnp.float32)
  _, merged = load(merged_dir, jnp.float32)
  tokens = jnp.asarray([[2, 17, 5, 9, 33, 101, 7, 260, 45, 12]], jnp.int32)
  pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  with_lora, _ = forward(lora.with_adapters(base, adapters, run_cfg.lora_scale), tokens, pos, cfg)
  plain, _ = forward(merged, tokens, pos, cfg)
  untouched, _ = forward(base, tokens, pos, cfg)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(with_lora), rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(with_lora - untouched))) > 1e-3  # the adapters matter


@pytest.mark.slow
def test_qlora_trains_through_quantized_base(tmp_path):
  # every step sees the same 3 examples, so the loss measures learning, not batch luck
  cfg = _small(mode="lora", quant="tq4", steps=8, warmup_steps=1, lr=2e-2, lora_rank=4,
               data=_chat_data(tmp_path / "d.jsonl"), batch_size=3)
  summary, state, run = fit(cfg, False)
  assert isinstance(run.frozen.layers[0].attn.q, QArray)
  assert summary["loss_last"] < summary["loss_first"]
  assert all(isinstance(p, lora.LoraPair) for p in state["trainable"].values())


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
  cfg = _small(mode="lora", lora_rank=4)
  run = build(cfg, log=lambda m: None)
  # B adapters start at zero (no gradient into A): take a point where both get gradients
  trainable = {k: lora.LoraPair(p.a, 0.01 * jnp.ones_like(p.b))
               for k, p in run.initial.items()}
  big = data_lib.step_batch(run.examples, 0, 0, 4, 1, 32)
  small = data_lib.step_batch(run.examples, 0, 0, 2, 2, 32)
  assert np.array_equal(big["tokens"].reshape(4, 32), small["tokens"].reshape(4, 32))
  grad = jax.jit(accumulated_grads, static_argnums=(3, 4))
  args = (run.model_cfg, cfg.lora_scale)
  g1, l1 = grad(trainable, run.frozen, {k: jnp.asarray(v) for k, v in big.items()}, *args)
  g2, l2 = grad(trainable, run.frozen, {k: jnp.asarray(v) for k, v in small.items()}, *args)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  # Exact: the accumulated gradient is the token-weighted mean of the micro-batches' own.
  parts = [{k: jnp.asarray(v[i:i + 1]) for k, v in small.items()} for i in range(2)]
  (ga, la), (gb, lb) = (grad(trainable, run.frozen, p, *args) for p in parts)
  na, nb = (float(np.sum(small["weights"][i])) for i in range(2))
  for x, a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray((a * na + b * nb) / (na + nb)),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(l2), (float(la) * na + float(lb) * nb) / (na + nb), rtol=1e-6)
  # One batch of 4 vs 2 x 2: the same sums in another float32 order, so norm-wise agreement.
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    assert float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x)) < 1e-4


def test_chat_examples_mask_everything_but_model_turns(e_style_ckpt):
  tok = load_tokenizer(e_style_ckpt)
  msgs = [chat.Message("system", "Be brief."), chat.Message("user", "Hi"),
          chat.Message("model", "Hello there."), chat.Message("user", "Bye"),
          chat.Message("model", "Goodbye.")]
  ids, mask = data_lib.encode_chat(tok, msgs)
  end = tok.piece_to_id("<turn|>")
  trained = [i for i, m in zip(ids, mask, strict=True) if m]
  # the model turns' content, each followed by its end-of-turn marker
  hello, bye = tok.encode("Hello there.", add_bos=False), tok.encode("Goodbye.", add_bos=False)
  assert trained == [*hello, end, *bye, end]
  # the prompt part equals what chat inference feeds the model before the first answer
  prompt = chat.chat_prompt(tok, msgs[:2])
  assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])


def test_batches_are_a_function_of_seed_and_step():
  examples = [([2, 5 + i, 6], [0, 1, 1]) for i in range(5)]
  a = data_lib.step_batch(examples, 0, 3, 2, 2, 4)
  b = data_lib.step_batch(examples, 0, 3, 2, 2, 4)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  seen = data_lib.example_order(5, 0, 0, 10)
  assert sorted(seen[:5]) == sorted(seen[5:]) == list(range(5))  # whole epochs
  assert a["tokens"].shape == (2, 2, 4) and a["positions"][0, 0, 2] == -1


@pytest.mark.parametrize("kw, match", [
    (dict(mode="qlora"), "mode"), (dict(lora_targets=("q", "ffn")), "ffn"),
    (dict(steps=0), "steps"), (dict(warmup_steps=60), "warmup_steps"),
    (dict(preset="gemma9"), "gemma9"), (dict(mode="full", quant="tq4"), "float weights"),
    (dict(lr=0.0), "lr")])
def test_bad_config_is_named(kw, match):
  with pytest.raises(ValueError, match=match):
    _tiny(**kw)


def test_bad_data_is_named(tmp_path, e_style_ckpt):
  tok = load_tokenizer(e_style_ckpt)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x", "response": "y"}\n{"question": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    data_lib.load_examples(bad, tok)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    data_lib.load_examples(tmp_path / "nope.jsonl", tok)


def test_bad_config_file_is_named(tmp_path, capsys):
  assert cli_main(["finetune", "--config", str(tmp_path / "nope.py")]) == 2
  assert "nope.py does not exist" in capsys.readouterr().err
  wrong = tmp_path / "wrong.py"
  wrong.write_text("def get_config():\n  return 3\n")
  assert cli_main(["finetune", "--config", str(wrong)]) == 2
  assert "returned int, not a FinetuneConfig" in capsys.readouterr().err

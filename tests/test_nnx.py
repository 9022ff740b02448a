"""gemma.nnx: the Flax NNX module over the functional core.

Logits equal `forward`'s on the parity fixtures, params round-trip, variables carry the logical
axes, quantized weights stay frozen, an `nnx.Optimizer` LoRA step equals the functional
fine-tuning step, and `nnx.state` survives an Orbax save / restore.
"""

import functools
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import gemma
from gemma import nnx as gnnx
from gemma.model import params as P
from gemma.model.config import AttentionType
from gemma.model.transformer import forward
from gemma.parallel import sharding
from gemma.quant.qarray import QArray
from gemma.quant.recipes import quantizer
from gemma.training import FinetuneConfig, loop, lora
from tests.conftest import FAMILIES, fixture_dir, tiny

SIZES = {"data": 2, "model": 4}


def _cfg():
  """3 layers: sliding, global, and a sliding layer sharing layer 0's KV; PLE."""
  return tiny("gemma4-e2b", num_layers=3, num_kv_shared_layers=1,
              layer_types=(AttentionType.LOCAL, AttentionType.GLOBAL, AttentionType.LOCAL))


@functools.cache
def _params(seed: int = 0) -> P.Params:
  """Random params of `_cfg()` (one jitted init: per-leaf eager init compiles for seconds)."""
  return jax.jit(P.init, static_argnums=1)(jax.random.key(seed), _cfg())


def _inputs(cfg, b=2, t=7, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)
  return tokens, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _batch(cfg, b=2, t=8):
  """One micro-batch [B, T] as the data pipeline makes it (last column and row 1's tail masked)."""
  tokens, positions = _inputs(cfg, b, t + 1, seed=3)
  weights = np.ones((b, t), np.float32)
  weights[1, 5:] = 0.0
  return dict(tokens=tokens[:, :-1], positions=positions[:, :-1], targets=tokens[:, 1:],
              weights=jnp.asarray(weights))


def _random_b(adapters, seed=5):
  """Adapters with B != 0 (fresh ones leave the model unchanged)."""
  keys = iter(jax.random.split(jax.random.key(seed), len(adapters)))
  return {n: lora.LoraPair(a=p.a, b=0.1 * jax.random.normal(next(keys), p.b.shape))
          for n, p in adapters.items()}


def _nnx_specs(state) -> dict:
  """{leaf name: PartitionSpec (a QArray of them for a quantized weight)} of a specs state."""
  return {".".join(map(str, path[1:])): var.get_value() for path, var in nnx.to_flat_state(state)}


def _functional_specs(params) -> dict:
  specs = sharding.param_specs(params, SIZES)
  flat = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, QArray | PartitionSpec))[0]
  return {P.path_name(path): spec for path, spec in flat}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_the_functional_model_on_parity_fixtures(name):
  ref = np.load(f"{fixture_dir(name)}/reference.npz")
  model = gemma.load(fixture_dir(name), dtype="float32")
  cfg, params = model.cfg, model.params
  module = gnnx.from_model(model)
  tokens = jnp.asarray(ref["prompt_ids"], jnp.int32)[None]
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  ours, _ = module(tokens)
  theirs, _ = forward(params, tokens, positions, cfg)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  err = np.abs(np.asarray(ours[0]) - ref["logits"]).max() / np.abs(ref["logits"]).max()
  assert err <= 1e-4, err


@pytest.mark.slow
def test_params_round_trip_and_variables_carry_logical_axes():
  cfg = _cfg()
  params = _params()

  class Loaded:  # what gemma.Model offers: .cfg and .params
    pass

  model = Loaded()
  model.cfg, model.params = cfg, params
  module = gnnx.from_model(model)
  back = gnnx.to_params(module)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True))
  doubled = jax.tree.map(lambda x: 2 * x, params)
  again = gnnx.from_params(params, cfg).load_params(doubled).to_params()
  assert jax.tree.structure(again) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(doubled), strict=True))

  flat = nnx.to_flat_state(nnx.state(module))
  assert len(flat) == len(jax.tree.leaves(params))
  for path, var in flat:
    assert type(var) is nnx.Param and path[0] == "params"
    name = ".".join(map(str, path[1:]))
    assert var.get_metadata("out_sharding") == sharding.logical_axes(name, var.ndim), name
  assert module.params.layers[0].attn.q.get_metadata("out_sharding") == (
      "embed", "heads", "head_dim")
  # Flax's own tooling reads the metadata: logical names, mapped by Flax rules when given
  logical = nnx.get_partition_spec(nnx.state(module))
  assert logical["params"]["embed"].get_value() == PartitionSpec("vocab", "embed")
  with nnx.logical_axis_rules((("vocab", "model"), ("embed", "data"))):
    mapped = nnx.get_partition_spec(nnx.state(module))
  assert mapped["params"]["embed"].get_value() == PartitionSpec("model", "data")
  # our shape-aware rules on the same metadata == the functional placement, leaf for leaf
  assert _nnx_specs(gnnx.partition_specs(module, SIZES)) == _functional_specs(params)


def _partly_quantized(params):
  """params with layer 0's attention q and layer 1's mlp.down as tq4 QArrays (quick to make)."""
  quant = quantizer("tq4")

  def one(path, leaf):
    name = P.path_name(path)
    return quant(name, leaf) if name in ("layers.0.attn.q", "layers.1.mlp.down") else leaf

  return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.slow
def test_quantized_weights_are_frozen_variables():
  """QLoRA: QArray leaves are `Quantized` (not Param): logits equal forward's, gradients and an
  optimizer over LoRAParam leave them alone, and the placement is `qarray_spec`'s."""
  cfg = _cfg()
  qparams = _partly_quantized(_params())
  module = gnnx.from_params(qparams, cfg)
  assert isinstance(module.params.layers[0].attn.q, gnnx.Quantized)
  assert isinstance(module.params.layers[0].attn.q.get_value(), QArray)
  assert all(not isinstance(v, gnnx.Quantized)
             for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
  tokens, positions = _inputs(cfg)
  np.testing.assert_array_equal(np.asarray(module(tokens)[0]),
                                np.asarray(forward(qparams, tokens, positions, cfg)[0]))
  specs = _nnx_specs(gnnx.partition_specs(module, SIZES))
  assert specs == _functional_specs(qparams)
  assert isinstance(specs["layers.0.attn.q"], QArray)

  module.add_lora(2, 4.0, ("q", "down"), key=jax.random.key(1))
  frozen = jax.tree.leaves(nnx.state(module, gnnx.Quantized))
  opt = nnx.Optimizer(module, optax.adamw(1e-2), wrt=nnx.LoRAParam)
  batch = _batch(cfg)

  def loss(m):
    nll, n = loop.loss_sums(m.adapters(), m.to_params(), batch, cfg, m.lora_scale)
    return nll / n

  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(module)
  assert {type(v) for _, v in nnx.to_flat_state(grads)} == {nnx.LoRAParam}
  before = module.adapters()
  opt.update(module, grads)
  after = jax.tree.leaves(nnx.state(module, gnnx.Quantized))
  assert all(np.array_equal(a, b) for a, b in zip(frozen, after, strict=True))
  assert any(not np.array_equal(x.b, before[n].b) for n, x in module.adapters().items())


def test_add_lora_is_init_adapters_and_the_forward_is_the_adapter_path():
  cfg = _cfg()
  params = _params()
  key = jax.random.key(7)
  module = gnnx.from_params(params, cfg).add_lora(4, 8.0, ("q", "o", "up"), key=key)
  want = lora.init_adapters(key, params, 4, ("q", "o", "up"))
  got = module.adapters()
  assert set(got) == set(want) and module.lora_scale == 2.0
  for n in want:
    np.testing.assert_array_equal(got[n].a, want[n].a)
    np.testing.assert_array_equal(got[n].b, want[n].b)
  assert type(module.lora["layers.0.attn.q"].a) is nnx.LoRAParam

  adapters = _random_b(want)
  module = gnnx.from_params(params, cfg, adapters=adapters, lora_scale=2.0)
  tokens, positions = _inputs(cfg)
  ours = np.asarray(module(tokens)[0])
  wrapped = lora.with_adapters(params, adapters, 2.0)
  np.testing.assert_array_equal(ours, np.asarray(forward(wrapped, tokens, positions, cfg)[0]))
  merged = module.to_params(lora="merge")
  np.testing.assert_allclose(ours, np.asarray(forward(merged, tokens, positions, cfg)[0]),
                             atol=1e-5)
  assert isinstance(module.to_params(lora="wrap").layers[0].attn.q, lora.LoraWeight)
  with pytest.raises(ValueError, match="already has"):
    module.add_lora(2, 2.0, key=key)


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("loop", marks=pytest.mark.slow)])
def test_lora_step_with_nnx_optimizer_equals_the_functional_step(optimizer):
  """Two optimizer steps from the same params and adapters: `nnx.Optimizer(module, tx,
  wrt=nnx.LoRAParam)` against `gemma.training.loop`'s jitted step. "adamw": plain
  `optax.adamw(lr)` against a run config whose optimizer reduces to it (constant lr, no clipping,
  no decay); "loop": the run's own optimizer (warmup, cosine decay, clipping, masked decay).
  The module's loss is the mean, the loop's the sum scaled after the gradient: Adam's 1/sqrt(v)
  amplifies that rounding on near-zero gradients, hence atol 1e-5 (the steps are 1e-2)."""
  cfg = _cfg()
  params = _params()
  lr = 1e-2
  if optimizer == "adamw":
    ft = FinetuneConfig(preset="gemma4-e2b", lr=lr, steps=10, warmup_steps=0, end_lr_ratio=1.0,
                        weight_decay=0.0, clip_norm=0.0, lora_rank=4, lora_alpha=8.0)
    tx = optax.adamw(lr, b1=ft.b1, b2=ft.b2, weight_decay=0.0)
  else:
    ft = FinetuneConfig(preset="gemma4-e2b", lr=lr, steps=10, warmup_steps=1, weight_decay=0.1,
                        clip_norm=0.5, lora_rank=4, lora_alpha=8.0)
    tx = loop.optimizer(ft)
  key = jax.random.key(3)
  batch = _batch(cfg)

  # functional: loop's state, step and loss
  adapters = lora.init_adapters(key, params, ft.lora_rank, ft.lora_targets)
  run = loop.Run(ft, cfg, params, adapters, [], None)
  step = loop.make_train_step(run)
  state = loop.init_state(run, loop.optimizer(ft))
  for _ in range(2):
    state, _, _ = step(state, params, jax.tree.map(lambda x: x[None], batch))

  # NNX: the same adapters as LoRAParam, the same loss through the module's params
  module = gnnx.from_params(params, cfg).add_lora(ft.lora_rank, ft.lora_alpha, key=key)
  opt = nnx.Optimizer(module, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def nnx_step(m, opt, batch):
    def loss(m):
      nll, n = loop.loss_sums(m.adapters(), m.to_params(), batch, cfg, m.lora_scale)
      return nll / n

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
    opt.update(m, grads)
    return value

  for _ in range(2):
    nnx_step(module, opt, batch)

  got, want = module.adapters(), state["trainable"]
  assert set(got) == set(want)
  for n in want:
    np.testing.assert_allclose(got[n].a, want[n].a, rtol=1e-4, atol=1e-5, err_msg=n)
    np.testing.assert_allclose(got[n].b, want[n].b, rtol=1e-4, atol=1e-5, err_msg=n)
  assert any(np.abs(want[n].b).max() > 0 for n in want)


def test_orbax_round_trip_of_nnx_state(tmp_path):
  cfg = _cfg()
  params = _params()
  adapters = _random_b(lora.init_adapters(jax.random.key(1), params, 4))
  module = gnnx.from_params(params, cfg, adapters=adapters, lora_scale=0.5)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", nnx.state(module))
  ckpt.wait_until_finished()

  abstract = nnx.eval_shape(lambda: gnnx.from_params(
      P.init(jax.random.key(9), cfg), cfg).add_lora(4, 2.0, key=jax.random.key(9)))
  graphdef, target = nnx.split(abstract)
  assert isinstance(nnx.to_flat_state(target)[0][1].get_value(), jax.ShapeDtypeStruct)
  restored = nnx.merge(graphdef, ckpt.restore(tmp_path / "state", target))

  for a, b in zip(jax.tree.leaves(restored.to_params(lora="wrap")),
                  jax.tree.leaves(module.to_params(lora="wrap")), strict=True):
    np.testing.assert_array_equal(a, b)
  assert restored.lora_scale == 0.5  # the static half (graphdef) came from the abstract module
  tokens, _ = _inputs(cfg)
  run = nnx.jit(lambda m, t: m(t)[0])
  np.testing.assert_array_equal(np.asarray(run(restored, tokens)), np.asarray(run(module, tokens)))


def test_shard_places_by_the_functional_rules():
  cfg = _cfg()
  params = _params()
  module = gnnx.from_params(params, cfg).add_lora(2, 2.0, key=jax.random.key(1))
  mesh = sharding.make_mesh("1x1")
  assert gnnx.shard(module, mesh) is module
  q = module.params.layers[0].attn.q.get_value()
  assert q.sharding.mesh == mesh and q.sharding.spec == PartitionSpec(None, None, None)
  a = module.lora["layers.0.attn.q"].a.get_value()
  assert a.sharding.mesh == mesh
  for x, y in zip(jax.tree.leaves(module.to_params()), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(x, y)


def test_default_positions_continue_the_cache(monkeypatch):
  module = gnnx.from_params(_params(), _cfg())
  seen = []
  monkeypatch.setattr(gnnx, "forward", lambda p, tokens, positions, *a: seen.append(positions))
  tokens = jnp.zeros((2, 3), jnp.int32)
  module(tokens)
  module(tokens, cache=types.SimpleNamespace(next_pos=jnp.array([5, 2], jnp.int32)))
  np.testing.assert_array_equal(seen[0], [[0, 1, 2], [0, 1, 2]])
  np.testing.assert_array_equal(seen[1], [[5, 6, 7], [2, 3, 4]])


def test_errors():
  cfg = _cfg()
  params = _params()
  module = gnnx.from_params(params, cfg)
  with pytest.raises(TypeError, match="LoraWeight"):
    gnnx.from_params(lora.with_adapters(params, _random_b(
        lora.init_adapters(jax.random.key(1), params, 2, ("q",))), 1.0), cfg)
  with pytest.raises(ValueError, match="does not have"):
    gnnx.from_params(params, cfg, adapters={"layers.99.attn.q": None}, lora_scale=1.0)
  with pytest.raises(ValueError, match="lora_scale"):
    gnnx.from_params(params, cfg, adapters=lora.init_adapters(jax.random.key(1), params, 2))
  with pytest.raises(ValueError, match="lora must be"):
    module.to_params(lora="fold")
  with pytest.raises(TypeError, match="ModelConfig"):
    gnnx.Gemma(params, {"name": "x"})


@pytest.mark.slow
def test_tunix_peft_trainer_trains_the_lora_params():
  """Tunix's `PeftTrainer` takes the module as it is: it finds the `nnx.LoRAParam`s, trains only
  them, and two of its steps equal two functional fine-tuning steps (plain AdamW). `make test`
  installs the `tunix` extra (google-tunix, beside our pinned jax). Run in a child process:
  tunix imports pyarrow, pandas and more, whose bundled native libraries must not share a test
  worker with later XLA compilations (a worker that had imported them crashed compiling)."""
  if importlib.util.find_spec("tunix") is None:
    pytest.skip("google-tunix is not installed (make test installs the `tunix` extra)")
  child = subprocess.run([sys.executable, "-c", "from tests.test_nnx import _tunix_run; "
                          "_tunix_run(); print('tunix ok')"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=900)
  assert child.returncode == 0 and "tunix ok" in child.stdout, child.stderr[-3000:]


def _tunix_run():
  """The PeftTrainer check itself (raises on any mismatch)."""
  from tunix.sft import peft_trainer

  cfg, params, lr, key = _cfg(), _params(), 1e-2, jax.random.key(3)
  batch = _batch(cfg)
  ft = FinetuneConfig(preset="gemma4-e2b", lr=lr, steps=10, warmup_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.0, clip_norm=0.0, lora_rank=4, lora_alpha=8.0)
  run = loop.Run(ft, cfg, params, lora.init_adapters(key, params, 4), [], None)
  step = loop.make_train_step(run)
  state = loop.init_state(run, loop.optimizer(ft))
  for _ in range(2):
    state, _, _ = step(state, params, jax.tree.map(lambda x: x[None], batch))

  module = gnnx.from_params(params, cfg).add_lora(4, 8.0, key=key)
  frozen = module.to_params()

  def loss_fn(m, tokens, positions, targets, weights):
    nll, n = loop.loss_sums(m.adapters(), m.to_params(),
                            dict(tokens=tokens, positions=positions, targets=targets,
                                 weights=weights), cfg, m.lora_scale)
    return nll / n

  config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=2,
                                       checkpoint_root_directory=None, pbar_description=None)
  trainer = peft_trainer.PeftTrainer(module, optax.adamw(lr, weight_decay=0.0), config)
  trainer = trainer.with_loss_fn(loss_fn)
  trainer.train([batch, batch])
  assert trainer.train_steps == 2
  got, want = module.adapters(), state["trainable"]
  for n in want:
    np.testing.assert_allclose(got[n].a, want[n].a, rtol=1e-4, atol=1e-5, err_msg=n)
    np.testing.assert_allclose(got[n].b, want[n].b, rtol=1e-4, atol=1e-5, err_msg=n)
  assert any(np.abs(want[n].b).max() > 0 for n in want)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(module.to_params()), strict=True):
    np.testing.assert_array_equal(a, b)  # the base weights did not move

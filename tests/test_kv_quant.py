"""TurboQuant KV cache: attention on codes, unbiased keys, prefill == streaming, bytes, CLI."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.cli import app as cli
from gemma.io.formats.hf_config import from_hf_config
from gemma.kv import cache as C
from gemma.kv import quant as KQ
from gemma.model import config, params
from gemma.model import transformer as model
from gemma.model.attention import attend
from gemma.quant import footprint
from pallas_kernels import registry
from tests.conftest import fixture_dir, tiny

WIDTHS = ("tq2", "tq2.5", "tq3", "tq3.5", "tq4")


def _qkv(seed, b, t, kh, g, h):
  """Keys/values with a common offset and a few loud channels, like real K/V."""
  rng = np.random.default_rng(seed)
  loud = np.ones(h)
  loud[rng.choice(h, 8, replace=False)] = 8.0
  k = rng.standard_normal((b, t, kh, h)) * loud + 3 * rng.standard_normal(h)
  v = rng.standard_normal((b, t, kh, h)) * loud[::-1] + rng.standard_normal(h)
  q = rng.standard_normal((b, t, kh * g, h)) * loud / np.sqrt(h)
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _quant_view(spec, q, k, v, pos):
  h = k.shape[-1]
  codec = KQ.make_codec(spec, [h // spec.parts])
  layer = KQ.init_layer(spec, k.shape[0], k.shape[1], k.shape[2], h)
  b, t, n, _ = q.shape
  qg = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
  return KQ.update_and_view(layer, codec, k, v, pos, jnp.int32(0), jnp.int32(t), C.scatter, qg)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*WIDTHS, "tq3.5-mse"])
@pytest.mark.parametrize("head_dim", [256, 512])
def test_attention_on_codes_equals_dequantize_then_attend(name, head_dim):
  """Scores from codes (query rotated/projected once) == attention over rebuilt keys/values."""
  q, k, v = _qkv(0, 2, 24, 2, 2, head_dim)
  pos = jnp.broadcast_to(jnp.arange(24), (2, 24)).astype(jnp.int32)
  view, stored = _quant_view(KQ.get_kv_quant(name), q, k, v, pos)
  out = attend(q, view, pos, window=None, scale=head_dim ** -0.5)
  kd, vd = view.dequantized()
  ref = attend(q, C.FloatView(kd, vd, view.pos), pos, window=None, scale=head_dim ** -0.5)
  assert np.max(np.abs(np.asarray(out - ref))) < 1e-4 * np.max(np.abs(np.asarray(ref)))
  # the multi-token view is [old slots | this call]; the stored ring holds this call
  assert view.pos.shape == (2, 48) and int(stored.pos[0, -1]) == 23
  exact = attend(q, C.FloatView(k, v, pos), pos, window=None, scale=head_dim ** -0.5)
  rel = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
  assert rel < {"tq2": 0.5, "tq2.5": 0.4, "tq3": 0.3, "tq3.5": 0.25, "tq4": 0.2}.get(name, 0.25)


@pytest.mark.parametrize("name,window", [("tq3+r5", None), ("tq3+r5", 6), ("tq3+s2+r5", 6),
                                         ("tq3+s2", None)])
@pytest.mark.slow
def test_exact_sink_and_recent_window_with_codes_for_the_rest(name, window):
  """tq3+s2+r5: a query reads keys fewer than 5 positions back and positions < 2 from the
  bfloat16 copies and the rest from the codes, over a prefill and the decode steps after it
  (ring of 5 wrapping)."""
  h, t0, steps = 64, 9, 4
  q, k, v = _qkv(5, 2, t0 + steps, 2, 2, h)
  pos = jnp.broadcast_to(jnp.arange(t0 + steps), (2, t0 + steps)).astype(jnp.int32)
  spec = KQ.get_kv_quant(name)
  codec = KQ.make_codec(spec, [h])
  layer = KQ.init_layer(spec, 2, 16, 2, h)
  if spec.recent:
    assert layer.recent.k.shape == (2, 5, 2, h) and layer.recent.k.dtype == jnp.bfloat16
  if spec.sink:
    assert layer.sink.k.shape == (2, 2, 2, h)
  qg = lambda a, b: q[:, a:b].reshape(2, b - a, 2, 2, h)  # noqa: E731
  view, layer = KQ.update_and_view(layer, codec, k[:, :t0], v[:, :t0], pos[:, :t0],
                                   jnp.int32(0), jnp.int32(t0), C.scatter, qg(0, t0))
  outs = [attend(q[:, :t0], view, pos[:, :t0], window=window, scale=h ** -0.5)]
  for i in range(t0, t0 + steps):
    view, layer = KQ.update_and_view(layer, codec, k[:, i:i + 1], v[:, i:i + 1], pos[:, i:i + 1],
                                     jnp.int32(i), jnp.int32(1), C.scatter)
    outs.append(attend(q[:, i:i + 1], view, pos[:, i:i + 1], window=window, scale=h ** -0.5))
  out = jnp.concatenate(outs, axis=1)
  # reference: every key rebuilt from its codes, except the newest 5 of each query, which are
  # the bfloat16 originals (mixed as a bf16 cache mixes: probabilities rounded to bfloat16)
  kd, vd = view.dequantized()  # [B, 16, K, H]: the stored codes of positions 0..12
  slot = list(np.asarray(view.pos[0]))
  kd, vd = (jnp.stack([x[:, slot.index(p)] for p in range(t0 + steps)], 1) for x in (kd, vd))
  kb, vb = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (k, v))
  # [B, T, S] per query/key
  delta = pos[:, :, None] - pos[:, None, :]
  recent = ((delta < spec.recent) | (pos[:, None, :] < spec.sink))[:, None, None]
  seen = ((delta >= 0) & (delta < (window or 99)))[:, None, None]
  qh = q.reshape(2, t0 + steps, 2, 2, h)
  logits = jnp.where(recent, jnp.einsum("btkgh,bskh->bkgts", qh, kb),
                     jnp.einsum("btkgh,bskh->bkgts", qh, kd)) * h ** -0.5
  probs = jax.nn.softmax(jnp.where(seen, logits, -1e30), axis=-1)
  p_new = jnp.where(recent, probs, 0).astype(jnp.bfloat16).astype(jnp.float32)
  ref = (jnp.einsum("bkgts,bskh->btkgh", jnp.where(recent, 0, probs), vd)
         + jnp.einsum("bkgts,bskh->btkgh", p_new, vb)).reshape(out.shape)
  assert np.max(np.abs(np.asarray(out - ref))) < 1e-4 * np.max(np.abs(np.asarray(ref)))
  exact = attend(q, C.FloatView(k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), pos), pos,
                 window=window, scale=h ** -0.5)
  # the first queries see only exact keys: a bf16 cache's output
  n = max(spec.recent, spec.sink)
  assert np.max(np.abs(np.asarray(out[:, :n] - exact[:, :n]))) < 1e-5


@pytest.mark.slow
def test_recent_window_longer_than_the_context_equals_a_bf16_cache():
  cfg, p = _cfg(), _params()
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 10)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10)).astype(jnp.int32)
  fwd = jax.jit(functools.partial(model.forward, cfg=cfg))
  out = {}
  for kind in ("bf16", "tq2+r16"):  # a sink covering the context: the test above, ("tq3+s2")
    _, cache = fwd(p, tokens[:, :6], pos[:, :6], cache=C.init_cache(cfg, 2, 16, kv_quant=kind))
    out[kind], _ = fwd(p, tokens[:, 6:], pos[:, 6:], cache=cache)
  np.testing.assert_allclose(np.asarray(out["tq2+r16"]), np.asarray(out["bf16"]), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.slow
def test_sink_and_window_with_left_padding_equal_an_unpadded_row():
  """The sink is per row (slot = position): a left-padded row (3 padding columns) attends as
  the same row alone, over a prefill and decode steps (tq3+s1+r3: ring of 3 wrapping)."""
  h, t = 64, 9
  q, k, v = _qkv(8, 1, t, 1, 2, h)
  spec = KQ.get_kv_quant("tq3+s1+r3")
  codec = KQ.make_codec(spec, [h])

  def run(pad):
    pad3 = lambda x: jnp.concatenate([jnp.zeros((1, pad, *x.shape[2:])), x], 1)  # noqa: E731
    qp, kp, vp = pad3(q), pad3(k), pad3(v)
    pos = jnp.concatenate([jnp.full((1, pad), -1), jnp.arange(t)[None]], 1).astype(jnp.int32)
    layer, outs, n0 = KQ.init_layer(spec, 1, 16, 1, h), [], pad + 5
    qg = lambda a, b: qp[:, a:b].reshape(1, b - a, 1, 2, h)  # noqa: E731
    view, layer = KQ.update_and_view(layer, codec, kp[:, :n0], vp[:, :n0], pos[:, :n0],
                                     jnp.int32(0), jnp.int32(n0), C.scatter, qg(0, n0))
    outs.append(attend(qp[:, :n0], view, pos[:, :n0], window=None, scale=h ** -0.5)[:, pad:])
    for i in range(n0, pad + t):
      view, layer = KQ.update_and_view(layer, codec, kp[:, i:i + 1], vp[:, i:i + 1],
                                       pos[:, i:i + 1], jnp.int32(i), jnp.int32(1), C.scatter)
      outs.append(attend(qp[:, i:i + 1], view, pos[:, i:i + 1], window=None, scale=h ** -0.5))
    assert int(layer.sink.pos[0, 0]) == 0
    return jnp.concatenate(outs, axis=1)

  alone, padded = run(0), run(3)
  assert np.max(np.abs(np.asarray(padded - alone))) < 1e-4 * np.max(np.abs(np.asarray(alone)))


@pytest.mark.slow
def test_error_falls_with_width():
  q, k, v = _qkv(1, 1, 64, 2, 4, 256)
  pos = jnp.arange(64)[None].astype(jnp.int32)
  exact = attend(q, C.FloatView(k, v, pos), pos, window=None, scale=1 / 16)
  errs = []
  for name in WIDTHS:
    view, _ = _quant_view(KQ.get_kv_quant(name), q, k, v, pos)
    out = attend(q, view, pos, window=None, scale=1 / 16)
    errs.append(float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)))
  assert errs == sorted(errs, reverse=True), errs


@pytest.mark.slow
def test_prod_keys_are_unbiased_and_mse_keys_are_not():
  """Over draws of (Π, S), TurboQuant_prod scores are unbiased; TurboQuant_mse scores shrink by
  1 - D_mse (T7 of the spec; for one fixed draw the QJL error is not mean-zero)."""
  rng = np.random.default_rng(2)
  d, s, draws = 128, 256, 32
  qv = rng.standard_normal(d)
  qv /= np.linalg.norm(qv)
  noise = rng.standard_normal((s, d))
  noise -= np.outer(noise @ qv, qv)
  noise /= np.linalg.norm(noise, axis=1, keepdims=True)
  keys = 0.9 * qv + np.sqrt(1 - 0.81) * noise  # unit keys with <q, k> = 0.9
  k = jnp.asarray(keys[None, :, None], jnp.float32)
  q = jnp.asarray(qv[None, None, None, None], jnp.float32)  # [B, T, K, G, H]
  pos = jnp.arange(s)[None].astype(jnp.int32)
  for method, expect in (("prod", 0.0), ("mse", -0.1160 * 0.9)):
    means = []
    for seed in range(draws):
      spec = KQ.KVQuant("t", (2,), (2,), seed=seed, center=False, query_scaling=False,
                        key_method=method)
      view, _ = KQ.update_and_view(KQ.init_layer(spec, 1, s, 1, d), KQ.make_codec(spec, [d]),
                                   k, k, pos, jnp.int32(0), jnp.int32(s), C.scatter)
      means.append(np.mean(np.asarray(view.scores(q))[0, 0, 0, 0, s:] - 0.9))
    se = np.std(means) / np.sqrt(draws)
    assert abs(np.mean(means) - expect) < 4 * se + 0.002, (method, np.mean(means), se)
    assert se < 0.01


def _cfg():
  # head dims 64 (sliding, ring of 4) and 128 (global); KV sharing; 10 layers
  return tiny("gemma4-e2b", head_dim=64, global_head_dim=128)


@functools.cache
def _params():
  return params.init(jax.random.PRNGKey(0), _cfg(), jnp.float32, std=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tq2.5", "tq3", "tq3.5-mse", "tq3+s1+r3"])
def test_chunked_prefill_equals_streaming_decode(name):
  """Each query sees stored (quantized) K/V, its own included: a chunk == tokens one by one,
  across ring wrap-around (window 4), KV-shared layers and global layers."""
  cfg, p = _cfg(), _params()
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12)).astype(jnp.int32)
  fwd = jax.jit(functools.partial(model.forward, cfg=cfg))
  _, cache = fwd(p, tokens[:, :5], pos[:, :5], cache=C.init_cache(cfg, 2, 16, kv_quant=name))
  chunk, _ = fwd(p, tokens[:, 5:], pos[:, 5:], cache=cache)
  steps = []
  for i in range(5, 12):
    logits, cache = fwd(p, tokens[:, i:i + 1], pos[:, i:i + 1], cache=cache)
    steps.append(logits[:, 0])
  steps = np.stack(steps, 1)
  # float32 reassociation through 10 random layers gives ~1e-4 relative; one flipped code
  # would move a logit by a quantization step (~1e-1 relative)
  assert np.max(np.abs(np.asarray(chunk) - steps)) < 1e-3 * np.max(np.abs(steps))


@pytest.mark.slow
def test_decode_through_the_kernels_matches_xla():
  """A decode step on a TurboQuant cache: Pallas kernels (interpret) == the XLA path."""
  cfg, p = _cfg(), _params()
  tokens = jnp.asarray([[5, 9, 33, 7, 1, 60, 2, 8]], jnp.int32)
  pos = jnp.arange(8)[None].astype(jnp.int32)
  out = {}
  for impl in ("xla", "interpret"):
    registry.set_default_impl(impl)
    try:
      fwd = jax.jit(functools.partial(model.forward, cfg=cfg))
      _, cache = fwd(p, tokens, pos, cache=C.init_cache(cfg, 1, 32, kv_quant="tq3.5"))
      out[impl], _ = fwd(p, tokens[:, -1:], pos[:, -1:] + 1, cache=cache)
    finally:
      registry.set_default_impl(None)
  assert ("tq_scores", "interpret") in registry.choices()
  assert ("tq_mix", "interpret") in registry.choices()
  scale = np.max(np.abs(np.asarray(out["xla"])))
  assert np.max(np.abs(np.asarray(out["interpret"] - out["xla"]))) < 1e-4 * scale


@pytest.mark.slow
def test_evaluate_through_a_cache():
  """eval with a float32 cache == eval without one; a TurboQuant cache moves the logits."""
  from gemma.inference.evaluate import evaluate

  cfg, p = _cfg(), _params()
  ids = list(np.random.default_rng(4).integers(3, cfg.vocab_size, 40))
  plain = evaluate(p, cfg, ids, 16, reference=p, show_progress=False)
  f32 = evaluate(p, cfg, ids, 16, reference=p, show_progress=False, kv_quant="f32")
  tq = evaluate(p, cfg, ids, 16, reference=p, show_progress=False, kv_quant="tq4")
  assert f32.perplexity == pytest.approx(plain.perplexity, rel=1e-5) and f32.mean_kl < 1e-6
  assert tq.mean_kl > 1e-4 and np.isfinite(tq.perplexity)


def _allocated(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kind", [None, "bf16", *WIDTHS, "tq4-mse", "tq3.5+s1+r128", "tq2+r5",
                                  "tq4+s3"])
def test_cache_bytes_match_the_formula(kind):
  for cfg, batch, length in ((_cfg(), 2, 40), (config.get_preset("gemma4-31b"), 1, 8192),
                             (config.get_preset("gemma4-e4b"), 3, 2048)):
    abstract = jax.eval_shape(lambda c=cfg, b=batch, n=length: C.init_cache(
        c, b, n, jnp.bfloat16, kind))
    assert _allocated(abstract) == footprint.kv_cache_bytes(cfg, length, batch, 2, kind), (
        cfg.name, kind)


def test_cache_sizes_per_token():
  cfg = config.get_preset("gemma4-31b")
  bf16 = footprint.kv_cache_bytes(cfg, 131_072, kv_quant="bf16")
  tq4 = footprint.kv_cache_bytes(cfg, 131_072, kv_quant="tq4")
  tq2 = footprint.kv_cache_bytes(cfg, 131_072, kv_quant="tq2")
  assert 3.8 < bf16 / tq4 < 4.0 and 7.5 < bf16 / tq2 < 8.0
  assert bf16 > 6 * 2 ** 30  # the "> 6 GB at 128K"
  assert KQ.bits_per_channel(KQ.KV_QUANTS["tq3.5"], 256) == pytest.approx(3.5 + 8 * 12 / 512)
  table = footprint.kv_table()
  assert "gemma4-31b" in table and "gemma4-e4b" in table and "tq2.5" in table


def test_bad_widths_are_named():
  with pytest.raises(ValueError, match="unknown KV-cache quantization 'tq5'.*tq3.5"):
    C.init_cache(_cfg(), 1, 8, kv_quant="tq5")
  with pytest.raises(ValueError, match="head_dim divisible by 64.*head_dim is 32"):
    C.init_cache(tiny("gemma4-31b", head_dim=32, global_head_dim=64), 1, 8, kv_quant="tq3.5")
  with pytest.raises(ValueError, match="key_method"):
    dataclasses.replace(KQ.KV_QUANTS["tq3"], key_method="qjl")
  for bad in ("tq3.5+r0", "tq3.5+rx", "tq3.5+r", "tq3.5+r4+r8", "tq3.5+q4"):
    with pytest.raises(ValueError, match="each of \\+sN \\(sink\\) and \\+rN"):
      KQ.get_kv_quant(bad)
  with pytest.raises(ValueError, match="unknown KV-cache quantization 'tq9\\+r4'"):
    KQ.get_kv_quant("tq9+r4")
  spec = KQ.get_kv_quant("tq3.5-mse+r64+s2")
  assert (spec.recent, spec.sink, spec.key_method) == (64, 2, "mse")


@pytest.mark.slow
def test_generate_json_reports_kv_cache_bytes(capsys):
  ckpt = fixture_dir("dense_keqv")  # head dims 32 and 64: every integer width packs
  for kind in ("tq4", "tq2", "bf16", "tq3+s1+r4"):
    assert cli.main(["generate", "--checkpoint", ckpt, "--prompt-ids", "2,17,5,9",
                     "--max-new-tokens", "3", "--kv-quant", kind, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = from_hf_config(json.load(open(f"{ckpt}/config.json")))
    assert out["kv_quant"] == kind and len(out["token_ids"]) == 3
    assert out["kv_cache_bytes"] == footprint.kv_cache_bytes(cfg, 7, 1, 4, kind)
  assert cli.main(["generate", "--checkpoint", ckpt, "--prompt-ids", "2,17", "--max-new-tokens",
                   "2", "--kv-quant", "tq3.5"]) == 2
  assert "head_dim divisible by 64" in capsys.readouterr().err

"""Gemma 4's multi-token-prediction drafters (the released `-assistant` checkpoints).

A drafter is a small Gemma 4 decoder whose layers have no K/V projections of their own: every
layer attends to the target's cached K/V of the target's last non-shared layer of its attention
type. One draft step, at the position P of the newest token (constant within a round):

  x = [embed_target(token) ; h] @ W_pre          [B, 2·D_t] -> [B, D]
  x = drafter layers (queries at P, K/V from the target's cache)
  g = final_norm(x)
  logits = g @ E_drafterᵀ                         (no soft-cap; or the centroid-masked head)
  h' = g @ W_post                                  [B, D] -> [B, D_t], the next step's h
  token' = argmax(logits)

The first step of a round takes the target's final-normed hidden state that predicted the
newest token (`SpecState.hidden`) and that token; later steps take the drafter's own h' and
token'. The centroid-masked head (`ordered`: E2B/E4B) scores only the tokens of the top
`centroid_top_k` of `num_centroids` centroids (`token_ordering` lists each centroid's tokens);
every other token gets the smallest selected logit minus 1.

Reference: transformers `models/gemma4_assistant` and `SinglePositionMultiTokenCandidateGenerator`
(generation/candidate_generator.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma.io.formats import hf
from gemma.io.formats.common import CheckpointError, Skip, assemble
from gemma.io.formats.hf_config import from_hf_config
from gemma.kv.cache import view_of
from gemma.model.config import AttentionType, ModelConfig, get_preset
from gemma.model.layers import einsum, rms_norm
from gemma.model.params import Params, init, pytree_dataclass
from gemma.model.transformer import decoder_layer, embed


@dataclasses.dataclass(frozen=True)
class DrafterTextConfig(ModelConfig):
  """The drafter's decoder: a Gemma 4 text config whose every layer reads the target's K/V
  (`kv_source` -1: no producer inside the drafter)."""

  @functools.cached_property
  def layers(self):
    return tuple(dataclasses.replace(s, kv_source=-1) for s in ModelConfig.layers.func(self))


@dataclasses.dataclass(frozen=True)
class MtpConfig:
  text: DrafterTextConfig
  backbone_dim: int  # D_t, the target's hidden size
  ordered: bool = False  # the centroid-masked head (use_ordered_embeddings)
  num_centroids: int = 2048
  centroid_top_k: int = 32


@pytree_dataclass
class MtpParams:
  pre: jax.Array  # [2·D_t, D] pre_projection
  post: jax.Array  # [D, D_t] post_projection
  body: Params  # the decoder: embed [V, D] (the tied head), final_norm, layers (no K/V)
  centroids: jax.Array | None = None  # [D, C]
  ordering: jax.Array | None = None  # [V] int32 tokens of centroid c at [c·V/C, (c+1)·V/C)


@dataclasses.dataclass(frozen=True)
class NewestWindowView:
  """A drafter's view of the target's sliding-window K/V: the newest `size` stored entries,
  whatever the query's position (the reference's flipped bidirectional window of W + 1 entries;
  after a partial acceptance they include the verified-then-rejected columns). Delegates
  everything else to the cache's view."""

  inner: object  # FloatView or QuantView
  size: int

  @property
  def pos(self) -> jax.Array:
    return self.inner.pos

  @property
  def kv_heads(self) -> int:
    return self.inner.kv_heads

  def scores(self, q):
    return self.inner.scores(q)

  def mix(self, probs):
    return self.inner.mix(probs)

  def visible(self, q_pos: jax.Array, window) -> jax.Array:
    """[B, T, S]: entries within `size` positions of each row's newest stored one."""
    del window
    newest = jnp.max(self.inner.pos, axis=1)
    return self.inner.visible(jnp.broadcast_to(newest[:, None], q_pos.shape), self.size)


def source_layers(cfg: ModelConfig) -> dict[AttentionType, int]:
  """The target layer whose cached K/V a drafter layer of each attention type reads: the last
  layer of that type with its own K/V."""
  out = {}
  for spec in cfg.layers:
    if not spec.shares_kv:
      out[spec.attention] = spec.index
  return out


def head(mcfg: MtpConfig, p: MtpParams, g: jax.Array) -> jax.Array:
  """Drafter logits [B, V] float32 of normed hidden states g [B, D]."""
  table = p.body.embed
  if not mcfg.ordered:
    return einsum("bd,vd->bv", g, table, out_dtype=jnp.float32)
  b, vocab = g.shape[0], table.shape[0]
  per = vocab // mcfg.num_centroids
  # [B, top_k] the best centroids, [B, top_k·V/C] their tokens
  top = jax.lax.top_k(einsum("bd,dc->bc", g, p.centroids, out_dtype=jnp.float32),
                      mcfg.centroid_top_k)[1]
  tokens = p.ordering.reshape(mcfg.num_centroids, per)[top].reshape(b, -1)
  # [B, M] logits of the selected tokens only
  picked = jnp.einsum("bd,bmd->bm", g, table[tokens], preferred_element_type=jnp.float32)
  floor = jnp.min(picked) - 1.0  # over the whole batch, as the reference does
  rows = jnp.arange(b)[:, None]
  return jnp.full((b, vocab), floor, jnp.float32).at[rows, tokens].set(picked)


def draft_step(mcfg: MtpConfig, p: MtpParams, target: Params, cfg: ModelConfig, views,
               token: jax.Array, h: jax.Array, pos: jax.Array):
  """One drafter step. token [B] int32, h [B, D_t], pos [B] the query position; views: the
  target's K/V view per attention type. Returns (logits [B, V] float32, h' [B, D_t])."""
  tcfg = mcfg.text
  dtype = p.pre.dtype
  # [B, 1, 2·D_t] -> [B, 1, D]
  x = jnp.concatenate([embed(target, token[:, None], cfg, dtype), h[:, None].astype(dtype)],
                      axis=-1)
  x = einsum("btc,cd->btd", x, p.pre)
  zero = jnp.zeros((), jnp.int32)
  for spec, layer in zip(tcfg.layers, p.body.layers, strict=True):
    x, _, _ = decoder_layer(layer, x, pos[:, None], spec, tcfg, ple=None,
                            shared=views[spec.attention], cache=None, codec=None, start=zero,
                            num_columns=jnp.ones((), jnp.int32))
  g = rms_norm(x[:, 0], p.body.final_norm, eps=tcfg.rms_eps, plus_one=tcfg.norm_plus_one)
  return head(mcfg, p, g), einsum("bd,dc->bc", g, p.post)


@dataclasses.dataclass(frozen=True)
class Mtp:
  """Speculative decoding with an MTP drafter (`gemma.inference.speculative`)."""

  config: MtpConfig
  tokens: int = 2  # K drafts per round
  rounds: int = 4  # rounds per device call
  params: MtpParams | None = dataclasses.field(default=None, compare=False, repr=False)
  name = "mtp"
  needs_hidden = True
  always_drafts = True

  def __post_init__(self):
    if not (isinstance(self.tokens, int) and self.tokens >= 1):
      raise ValueError(f"draft tokens must be an integer >= 1, got {self.tokens!r}")

  def check(self, cfg: ModelConfig) -> None:
    """Refuses a target this drafter was not made for (names what differs)."""
    check_target(self.config, cfg)

  def propose(self, draft_params: MtpParams, params: Params, state, cfg: ModelConfig):
    """K drafts [B, K] from the target's cache and hidden state (found: every row)."""
    drafts, _ = self.draft(draft_params, params, state, cfg)
    return drafts, jnp.ones(drafts.shape[:1], bool)

  def draft(self, draft_params: MtpParams, params: Params, state, cfg: ModelConfig):
    """(drafts [B, K] int32, drafter logits [B, K, V] float32) of one round: K argmax steps
    at the newest token's position, reading the target's cache (`gemma.inference.speculative.
    SpecState`: cache, last, hidden)."""
    cache = state.cache
    window = self.config.text.sliding_window + 1
    views = {}
    for kind, i in source_layers(cfg).items():
      view = view_of(cache.layers[i], cache.codec)
      views[kind] = view if kind is AttentionType.GLOBAL else NewestWindowView(view, window)
    token, h, drafts, logits = state.last, state.hidden, [], []
    for _ in range(self.tokens):
      step_logits, h = draft_step(self.config, draft_params, params, cfg, views, token, h,
                                  cache.next_pos)
      token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
      drafts.append(token)
      logits.append(step_logits)
    return jnp.stack(drafts, axis=1), jnp.stack(logits, axis=1)


def check_target(mcfg: MtpConfig, cfg: ModelConfig) -> None:
  """A drafter reads the target's embedding, hidden state and K/V: their sizes must agree."""
  t = mcfg.text
  problems = []
  if mcfg.backbone_dim != cfg.embed_dim:
    problems.append(f"it was made for hidden size {mcfg.backbone_dim}, the target has "
                    f"{cfg.embed_dim} (a drafter of another model size)")
  if t.vocab_size != cfg.vocab_size:
    problems.append(f"vocabulary {t.vocab_size} vs the target's {cfg.vocab_size}")
  sources = source_layers(cfg)
  for spec in t.layers:
    src = sources.get(spec.attention)
    if src is None:
      problems.append(f"drafter layer {spec.index} is {spec.attention.value}; the target has "
                      "no such layer")
      continue
    s = cfg.layers[src]
    if s.head_dim != spec.head_dim or t.num_heads % s.num_kv_heads:
      problems.append(f"drafter layer {spec.index} ({spec.attention.value}) has head size "
                      f"{spec.head_dim} and {t.num_heads} heads; the target's K/V have head "
                      f"size {s.head_dim} and {s.num_kv_heads} KV heads")
  if problems:
    raise ValueError("this MTP drafter does not fit the target: " + "; ".join(problems))


def assistant_config(target: ModelConfig, *, hidden: int, ffn: int, heads: int,
                     ordered: bool = False, num_centroids: int = 2048, centroid_top_k: int = 32,
                     layer_types: tuple[AttentionType, ...] | None = None,
                     name: str | None = None) -> MtpConfig:
  """A drafter shaped for `target`: its head sizes, KV heads, k_eq_v, windows, RoPE and
  vocabulary, and the released assistants' layout (sliding, sliding, sliding, full)."""
  local, full = AttentionType.LOCAL, AttentionType.GLOBAL
  types = layer_types or (local, local, local, full)
  text = DrafterTextConfig(
      name=name or f"{target.name}-assistant", vocab_size=target.vocab_size, embed_dim=hidden,
      num_layers=len(types), num_heads=heads, num_kv_heads=target.num_kv_heads,
      head_dim=target.head_dim, ffn_dim=ffn, layer_types=types,
      sliding_window=target.sliding_window, rope_local=target.rope_local,
      rope_global=target.rope_global, global_head_dim=target.global_head_dim,
      num_global_kv_heads=target.num_global_kv_heads, k_eq_v=target.k_eq_v,
      final_softcap=None, rms_eps=target.rms_eps,
      max_position_embeddings=target.max_position_embeddings)
  return MtpConfig(text=text, backbone_dim=target.embed_dim, ordered=ordered,
                   num_centroids=num_centroids, centroid_top_k=centroid_top_k)


def assistant_preset(target: str) -> MtpConfig:
  """The released assistant of a target preset (`google/gemma-4-<size>-it-assistant`). Sizes
  as published for the four assistants (hidden, MLP width, heads; E2B/E4B with the centroid
  head, 2048 centroids, top 32): not read from the official config files, which were not
  available offline; `load_drafter` reads a real checkpoint's own config."""
  sizes = {"gemma4-e2b": (256, 2048, 4, True), "gemma4-e4b": (256, 2048, 4, True),
           "gemma4-26b-a4b": (1024, 8192, 16, False), "gemma4-31b": (1024, 8192, 32, False)}
  if target not in sizes:
    raise ValueError(f"no assistant preset for {target!r}; presets: {', '.join(sizes)}")
  hidden, ffn, heads, ordered = sizes[target]
  return assistant_config(get_preset(target), hidden=hidden, ffn=ffn, heads=heads,
                          ordered=ordered)


# ------------------------------------------------------------------------------- loading
def config_from_hf(data: dict, name: str = "drafter") -> MtpConfig:
  """The MtpConfig of a `gemma4_assistant` config.json dict."""
  if data.get("model_type") != "gemma4_assistant":
    raise CheckpointError(f"{name}: config.json has model_type {data.get('model_type')!r}, not "
                          "'gemma4_assistant' (a Gemma 4 MTP drafter)")
  text = dict(data["text_config"], num_kv_shared_layers=0)
  base = from_hf_config(text, name=name)
  tcfg = DrafterTextConfig(**{f.name: getattr(base, f.name)
                              for f in dataclasses.fields(ModelConfig)})
  return MtpConfig(text=tcfg, backbone_dim=int(data.get("backbone_hidden_size", 1536)),
                   ordered=bool(data.get("use_ordered_embeddings", False)),
                   num_centroids=int(data.get("num_centroids", 2048)),
                   centroid_top_k=int(data.get("centroid_intermediate_top_k", 32)))


EXTRA = {"pre_projection.weight": "pre", "post_projection.weight": "post",
         "masked_embedding.centroids.weight": "centroids",
         "masked_embedding.token_ordering": "ordering"}


def load_drafter(path: str | Path, tokens: int = 2, dtype=jnp.float32, rounds: int = 4) -> Mtp:
  """An `Mtp` drafter from a Hugging Face `gemma4_assistant` directory (config.json +
  safetensors)."""
  path = Path(path)
  if not (path / "config.json").is_file():
    raise CheckpointError(f"{path}: no config.json (a Gemma 4 MTP drafter directory)")
  mcfg = config_from_hf(json.loads((path / "config.json").read_text()), path.name)
  files = hf.safetensors_files(path)
  extra = {}

  def mapper(name: str):
    if name in EXTRA:
      return Skip("drafter projections and centroid head")
    if name == "lm_head.weight":
      return Skip("tied output head tensor (the embedding is used)")
    return hf.TABLE(name.removeprefix("model.")) if name.startswith("model.") else None

  for name, load in hf.iter_safetensors(files):
    if name in EXTRA:
      extra[EXTRA[name]] = np.asarray(load())
  body = assemble(mcfg.text, hf.iter_safetensors(files), mapper, dtype, source=str(path))
  d, dt = mcfg.text.embed_dim, mcfg.backbone_dim
  want = {"pre": (d, 2 * dt), "post": (dt, d)}
  if mcfg.ordered:
    want.update(centroids=(mcfg.num_centroids, d), ordering=(mcfg.text.vocab_size,))
  for key, shape in want.items():
    if key not in extra:
      tensor = next(k for k, v in EXTRA.items() if v == key)
      raise CheckpointError(f"{path}: missing tensor {tensor}")
    if extra[key].shape != shape:
      raise CheckpointError(f"{path}: {key} has shape {extra[key].shape}, expected {shape}")
  cast = lambda a: jnp.asarray(np.asarray(a, np.float32).T, dtype)  # noqa: E731
  p = MtpParams(pre=cast(extra["pre"]), post=cast(extra["post"]), body=body,
                centroids=cast(extra["centroids"]) if mcfg.ordered else None,
                ordering=jnp.asarray(extra["ordering"], jnp.int32) if mcfg.ordered else None)
  return Mtp(config=mcfg, tokens=tokens, rounds=rounds, params=p)


def random_drafter(mcfg: MtpConfig, key: jax.Array, dtype=jnp.float32, tokens: int = 2,
                   rounds: int = 4) -> Mtp:
  """A drafter with random weights (benchmarks of the drafting cost)."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  d, dt = mcfg.text.embed_dim, mcfg.backbone_dim
  ordered = mcfg.ordered
  p = MtpParams(
      pre=(jax.random.normal(k1, (2 * dt, d)) * dt ** -0.5).astype(dtype),
      post=(jax.random.normal(k2, (d, dt)) * d ** -0.5).astype(dtype),
      body=init(k3, mcfg.text, dtype),
      centroids=(jax.random.normal(k4, (d, mcfg.num_centroids)) * 0.02).astype(dtype)
      if ordered else None,
      ordering=jax.random.permutation(k4, mcfg.text.vocab_size).astype(jnp.int32)
      if ordered else None)
  return Mtp(config=mcfg, tokens=tokens, rounds=rounds, params=p)

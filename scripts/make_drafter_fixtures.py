"""Generate tiny Gemma 4 MTP "assistant" drafter fixtures with the Hugging Face reference.

For each target fixture (``tests/fixtures/e_style``, ``tests/fixtures/dense_keqv``, made by
``scripts/make_reference_fixtures.py``) builds two tiny ``Gemma4AssistantForCausalLM`` drafters
(plain tied ``lm_head`` and ``use_ordered_embeddings=True`` centroid-masked head), runs HF's own
greedy assisted generation ``target.generate(prompt, assistant_model=drafter, do_sample=False)``
with a constant ``num_assistant_tokens`` and records, by hooking the drafter's ``forward`` (and
``create_attention_masks``) and the target's ``forward``, every drafter call and every
verification round. Writes ``<out>/drafter_<target>[_ordered]/`` with ``config.json`` +
``generation_config.json`` + ``model.safetensors`` (float32, ``save_pretrained``) and
``reference.npz`` (fields listed in ``tests/fixtures/drafter_README.md``, which this script
also writes).

Random drafters almost never agree with a random target, so the weights are planted (see
``plant``): the drafter is a noisy "copy the last token" predictor whose attention, MLP and
hidden-state paths still move the logits by O(0.1-1). The prompt is the first seeded random
prompt whose target continuation repeats tokens so that the rounds include rejections,
partial acceptances and full acceptances.

Run with the reference venv (torch + transformers >= 5.25)::

    .venv-ref/bin/python scripts/make_drafter_fixtures.py --out tests/fixtures
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
  Gemma4AssistantConfig,
  Gemma4AssistantForCausalLM,
  Gemma4ForCausalLM,
  Gemma4TextConfig,
)

TARGETS = ("e_style", "dense_keqv")
K = 4  # num_assistant_tokens (constant schedule)
MAX_NEW = 16
PROMPT_LEN = 28
MAX_PROMPT_SEEDS = 400
WEIGHT_SEED = 0
D = 48  # drafter hidden size (target backbone hidden size is 64)
NUM_CENTROIDS = 16
CENTROID_TOP_K = 4
L, G = "sliding_attention", "full_attention"
DRAFTER_LAYERS = [L, G, L, G]
ROPE = {
  L: {"rope_type": "default", "rope_theta": 10_000.0},
  G: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25},
}
EMB_GAIN = 3.0  # pre_projection gain on the (orthonormally projected) token embedding half
HID_GAIN = 0.15  # pre_projection gain on the target hidden-state half
MAX_NOISE = 2e-5


def load_target(fixtures: Path, name: str) -> Gemma4ForCausalLM:
  return Gemma4ForCausalLM.from_pretrained(fixtures / name, attn_implementation="eager").eval()


def drafter_config(target: Gemma4ForCausalLM, ordered: bool) -> Gemma4AssistantConfig:
  """Tiny drafter config whose per-type head dims / KV heads match the target's shared K/V."""
  tc = target.config
  sliding = tc.per_layer_config[tc.layer_types.index(L)]
  full = tc.per_layer_config[tc.layer_types.index(G)]
  kwargs = dict(
    vocab_size=tc.vocab_size, hidden_size=D, intermediate_size=32, num_hidden_layers=4,
    layer_types=list(DRAFTER_LAYERS), num_attention_heads=4,
    num_key_value_heads=sliding.num_key_value_heads, head_dim=sliding.head_dim,
    global_head_dim=full.head_dim, attention_k_eq_v=tc.attention_k_eq_v,
    sliding_window=tc.sliding_window, rope_parameters=copy.deepcopy(ROPE),
    # Set on purpose: the assistant forward never applies a final soft-cap.
    final_logit_softcapping=30.0,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4,
    tie_word_embeddings=True, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=4096,
  )
  if tc.attention_k_eq_v:
    kwargs["num_global_key_value_heads"] = full.num_key_value_heads
  text = Gemma4TextConfig(**kwargs, attn_implementation="eager")
  return Gemma4AssistantConfig(
    text_config=text, backbone_hidden_size=tc.hidden_size, use_ordered_embeddings=ordered,
    num_centroids=NUM_CENTROIDS, centroid_intermediate_top_k=CENTROID_TOP_K,
    tie_word_embeddings=True, attn_implementation="eager",
  )


@torch.no_grad()
def plant(drafter: Gemma4AssistantForCausalLM, target: Gemma4ForCausalLM, seed: int) -> None:
  """Random weights with a planted copy-the-last-token structure.

  P [D, B] has orthonormal rows. pre_projection = [EMB_GAIN * P | HID_GAIN * R] (R random), so
  the drafter residual starts as ~EMB_GAIN * P @ (sqrt(B) * E_t[tok]) plus a hidden-state term.
  The tied embedding / lm_head is E_t @ P.T, so argmax(lm_head(x)) tends to return ``tok``.
  Layer weights are ordinary N(0, 1/fan_in); post-attention / post-feedforward norm scales are
  U(0.2, 0.6) so each block adds a bounded perturbation; every other norm scale and
  layer_scalar is U(0.5, 1.5). Ordered head: ``token_ordering`` is a random permutation and
  centroid c is the mean lm_head row of its 32 tokens plus noise.
  """
  gen = torch.Generator().manual_seed(seed)

  def normal(shape, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std

  def uniform(shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

  backbone = target.config.hidden_size
  q, _ = torch.linalg.qr(normal((backbone, D), 1.0))
  proj = q.T  # [D, B], orthonormal rows
  e_t = target.model.embed_tokens.weight.double()
  for name, p in drafter.named_parameters():
    if name == "model.embed_tokens.weight":  # tied lm_head
      p.copy_(e_t @ proj.T)
    elif name == "pre_projection.weight":
      hid = normal((D, backbone), backbone ** -0.5)
      p.copy_(torch.cat([EMB_GAIN * proj, HID_GAIN * hid], dim=1))
    elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
      p.copy_(uniform(p.shape, 0.2, 0.6))
    elif name == "masked_embedding.centroids.weight":
      continue  # below, needs the token ordering
    elif p.ndim >= 2:
      p.copy_(normal(p.shape, p.shape[-1] ** -0.5))
    else:
      p.copy_(uniform(p.shape, 0.5, 1.5))
  for name, b in drafter.named_buffers():
    if name.endswith("layer_scalar"):
      b.copy_(uniform(b.shape, 0.5, 1.5))
  if drafter.masked_embedding is not None:
    me = drafter.masked_embedding
    vocab = drafter.config.get_text_config().vocab_size
    me.token_ordering.copy_(torch.randperm(vocab, generator=gen))
    rows = drafter.lm_head.weight.double()[me.token_ordering.view(NUM_CENTROIDS, -1)]
    mean = rows.mean(dim=1)
    me.centroids.weight.copy_(mean / mean.norm(dim=-1, keepdim=True) + normal(mean.shape, 0.05))


def make_prompt(seed: int) -> torch.Tensor:
  gen = torch.Generator().manual_seed(seed)
  return torch.cat([torch.tensor([2]), torch.randint(3, 512, (PROMPT_LEN - 1,), generator=gen)])


def _visible(mask: torch.Tensor | None, kv_len: int) -> np.ndarray:
  """[kv_len] bool: which kv entries the single drafter query may attend to."""
  if mask is None:
    return np.ones(kv_len, dtype=bool)
  assert mask.shape[:3] == (1, 1, 1) and mask.shape[-1] == kv_len, mask.shape
  return (mask[0, 0, 0] == 0).numpy()


class Recorder:
  """Hooks on the drafter (forward + create_attention_masks) and the target forward."""

  def __init__(self, target: Gemma4ForCausalLM, drafter: Gemma4AssistantForCausalLM):
    self.calls, self.targets, self._masks = [], [], None
    self.handles = [
      drafter.register_forward_hook(self._on_draft, with_kwargs=True),
      target.register_forward_pre_hook(self._on_target_pre, with_kwargs=True),
      target.register_forward_hook(self._on_target, with_kwargs=True),
    ]
    orig = drafter.create_attention_masks

    def create_attention_masks(*args, **kwargs):
      self._masks = orig(*args, **kwargs)
      return self._masks

    drafter.create_attention_masks = create_attention_masks
    self.drafter = drafter

  def close(self) -> None:
    for h in self.handles:
      h.remove()
    del self.drafter.create_attention_masks

  def _on_draft(self, module, args, kwargs, out) -> None:
    assert not args, "drafter is called with keyword arguments only"
    kv = kwargs["shared_kv_states"]
    am = kwargs.get("attention_mask")
    self.calls.append(dict(
      target_call=len(self.targets),
      inputs_embeds=kwargs["inputs_embeds"].detach().clone(),
      position_ids=kwargs["position_ids"].detach().clone(),
      attention_mask=None if am is None else am.detach().clone(),
      kv={t: (k.detach().clone(), v.detach().clone()) for t, (k, v) in kv.items()},
      visible={t: _visible(self._masks[t], kv[t][0].shape[2]) for t in (L, G)},
      logits=out.logits.detach().clone(),
      projected=out.last_hidden_state.detach().clone(),
    ))
    self._masks = None

  def _on_target_pre(self, module, args, kwargs) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    self._past = 0 if cache is None else cache.get_seq_length()

  def _on_target(self, module, args, kwargs, out) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    self.targets.append(dict(past=self._past, n=ids.shape[1], ids=ids[0].clone(),
                             argmax=out.logits[0].argmax(-1).clone()))


def run_assisted(target, drafter, prompt: torch.Tensor) -> tuple[torch.Tensor, Recorder]:
  rec = Recorder(target, drafter)
  try:
    with torch.no_grad():
      out = target.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]),
                            assistant_model=drafter, do_sample=False, max_new_tokens=MAX_NEW)
  finally:
    rec.close()
  return out[0], rec


def summarize(out_ids: torch.Tensor, rec: Recorder, prompt_len: int) -> list[dict]:
  """One entry per verification forward of the target (target call >= 1)."""
  rounds = []
  for t in range(1, len(rec.targets)):
    call = rec.targets[t]
    pos = call["past"]  # first position the target processes = cur_len - 1
    calls = [c for c in rec.calls if c["target_call"] == t]
    nxt = rec.targets[t + 1]["past"] + 1 if t + 1 < len(rec.targets) else len(out_ids)
    appended = nxt - (pos + 1)
    rounds.append(dict(target_call=t, position=pos, calls=calls, accepted=appended - 1,
                       appended=appended, target_argmax=call["argmax"], n_target=call["n"]))
  first = rec.targets[0]
  assert first["past"] == 0 and first["n"] == prompt_len, first
  return rounds


def acceptance_ok(rounds: list[dict]) -> bool:
  acc = [r["accepted"] for r in rounds if r["calls"]]
  # A partial acceptance that is not the last round: the next round sees its stale K/V.
  return 0 in acc and any(0 < a < K for a in acc[:-1]) and K in acc


def reference_kv(target: Gemma4ForCausalLM, ids: torch.Tensor) -> dict:
  """K/V of the target's storing layers over ``ids`` (one no-cache forward, correct tokens)."""
  with torch.no_grad():
    out = target(input_ids=ids[None], use_cache=False, return_shared_kv_states=True)
  return {t: (k[0], v[0]) for t, (k, v) in out.shared_kv_states.items()}


def reference_hidden(target: Gemma4ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
  with torch.no_grad():
    return target.model(input_ids=ids[None], use_cache=False).last_hidden_state[0]


def check_rounds(target, out_ids: torch.Tensor, rounds: list[dict]) -> list[dict]:
  """Assert the observed data layout the spec describes; return per-round diagnostics."""
  backbone = target.config.hidden_size
  table = target.model.embed_tokens.weight * target.model.embed_tokens.embed_scale
  ref_kv = reference_kv(target, out_ids)
  ref_h = reference_hidden(target, out_ids)
  diags = []
  for r in rounds:
    pos, calls = r["position"], r["calls"]
    if not calls:
      continue
    prev = None
    for s, c in enumerate(calls):
      assert c["position_ids"].tolist() == [[pos]], (c["position_ids"], pos)
      emb, hid = c["inputs_embeds"][0, 0, :backbone], c["inputs_embeds"][0, 0, backbone:]
      match = (table == emb).all(-1).nonzero()[:, 0].tolist()
      assert len(match) == 1, match
      c["input_token"] = match[0]
      want_tok = int(out_ids[pos]) if s == 0 else int(prev["logits"][0, 0].argmax())
      assert c["input_token"] == want_tok, (c["input_token"], want_tok)
      if s == 0:  # target hidden state (after the final norm) of position pos - 1
        err = float((hid - ref_h[pos - 1]).abs().max() / ref_h[pos - 1].abs().max())
        assert err < 1e-5, err
      else:  # previous step's post_projection output, bit-exact
        assert torch.equal(hid, prev["projected"][0, 0])
      for t in (L, G):  # K/V and mask constant within a round
        assert torch.equal(c["kv"][t][0], calls[0]["kv"][t][0])
        assert np.array_equal(c["visible"][t], calls[0]["visible"][t])
      prev = c
    kv = calls[0]["kv"]
    # Full type: entries 0..len-1 are positions 0..len-1. Compare with correct-token K.
    k_full = kv[G][0][0]
    n_full = k_full.shape[1]
    full_bad = [p for p in range(n_full) if not torch.allclose(
      k_full[:, p], ref_kv[G][0][:, p], rtol=0, atol=1e-4 * float(ref_kv[G][0].abs().max()))]
    diags.append(dict(position=pos, full_len=n_full, sliding_len=kv[L][0].shape[2],
                      full_bad=full_bad))
  return diags


def locate_sliding(rounds: list[dict], rec: Recorder) -> None:
  """Absolute position of each sliding entry: entry -1 = last position processed by the
  target forward that produced the K/V (the previous target call)."""
  for r in rounds:
    if not r["calls"]:
      continue
    prev = rec.targets[r["target_call"] - 1]
    last_pos = prev["past"] + prev["n"] - 1
    n = r["calls"][0]["kv"][L][0].shape[2]
    r["sliding_first_pos"] = last_pos - n + 1
    r["producer_last_pos"] = last_pos


def build(fixtures: Path, out: Path, target_name: str) -> list[dict]:
  target = load_target(fixtures, target_name)
  drafters = {}
  for ordered in (False, True):
    name = f"drafter_{target_name}" + ("_ordered" if ordered else "")
    torch.manual_seed(WEIGHT_SEED)
    d = Gemma4AssistantForCausalLM(drafter_config(target, ordered)).eval()
    plant(d, target, WEIGHT_SEED + (7 if ordered else 0))
    d.generation_config.num_assistant_tokens = K
    d.generation_config.num_assistant_tokens_schedule = "constant"
    drafters[name] = d

  for prompt_seed in range(MAX_PROMPT_SEEDS):
    prompt = make_prompt(prompt_seed)
    with torch.no_grad():
      greedy = target.generate(prompt[None], do_sample=False, max_new_tokens=MAX_NEW)[0]
    if len(greedy) < PROMPT_LEN + MAX_NEW:
      continue  # hit eos
    runs = {}
    for name, d in drafters.items():
      out_ids, rec = run_assisted(target, d, prompt)
      assert torch.equal(out_ids, greedy), f"{name}: assisted output != plain greedy"
      runs[name] = (out_ids, rec, summarize(out_ids, rec, PROMPT_LEN))
    accs = {n: [r["accepted"] for r in v[2]] for n, v in runs.items()}
    print(f"[{target_name}] prompt seed {prompt_seed}: accepted {accs}")
    if all(acceptance_ok(v[2]) for v in runs.values()):
      break
  else:
    raise RuntimeError(f"{target_name}: no prompt seed gave rejections + partial + full")

  rows = []
  for name, (out_ids, rec, rounds) in runs.items():
    rows.append(save_fixture(out / name, target_name, target, drafters[name], prompt,
                             prompt_seed, out_ids, rec, rounds))
  return rows


def mask_len(call: dict) -> int:
  """Length of the 2D attention mask passed to the drafter, -1 when generate passed None."""
  return -1 if call["attention_mask"] is None else call["attention_mask"].shape[1]


def save_fixture(out_dir, target_name, target, drafter, prompt, prompt_seed, out_ids, rec,
                 rounds) -> dict:
  diags = check_rounds(target, out_ids, rounds)
  locate_sliding(rounds, rec)
  window = drafter.config.get_text_config().sliding_window
  for r, d in zip([r for r in rounds if r["calls"]], diags, strict=True):
    # Spec checks. q1 = last position the producing target forward processed.
    q1, pos = r["producer_last_pos"], r["position"]
    assert d["full_len"] == min(pos, q1) + 1, (d, q1)
    assert d["full_bad"] == ([pos] if q1 >= pos else []), (d, q1)
    vis = np.nonzero(r["calls"][0]["visible"][L])[0] + r["sliding_first_pos"]
    first = max(q1 - window, r["sliding_first_pos"])
    assert vis.tolist() == list(range(first, q1 + 1)), (vis, q1)
    assert r["calls"][0]["visible"][G].all()
  calls = [c for r in rounds for c in r["calls"]]
  drounds = [r for r in rounds if r["calls"]]

  # float64 re-run of every recorded call (same inputs, upcast).
  ref = copy.deepcopy(drafter).double().eval()
  noise, margins = 0.0, []
  with torch.no_grad():
    for c in calls:
      o = ref(inputs_embeds=c["inputs_embeds"].double(), position_ids=c["position_ids"],
              attention_mask=c["attention_mask"],
              shared_kv_states={t: (k.double(), v.double()) for t, (k, v) in c["kv"].items()})
      l64, l32 = o.logits[0, 0], c["logits"][0, 0].double()
      noise = max(noise, float((l32 - l64).abs().max() / l64.abs().max()))
      top2 = l32.topk(2).values
      margins.append(float(top2[0] - top2[1]))
      assert int(l64.argmax()) == int(l32.argmax())
  assert noise <= MAX_NOISE, noise

  out_dir.mkdir(parents=True, exist_ok=True)
  drafter.save_pretrained(out_dir)
  reloaded = Gemma4AssistantForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
  want, got = drafter.state_dict(), reloaded.state_dict()
  assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
  assert reloaded.generation_config.num_assistant_tokens == K

  def cat_kv(t: str, i: int) -> np.ndarray:
    return torch.cat([r["calls"][0]["kv"][t][i][0].transpose(0, 1) for r in drounds]).numpy()

  def offsets(t: str) -> np.ndarray:
    lens = [r["calls"][0]["kv"][t][0].shape[2] for r in drounds]
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)

  i32 = np.int32
  tgt_tok = torch.cat([r["target_argmax"] for r in drounds]).numpy().astype(i32)
  arrays = dict(
    prompt_ids=prompt.numpy().astype(i32),
    output_ids=out_ids.numpy().astype(i32),
    num_assistant_tokens=np.array(K, i32),
    max_new_tokens=np.array(MAX_NEW, i32),
    prompt_seed=np.array(prompt_seed, i32),
    weight_seed=np.array(WEIGHT_SEED, i32),
    target=np.array(target_name),
    head=np.array("ordered" if drafter.config.use_ordered_embeddings else "tied"),
    call_round=np.array([i for i, r in enumerate(drounds) for _ in r["calls"]], i32),
    call_step=np.array([s for r in drounds for s in range(len(r["calls"]))], i32),
    call_position=np.array([int(c["position_ids"]) for c in calls], i32),
    call_input_token=np.array([c["input_token"] for c in calls], i32),
    call_inputs_embeds=torch.cat([c["inputs_embeds"][0] for c in calls]).numpy(),
    call_logits=torch.cat([c["logits"][0] for c in calls]).numpy(),
    call_token=np.array([int(c["logits"].argmax()) for c in calls], i32),
    call_projected=torch.cat([c["projected"][0] for c in calls]).numpy(),
    call_attention_mask_len=np.array([mask_len(c) for c in calls], i32),
    call_full_kv_len=np.array([c["kv"][G][0].shape[2] for c in calls], i32),
    call_sliding_kv_len=np.array([c["kv"][L][0].shape[2] for c in calls], i32),
    round_position=np.array([r["position"] for r in drounds], i32),
    round_num_drafts=np.array([len(r["calls"]) for r in drounds], i32),
    round_accepted=np.array([r["accepted"] for r in drounds], i32),
    round_appended=np.array([r["appended"] for r in drounds], i32),
    round_target_tokens=tgt_tok,
    round_target_offset=np.concatenate(
      [[0], np.cumsum([len(r["target_argmax"]) for r in drounds])]).astype(i32),
    round_full_k=cat_kv(G, 0), round_full_v=cat_kv(G, 1), round_full_offset=offsets(G),
    round_full_visible=np.concatenate([r["calls"][0]["visible"][G] for r in drounds]),
    round_sliding_k=cat_kv(L, 0), round_sliding_v=cat_kv(L, 1),
    round_sliding_offset=offsets(L),
    round_sliding_visible=np.concatenate([r["calls"][0]["visible"][L] for r in drounds]),
    round_sliding_first_pos=np.array([r["sliding_first_pos"] for r in drounds], i32),
    round_full_stale_pos=np.array([d["full_bad"][0] if d["full_bad"] else -1 for d in diags], i32),
    f64_noise=np.array(noise), min_margin=np.array(min(margins)),
  )
  assert all(len(d["full_bad"]) <= 1 for d in diags), [d["full_bad"] for d in diags]
  np.savez(out_dir / "reference.npz", **arrays)
  sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
  row = dict(name=out_dir.name, target=target_name, head=str(arrays["head"]),
             rounds=len(drounds), accepted=[r["accepted"] for r in drounds],
             drafts=[len(r["calls"]) for r in drounds], noise=noise, margin=min(margins),
             prompt_seed=prompt_seed, sizes=sizes, calls=len(calls),
             output=out_ids[PROMPT_LEN:].tolist())
  print(json.dumps({k: v for k, v in row.items() if k != "sizes"}))
  for r, d in zip(drounds, diags, strict=True):
    vis_sl = np.nonzero(r["calls"][0]["visible"][L])[0]
    print(f"  round pos {r['position']}: drafts {[int(c['logits'].argmax()) for c in r['calls']]}"
          f" target {r['target_argmax'].tolist()} accepted {r['accepted']}; full len "
          f"{d['full_len']} stale {d['full_bad']}; sliding len {d['sliding_len']} first pos "
          f"{r['sliding_first_pos']} visible idx {vis_sl.min()}..{vis_sl.max()} "
          f"(pos {r['sliding_first_pos'] + vis_sl.min()}..{r['sliding_first_pos'] + vis_sl.max()})"
          f" full visible {int(r['calls'][0]['visible'][G].sum())}/{d['full_len']}"
          f" attn_mask_len {mask_len(r['calls'][0])}")
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
  parser.add_argument("--fixtures", type=Path, default=Path("tests/fixtures"),
                      help="where the target fixtures live")
  args = parser.parse_args()
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  torch.set_grad_enabled(False)
  rows = [row for name in TARGETS for row in build(args.fixtures, args.out, name)]
  write_readme(args.out, rows)
  for r in rows:
    print(r["name"], r["sizes"])


FIELDS = """\
Each `drafter_*` directory: `config.json` + `generation_config.json` + `model.safetensors`
(`Gemma4AssistantForCausalLM.save_pretrained`, float32; `generation_config.json` carries
`num_assistant_tokens` = K and the constant schedule) and `reference.npz` (flat arrays; C =
drafter calls, R = drafting rounds, B = target hidden 64, V = 512):

- `target` (str: the target fixture directory it pairs with), `head` (`tied` | `ordered`),
  `num_assistant_tokens` (K), `max_new_tokens`, `prompt_seed`, `weight_seed`.
- `prompt_ids` [T=28] int32; `output_ids` [T+16] int32: the assisted output, asserted equal
  to the target's plain greedy `generate` output.
- `call_round`, `call_step` [C] int32: round index (0 = the round right after prefill) and draft
  step within the round; `call_position` [C]: the drafter's `position_ids` (constant in a round,
  = cur_len - 1); `call_input_token` [C]: the token whose scaled target embedding is the first
  half of the input (identified by exact match in `embed_tokens.weight * sqrt(B)`);
  `call_inputs_embeds` [C, 2B] f32: the drafter input exactly as passed (`[embed, hidden]`);
  `call_logits` [C, V] f32: drafter logits; `call_token` [C]: their argmax (the drafted token);
  `call_projected` [C, B] f32: the drafter's `last_hidden_state` output (post_projection);
  `call_attention_mask_len`, `call_full_kv_len`, `call_sliding_kv_len` [C]: lengths of the 2D
  attention mask and of the shared K/V per type.
- `round_position` [R] (= cur_len - 1 when drafting), `round_num_drafts` [R],
  `round_accepted` [R] (n_matches), `round_appended` [R] (= accepted + 1 tokens appended);
  `round_target_tokens` (flat, split by `round_target_offset` [R+1]): argmax of the target's
  verification logits (num_drafts + 1 per round).
- Shared K/V the drafter received in each round (constant within a round), per type, as
  [len, kv_heads, head_dim] blocks concatenated over rounds: `round_full_k`, `round_full_v`
  split by `round_full_offset` [R+1] (entry i = position i), `round_sliding_k`,
  `round_sliding_v` split by `round_sliding_offset` [R+1] (entry i = position
  `round_sliding_first_pos[r] + i`). `round_full_visible`, `round_sliding_visible` (bool, same
  layout): which entries the drafter's attention mask lets the query see.
  `round_full_stale_pos` [R]: the full-K entry that is NOT the K of the final token at that
  position (the target's K for a rejected draft token), or -1.
- `f64_noise`: max|logits_f32 - logits_f64| / max|logits_f64| over all calls, re-running each
  recorded call with `copy.deepcopy(drafter).double()` on the same (upcast) inputs;
  `min_margin`: smallest top-1 minus top-2 drafter logit over all calls.
"""


def write_readme(out: Path, rows: list[dict]) -> None:
  """Describe the drafter fixtures and how they were generated."""
  pattern = "".join("L" if t == L else "G" for t in DRAFTER_LAYERS)
  lines = [
    "# Gemma 4 MTP assistant (drafter) fixtures",
    "",
    "Tiny random-weight `Gemma4AssistantForCausalLM` drafters (model_type `gemma4_assistant`;"
    f" text config: hidden {D}, 4 layers {pattern},"
    " 4 query heads, MLP 32, head dims / KV heads equal to the paired target's stored K/V, window"
    " 8, `final_logit_softcapping` 30 which the assistant forward never applies;"
    f" backbone_hidden_size 64) paired with the target fixtures `e_style` and `dense_keqv`, and"
    " a record of Hugging Face's own greedy assisted generation"
    f" (`target.generate(prompt, assistant_model=drafter, do_sample=False, max_new_tokens="
    f"{MAX_NEW})`, num_assistant_tokens K = {K}, constant schedule). `*_ordered` use"
    f" `use_ordered_embeddings=True` (num_centroids {NUM_CENTROIDS}, centroid_intermediate_top_k"
    f" {CENTROID_TOP_K}, `token_ordering` a random permutation of the vocab).",
    "",
    "Generated with the reference venv by:",
    "",
    "    .venv-ref/bin/python scripts/make_drafter_fixtures.py --out tests/fixtures",
    "",
    f"transformers {transformers.__version__}, torch {torch.__version__}, "
    f"numpy {np.__version__}, Python {sys.version.split()[0]}.",
    "",
    "Planted weights (random drafters essentially never agree with a random target): P"
    f" [{D}, 64] has orthonormal rows; `pre_projection` = [{EMB_GAIN:g} P | {HID_GAIN:g} R]"
    " (R ~ N(0, 1/64), applied to the target hidden half); the tied embedding / `lm_head` is"
    " E_target @ P^T, so the drafter is a noisy copy-the-last-token predictor. Layer weights are"
    " N(0, 1/fan_in); post-attention / post-feedforward norm scales U(0.2, 0.6), every other norm"
    " scale and `layer_scalar` U(0.5, 1.5) (none is 1); `post_projection` N(0, 1/48). Ordered"
    " head: centroid c = normalized mean `lm_head` row of its 32 tokens + N(0, 0.05). The prompt"
    " (bos + 27 ids from `torch.Generator().manual_seed(prompt_seed)`) is the first whose target"
    " continuation repeats tokens so that both drafters of a target see rejections, a partial"
    " acceptance followed by another round, and a full acceptance.",
    "",
    FIELDS,
    "| fixture | target | head | K | rounds | drafts per round | accepted per round |"
    " f32-vs-f64 noise | min margin | prompt seed |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  note = ("A round is one target verification forward preceded by drafter calls. When only one"
          " token of budget is left, HF runs a plain target step with no drafts: that step is not"
          " a round here (its token is in `output_ids`).")
  for r in rows:
    lines.append(f"| `{r['name']}` | `{r['target']}` | {r['head']} | {K} | {r['rounds']} | "
                 f"{r['drafts']} | {r['accepted']} | {r['noise']:.2e} | {r['margin']:.3f} | "
                 f"{r['prompt_seed']} |")
  lines += ["", "Output ids (after the prompt), identical to the target's plain greedy output: "
            + "; ".join(f"`{r['name']}`: {r['output']}" for r in rows[::2]) + "."]
  lines += ["", note]
  (out / "drafter_README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

"""Peak host memory and time of checkpoint loading, on a random model of >= 1 GB (float32).

  python scripts/measure_load_memory.py [--preset gemma4-31b] [--layers 6] [--embed-dim 1024]
      [--dtype bfloat16] [--dir DIR] [--no-orbax]

Writes `--preset` shrunk to `--layers` layers and `--embed-dim` width (vocabulary 262144 kept) as
random weights in three formats: an HF directory (float32 safetensors with HF names, via the
inverse of gemma/io/formats/hf.py's transforms), our converted format (float32 and `--dtype`), and
the official Orbax layout (float32, unstacked). Each load runs in a fresh subprocess that reports
its peak RSS (VmHWM in /proc/self/status), its RSS after importing jax (the baseline) and the peak
of RssAnon polled every 2 ms (VmHWM also counts file pages mapped by safetensors' mmap, which are
reclaimable page cache). Printed per format: bytes on disk, output params bytes, peak RSS,
(peak - baseline) / output, the same for anonymous memory only, and load seconds (best of
`--repeats`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def shrunk_config(preset: str, layers: int, embed_dim: int):
  from gemma.model import config as C

  base = C.get_preset(preset)
  heads = max(2, embed_dim // 128)
  return dataclasses.replace(
      base, name=f"{preset}-shrunk", num_layers=layers, embed_dim=embed_dim, num_heads=heads,
      num_kv_heads=max(1, heads // 2), num_global_kv_heads=max(1, heads // 4), head_dim=128,
      global_head_dim=256, ffn_dim=4 * embed_dim,
      layer_types=C.pattern(layers, 5 if preset == "gemma4-e2b" else 6),
      num_kv_shared_layers=min(base.num_kv_shared_layers, layers // 2),
      moe_ffn_dim=embed_dim // 2 if base.use_moe else 0)


def random_params(cfg, seed: int = 0):
  """float32 numpy leaves of abstract(cfg), scales near 1 and weights N(0, 0.02²)."""
  from gemma.model import params as P

  rng = np.random.default_rng(seed)
  tree = P.abstract(cfg)
  out = []
  for name, leaf in zip(P.leaf_names(tree), jax.tree.leaves(tree), strict=True):
    x = rng.standard_normal(leaf.shape, np.float32)
    out.append(1 + 0.1 * x if P._is_scale(name) else 0.02 * x)
  return jax.tree.unflatten(jax.tree.structure(tree), out)


def hf_config(cfg) -> dict:
  """An HF text config.json dict that `from_hf_config` reads back as `cfg`."""
  rope = {"sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local.theta},
          "full_attention": {"rope_type": cfg.rope_global.kind, "rope_theta": cfg.rope_global.theta,
                             "partial_rotary_factor": cfg.rope_global.partial_rotary_factor}}
  return dict(
      model_type="gemma4_text", vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      global_head_dim=cfg.global_head_dim, num_global_key_value_heads=cfg.num_global_kv_heads,
      attention_k_eq_v=cfg.k_eq_v, intermediate_size=cfg.ffn_dim,
      layer_types=[t.value for t in cfg.layer_types], sliding_window=cfg.sliding_window,
      rope_parameters=rope, num_kv_shared_layers=cfg.num_kv_shared_layers,
      use_double_wide_mlp=cfg.double_wide_mlp, hidden_size_per_layer_input=cfg.ple_dim,
      vocab_size_per_layer_input=cfg.ple_vocab_size, enable_moe_block=cfg.use_moe,
      num_experts=cfg.num_experts or None, top_k_experts=cfg.top_k_experts or None,
      moe_intermediate_size=cfg.moe_ffn_dim or None, final_logit_softcapping=cfg.final_softcap,
      rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_position_embeddings,
      eos_token_id=list(cfg.eos_ids))


def hf_tensors(cfg, p) -> dict[str, np.ndarray]:
  """Our params under Gemma4ForCausalLM names, in nn.Linear [out, in] layout."""
  def lin(w):  # [in, ...out axes] -> [out, in]
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)

  t = {"model.embed_tokens.weight": p.embed, "model.norm.weight": p.final_norm}
  if p.ple_embed is not None:
    t["model.embed_tokens_per_layer.weight"] = p.ple_embed.reshape(p.ple_embed.shape[0], -1)
    t["model.per_layer_model_projection.weight"] = lin(p.ple_proj)
    t["model.per_layer_projection_norm.weight"] = p.ple_norm
  for i, ly in enumerate(p.layers):
    pre = f"model.layers.{i}."
    t |= {pre + "input_layernorm.weight": ly.attn_pre_norm,
          pre + "post_attention_layernorm.weight": ly.attn_post_norm,
          pre + "pre_feedforward_layernorm.weight": ly.mlp_pre_norm,
          pre + "post_feedforward_layernorm.weight": ly.mlp_post_norm,
          pre + "self_attn.q_proj.weight": lin(ly.attn.q),
          pre + "self_attn.o_proj.weight": np.ascontiguousarray(
              ly.attn.o.reshape(-1, ly.attn.o.shape[-1]).T),
          pre + "self_attn.q_norm.weight": ly.attn.q_norm,
          pre + "mlp.gate_proj.weight": lin(ly.mlp.gate),
          pre + "mlp.up_proj.weight": lin(ly.mlp.up),
          pre + "mlp.down_proj.weight": lin(ly.mlp.down)}
    for ours, theirs in (("k", "k_proj"), ("v", "v_proj")):
      if getattr(ly.attn, ours) is not None:
        t[pre + f"self_attn.{theirs}.weight"] = lin(getattr(ly.attn, ours))
    if ly.attn.k_norm is not None:
      t[pre + "self_attn.k_norm.weight"] = ly.attn.k_norm
    if ly.scalar is not None:
      t[pre + "layer_scalar"] = ly.scalar
    if ly.ple is not None:
      t |= {pre + "per_layer_input_gate.weight": lin(ly.ple.gate),
            pre + "per_layer_projection.weight": lin(ly.ple.proj),
            pre + "post_per_layer_input_norm.weight": ly.ple.norm}
    if ly.moe is not None:
      m = ly.moe
      t |= {pre + "router.proj.weight": lin(m.router), pre + "router.scale": m.router_scale,
            pre + "router.per_expert_scale": m.expert_scale,
            pre + "experts.gate_up_proj": np.concatenate(
                [np.swapaxes(m.gate, 1, 2), np.swapaxes(m.up, 1, 2)], axis=1),
            pre + "experts.down_proj": np.ascontiguousarray(np.swapaxes(m.down, 1, 2)),
            pre + "pre_feedforward_layernorm_2.weight": m.pre_norm,
            pre + "post_feedforward_layernorm_1.weight": m.dense_post_norm,
            pre + "post_feedforward_layernorm_2.weight": m.post_norm}
  return t


def dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_all(cfg, out: Path, dtype: str, orbax: bool) -> dict[str, Path]:
  from safetensors.numpy import save_file

  from gemma.io.formats import converted
  from gemma.io.formats.hf_config import from_hf_config
  from gemma.model.params import abstract

  params = random_params(cfg)
  hf = out / "hf"
  hf.mkdir(parents=True)
  (hf / "config.json").write_text(json.dumps(hf_config(cfg)))
  back = from_hf_config(json.loads((hf / "config.json").read_text()))
  assert abstract(back) == abstract(cfg), "HF config does not read back to the same shapes"
  t0 = time.perf_counter()
  save_file(hf_tensors(cfg, params), str(hf / "model.safetensors"))
  print(f"wrote HF safetensors in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  paths = {"hf": hf}
  for dt in ("float32", dtype):
    name = f"converted-{'f32' if dt == 'float32' else dt}"
    if name not in paths:
      cast = jax_cast(params, jnp.dtype(dt))
      paths[name] = converted.save_converted(out / name, back, cast)
  if orbax:
    from tests.orbax_synth import write_official

    paths["orbax-official"] = write_official(out / "orbax", cfg, params)
  return paths


def jax_cast(params, dtype):
  return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


CHILD = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
def status():
  out = {{}}
  for line in open("/proc/self/status"):
    k, v = line.split(":", 1)
    if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
      out[k] = int(v.split()[0]) * 1024
  return out
import threading
peak_anon = [0]
def poll():
  while True:
    peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
    time.sleep(0.002)
jnp.zeros(1).block_until_ready()
from gemma.io import checkpoint
from gemma.io.formats import converted, orbax_official
base, base_anon = status()["VmRSS"], status()["RssAnon"]
threading.Thread(target=poll, daemon=True).start()
kind, path, dtype = {kind!r}, {path!r}, jnp.dtype({dtype!r})
t0 = time.perf_counter()
if kind == "hf":
  cfg, p = checkpoint.load(path, dtype)
elif kind.startswith("converted"):
  cfg, p = converted.load(path, dtype)
else:
  cfg, p = orbax_official.load(path, dtype, cfg=converted.read_config(
      __import__("pathlib").Path({conv!r})))
jax.block_until_ready(p)
secs = time.perf_counter() - t0
out_bytes = sum(x.nbytes for x in jax.tree.leaves(p))
print(json.dumps(dict(base=base, base_anon=base_anon, peak_anon=peak_anon[0], secs=secs,
                      out=out_bytes, **status())))
"""


def measure(kind: str, path: Path, dtype: str, conv: Path) -> dict:
  code = CHILD.format(root=str(ROOT), kind=kind, path=str(path), dtype=dtype, conv=str(conv))
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"{kind} load failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="gemma4-31b")
  ap.add_argument("--layers", type=int, default=6)
  ap.add_argument("--embed-dim", type=int, default=1024)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
  ap.add_argument("--repeats", type=int, default=2, help="loads per format (best time shown)")
  ap.add_argument("--no-orbax", action="store_true", help="skip the official Orbax layout")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cfg = shrunk_config(args.preset, args.layers, args.embed_dim)
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    paths = write_all(cfg, Path(tmp), args.dtype, orbax=not args.no_orbax)
    conv = paths["converted-f32"]
    print(f"model {cfg.name}: {cfg.num_layers} layers, D={cfg.embed_dim}, V={cfg.vocab_size}; "
          f"load dtype {args.dtype}")
    print(f"{'format':<20}{'disk GB':>8}{'out GB':>7}{'base GB':>8}{'peak GB':>8}"
          f"{'peak/out':>9}{'(peak-base)/out':>16}{'anon (peak-base)/out':>21}{'load s':>7}")
    for kind, path in paths.items():
      runs = [measure(kind, path, args.dtype, conv) for _ in range(args.repeats)]
      r = min(runs, key=lambda x: x["secs"])
      peak, base = max(x["VmHWM"] for x in runs), min(x["base"] for x in runs)
      anon = max(x["peak_anon"] - x["base_anon"] for x in runs)
      print(f"{kind:<20}{dir_bytes(path) / 1e9:>8.3f}{r['out'] / 1e9:>7.3f}{base / 1e9:>8.3f}"
            f"{peak / 1e9:>8.3f}{peak / r['out']:>9.2f}{(peak - base) / r['out']:>16.2f}"
            f"{anon / r['out']:>21.2f}{r['secs']:>7.2f}", flush=True)


if __name__ == "__main__":
  main()

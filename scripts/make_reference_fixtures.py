"""Generate tiny random-weight Gemma 4 parity fixtures with the Hugging Face reference.

Builds three tiny ``Gemma4ForCausalLM`` models (eager attention), one per structural
family (``e_style``, ``dense_keqv``, ``moe``), and writes to ``<out>/<name>/`` the float32
``config.json`` + ``model.safetensors`` (``save_pretrained``) and ``reference.npz``
(prompt ids, prompt logits, 8 greedy ids from repeated no-cache forwards, logits over
prompt + greedy ids, min top-1/top-2 margin, seed; fields listed in the README).

Reference numbers come from ``copy.deepcopy(model).double()`` (the MoE copy runs the
``eager`` experts loop: ``grouped_mm`` has no float64 kernel). Every norm scale,
``layer_scalar`` and router scale is moved away from 1 so convention bugs cannot hide.

Run with the reference venv (torch + transformers >= 5.23)::

    python scripts/make_reference_fixtures.py --out tests/fixtures
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
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

VOCAB = 512
PROMPT_LEN = 28
N_GREEDY = 8
MIN_MARGIN = 5e-3
MIN_DISTINCT = 6  # distinct ids among the greedy tokens: rejects copy/repeat loops
MAX_NOISE = 2e-5  # max|f32 - f64| / max|f64| of the reference itself, on prompt + greedy
MAX_SEEDS = 64
ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25
    },
}
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_attention_heads=4,
    sliding_window=8, rope_parameters=ROPE, final_logit_softcapping=30.0,
    tie_word_embeddings=True, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
    bos_token_id=2, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=4096,
)
L, G = "sliding_attention", "full_attention"
FIXTURES = {
    # E2B/E4B-style: PLE, KV sharing (layers 6-9 reuse: sliding <- 5, full <- 4),
    # double-wide MLP on the shared layers, 4:1 pattern, GQA, no k_eq_v.
    "e_style": dict(
        num_hidden_layers=10, layer_types=[L, L, L, L, G] * 2, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, attention_k_eq_v=False,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=4, use_double_wide_mlp=True,
    ),
    # 31B-style: 5:1 pattern (+ forced-full last layer), k_eq_v full layers with their own
    # KV-head count and head_dim.
    "dense_keqv": dict(
        num_hidden_layers=7, layer_types=[L, L, L, L, L, G, G], num_key_value_heads=2,
        num_global_key_value_heads=1, head_dim=32, global_head_dim=64, attention_k_eq_v=True,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0,
    ),
    # 26B-A4B-style: MoE block (8 experts, top-2) plus the dense shared MLP, k_eq_v.
    "moe": dict(
        num_hidden_layers=6, layer_types=[L, L, L, L, L, G], num_key_value_heads=2,
        num_global_key_value_heads=1, head_dim=16, global_head_dim=32, attention_k_eq_v=True,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
    ),
}
# Flat kwargs that Gemma4TextConfig pops into `per_layer_config` instead of storing.
POPPED = ("global_head_dim", "num_global_key_value_heads")


def make_config(name: str) -> Gemma4TextConfig:
    """Tiny text config for fixture ``name`` (eager attention)."""
    kwargs = {**COMMON, **FIXTURES[name]}
    return Gemma4TextConfig(**copy.deepcopy(kwargs), attn_implementation="eager")


@torch.no_grad()
def randomize(model: Gemma4ForCausalLM, seed: int) -> None:
    """Re-draw every weight with non-degenerate scales and perturb all unit defaults."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std)

    def uniform(t: torch.Tensor, lo: float = 0.5, hi: float = 1.5) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64))

    for name, p in model.named_parameters():  # tied lm_head is yielded once (as embed_tokens)
        if name.endswith("embed_tokens.weight"):
            # Small enough that the residual stream is not dominated by the token's own
            # embedding (with tied weights that makes greedy decoding copy its input).
            normal(p, 0.15)
        elif name == "model.norm.weight":
            uniform(p, 2.0, 4.0)  # acts as a temperature: logits std ~ 0.15 * 8 * 3 ~ 3.5
        elif name.endswith("embed_tokens_per_layer.weight"):
            normal(p, 0.25)
        elif name.endswith("router.proj.weight"):
            normal(p, 2.0)  # router input has rms ~ D**-0.5: decisive routing
        elif p.ndim >= 2:
            normal(p, p.shape[-1] ** -0.5)  # Linear [out, in] and experts [E, out, in]
        else:  # every RMSNorm scale, router.scale, router.per_expert_scale
            uniform(p)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            uniform(b)


def make_prompt(name: str) -> torch.Tensor:
    """Fixed prompt: bos followed by ids in [3, VOCAB), drawn from a per-fixture seed."""
    gen = torch.Generator().manual_seed(1000 + sorted(FIXTURES).index(name))
    body = torch.randint(3, VOCAB, (PROMPT_LEN - 1,), generator=gen)
    return torch.cat([torch.tensor([2]), body])


@torch.no_grad()
def forward(model: Gemma4ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Full forward, no cache; returns logits [T, V] as float64."""
    return model(input_ids=ids[None], use_cache=False).logits[0].double()


@torch.no_grad()
def greedy(model: Gemma4ForCausalLM, prompt: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Greedy continuation by repeated full forwards; returns (new ids, min top-2 margin)."""
    ids, margins = prompt.clone(), []
    for _ in range(N_GREEDY):
        last = forward(model, ids)[-1]
        top2 = last.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        ids = torch.cat([ids, last.argmax()[None]])
    return ids[len(prompt):], min(margins)


def make_reference(model: Gemma4ForCausalLM) -> tuple[Gemma4ForCausalLM, str]:
    """Float64 copy of ``model``; MoE experts use the eager loop (grouped_mm has no f64)."""
    ref = copy.deepcopy(model).double().eval()
    if not model.config.enable_moe_block:
        return ref, "n/a"
    ref.set_experts_implementation("eager")
    return ref, str(ref.config._experts_implementation)


def check_saved_config(out_dir: Path, config: Gemma4TextConfig) -> None:
    """Assert that config.json round-trips the structural fields we intended."""
    saved = json.loads((out_dir / "config.json").read_text())
    spec = {**COMMON, **FIXTURES[out_dir.name]}
    for key, value in spec.items():
        assert key in POPPED or saved.get(key) == value, f"{key}: {saved.get(key)} != {value}"
    fulls = [i for i, t in enumerate(spec["layer_types"]) if t == G]
    plc = {int(k): v for k, v in saved["per_layer_config"].items()}
    assert sorted(plc) == fulls, plc
    for v in plc.values():
        assert v["head_dim"] == spec["global_head_dim"], v
        if spec["attention_k_eq_v"]:
            assert v["num_key_value_heads"] == spec["num_global_key_value_heads"], v
        else:
            assert "num_key_value_heads" not in v, v


def build_fixture(name: str, out_dir: Path) -> dict:
    """Pick a seed with a safe greedy margin, save model + reference.npz, return a summary."""
    config = make_config(name)
    prompt = make_prompt(name)
    for seed in range(MAX_SEEDS):
        torch.manual_seed(seed)
        model = Gemma4ForCausalLM(config).eval()
        randomize(model, seed)
        ref, experts_impl = make_reference(model)
        greedy_ids, margin = greedy(ref, prompt)
        full_ids = torch.cat([prompt, greedy_ids])
        full64 = forward(ref, full_ids)
        noise = float((forward(model, full_ids) - full64).abs().max() / full64.abs().max())
        print(f"[{name}] seed {seed}: min_margin {margin:.3e}, f32 noise {noise:.2e}, "
              f"greedy {greedy_ids.tolist()}")
        distinct = len(set(greedy_ids.tolist()))
        if margin >= MIN_MARGIN and distinct >= MIN_DISTINCT and noise <= MAX_NOISE:
            break
    else:
        raise RuntimeError(f"{name}: no seed < {MAX_SEEDS} gave a usable fixture")

    logits64 = forward(ref, prompt)
    assert torch.allclose(full64[: len(prompt)], logits64, atol=1e-9, rtol=0)
    assert torch.equal(full64[len(prompt) - 1 : -1].argmax(-1), greedy_ids)
    logits32 = forward(model, prompt)
    greedy32, _ = greedy(model, prompt)
    assert torch.equal(greedy32, greedy_ids), "float32 greedy path differs from float64"

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    check_saved_config(out_dir, config)
    reloaded = Gemma4ForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # Not bit-exact: safetensors mmaps tensors at 4-byte-aligned offsets, which changes the
    # CPU BLAS summation order (re-cloned parameters give identical logits).
    reload_diff = float((forward(reloaded, prompt) - logits32).abs().max() / logits32.abs().max())
    assert reload_diff <= 1e-5, f"{name}: reload changed logits by {reload_diff:.2e} (rel)"

    ref_dtype = str(ref.dtype).removeprefix("torch.")
    # The reference's own bfloat16 logits: the yardstick for a bfloat16 reimplementation.
    logits_bf16 = forward(copy.deepcopy(model).to(torch.bfloat16), prompt).float()
    np.savez(
        out_dir / "reference.npz",
        prompt_ids=prompt.numpy().astype(np.int32),
        logits=logits64.numpy(),
        greedy_ids=greedy_ids.numpy().astype(np.int32),
        full_logits=full64.numpy(),
        logits_bf16=logits_bf16.numpy().astype(np.float32),
        reference_dtype=np.array(ref_dtype),
        experts_implementation=np.array(experts_impl),
        min_margin=np.array(margin, dtype=np.float64),
        seed=np.array(seed, dtype=np.int32),
    )
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return dict(name=name, seed=seed, margin=margin, noise=noise, reload=reload_diff,
                ref_dtype=ref_dtype, experts=experts_impl, logit_std=float(logits64.std()),
                sizes=sizes, greedy=greedy_ids.tolist())


def write_readme(out: Path, rows: list[dict]) -> None:
    """Describe the fixtures and how they were generated."""
    desc = {
        "e_style": "E2B/E4B-style: 10 layers 4:1, PLE (P=16), KV sharing on layers 6-9 "
        "(sliding reuse layer 5, full reuse layer 4), double-wide MLP on those layers, "
        "GQA 4q/2kv, head_dim 16 / global 32, no k_eq_v.",
        "dense_keqv": "31B-style: 7 layers LLLLLGG, k_eq_v full layers with 1 KV head "
        "(2 on sliding), head_dim 32 / global 64, no PLE, no KV sharing.",
        "moe": "26B-A4B-style: 6 layers LLLLLG, MoE (8 experts, top-2, expert I=16) + dense "
        "shared MLP (F=64), k_eq_v full layer (1 KV head vs 2), head_dim 16 / global 32, no PLE.",
    }
    venv = ".venv-ref"
    lines = [
        "# Gemma 4 reference fixtures",
        "",
        "Tiny random-weight `Gemma4ForCausalLM` models (hidden 64, 4 heads, MLP 64, vocab 512, "
        "window 8, final soft-cap 30, tied embeddings, eager attention) with reference logits "
        "from Hugging Face transformers. Linear weights ~ N(0, 1/fan_in), embeddings N(0, 0.15), "
        "router proj N(0, 2); every norm scale, `layer_scalar`, `router.scale` and "
        "`router.per_expert_scale` ~ U(0.5, 1.5), final norm ~ U(2, 4): none is left at 1.",
        "",
        f"Generated with a reference venv ({venv}: transformers and torch, versions below) by:",
        "",
        f"    {venv}/bin/python scripts/make_reference_fixtures.py --out tests/fixtures",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"numpy {np.__version__}, Python {sys.version.split()[0]}.",
        "",
        "Each directory: `config.json` + `model.safetensors` (float32, `save_pretrained`), "
        "`reference.npz`: `prompt_ids` [T] int32, `logits` [T, V] (prompt forward, after "
        "soft-cap), `greedy_ids` [8] int32 (greedy, full re-forward per step, no cache), "
        "`full_logits` [T+8, V] (one forward over prompt + greedy ids), `logits_bf16` [T, V] "
        "(the reference run in bfloat16 over the prompt), `reference_dtype`, "
        "`experts_implementation`, `min_margin` (smallest top-1 minus top-2 gap on the greedy "
        "steps), `seed`.",
        "",
        "Reference numbers come from `copy.deepcopy(model).double()`. The HF float64 path still "
        "does RMSNorm, RoPE cos/sin and the attention / router softmax in float32, so it is not "
        "exact float64: with those ops patched to float64 the logits move by ~4e-6 relative.",
        "",
        "| fixture | family | seed | min_margin | f32-vs-f64 noise | ref dtype | greedy_ids |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['name']}` | {desc[r['name']]} | {r['seed']} | {r['margin']:.3e} | "
                     f"{r['noise']:.2e} | {r['ref_dtype']} (experts: {r['experts']}) | "
                     f"{r['greedy']} |")
    lines += ["", "Noise = max|logits_f32 - logits_f64| / max|logits_f64| of the reference "
              "itself over prompt + greedy ids. Seeds are the first that give min_margin >= "
              f"{MIN_MARGIN:g}, >= {MIN_DISTINCT} distinct greedy ids and noise <= {MAX_NOISE:g}."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURES), help="subset to build")
    args = parser.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    rows = [build_fixture(name, args.out / name) for name in (args.only or FIXTURES)]
    if not args.only:
        write_readme(args.out, rows)

    cols = "fixture seed min_margin noise logit_std reload ref experts KiB".split()
    print("\n" + " ".join(f"{c:>11}" for c in cols))
    for r in rows:
        vals = (r["name"], r["seed"], f"{r['margin']:.3e}", f"{r['noise']:.2e}",
                f"{r['logit_std']:.3f}", f"{r['reload']:.1e}", r["ref_dtype"], r["experts"],
                f"{sum(r['sizes'].values()) / 1024:.1f}")
        print(" ".join(f"{v:>11}" for v in vals))
    total = sum(sum(r["sizes"].values()) for r in rows) / 2**20
    print(f"total {total:.2f} MiB; files: " + json.dumps({r["name"]: r["sizes"] for r in rows}))


if __name__ == "__main__":
    main()

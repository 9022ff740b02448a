"""KV cache width (`--kv-quant`): bf16 vs TurboQuant at every width of `gemma.kv.quant.WIDTHS`,
float weights. The reference is the same model with a bf16 cache, so bf16 has KL 0.
"""

from configs.experiment import EvalPoint, Experiment, Plot, grid
from gemma.kv.quant import WIDTHS


def get_config() -> Experiment:
  return Experiment(
      name="kv_width", kind="eval", base=EvalPoint(method=None),
      description="KV cache widths, float weights, against the bf16 cache",
      points=grid("{kv_quant}", kv_quant=("bf16", *WIDTHS)),
      reference_kv_quant="bf16",
      max_tokens=1023,  # one run in ~5 min on 2 CPU cores (the cached forward is slower)
      plots=(Plot("perplexity", "kv_bits_per_channel", logy=True),
             Plot("mean_kl", "kv_bits_per_channel", logy=True),
             Plot("top1_agreement", "kv_bits_per_channel")))

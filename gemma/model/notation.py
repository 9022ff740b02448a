"""Axis letters used in every einsum string and shape comment of this package.

  B  batch                      T  query positions of this call
  S  key/value positions (cache slots, or T without a cache)
  D  model width (embed_dim)    V  vocabulary
  N  query heads                K  key/value heads           G  query heads per KV head (N/K)
  H  head dim of the layer      F  FFN hidden width           L  layers
  P  per-layer-embedding width  E  experts                    I  expert FFN width
  A  token-expert assignments (B*T*top_k)

Weights are stored in math layout, `y = x @ W` (inputs first): q `[D, N, H]`, o `[N, H, D]`,
gate/up `[D, F]`, down `[F, D]`, embeddings `[V, D]`.
"""

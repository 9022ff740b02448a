"""SentencePiece tokenizer of a checkpoint directory (no jax)."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
  """Thin wrapper over a SentencePiece model: `encode` adds <bos> unless told not to."""

  def __init__(self, model_file: str | Path, bos_id: int = 2):
    import sentencepiece as spm

    self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
    self.bos_id = bos_id

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = list(self.sp.encode(text))
    return [self.bos_id, *ids] if add_bos else ids

  def decode(self, ids: list[int]) -> str:
    return self.sp.decode(list(ids))


def load_tokenizer(checkpoint: str | Path) -> Tokenizer:
  path = Path(checkpoint) / "tokenizer.model"
  if not path.exists():
    raise FileNotFoundError(f"{checkpoint} has no tokenizer.model: pass --prompt-ids instead")
  return Tokenizer(path)

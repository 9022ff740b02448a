"""Tokenizers (no jax): SentencePiece `tokenizer.model`, a SentencePiece model rebuilt from GGUF
metadata, or Hugging Face `tokenizer.json` when that is all a checkpoint has.

All expose one small interface: `encode(text, add_bos)`, `decode(ids)`, `piece_to_id(piece)`,
`vocab_size`, `bos_id`, `eos_id`. Special tokens such as `<|turn>` are never parsed out of text:
chat rendering (gemma/inference/chat.py) inserts their ids directly.
"""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
  """A SentencePiece tokenizer: `encode` adds <bos> unless told not to."""

  def __init__(self, processor, source: str):
    self.sp = processor
    self.source = source

  @classmethod
  def from_file(cls, model_file: str | Path) -> Tokenizer:
    import sentencepiece as spm

    try:
      return cls(spm.SentencePieceProcessor(model_file=str(model_file)), str(model_file))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError on bad files
      raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from None

  @classmethod
  def from_proto(cls, proto: bytes, source: str) -> Tokenizer:
    import sentencepiece as spm

    return cls(spm.SentencePieceProcessor(model_proto=proto), source)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  def piece_to_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = list(self.sp.encode(text))
    return [self.bos_id, *ids] if add_bos else ids

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (via the `tokenizers` library)."""

  def __init__(self, path: str | Path, bos: str = "<bos>", eos: str = "<eos>"):
    from tokenizers import Tokenizer as HFTok

    try:
      self.tok = HFTok.from_file(str(path))
    except Exception as e:
      raise ValueError(f"{path}: not a tokenizer.json ({e})") from None
    self.source = str(path)
    self.bos_id = self.tok.token_to_id(bos)
    self.eos_id = self.tok.token_to_id(eos)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def piece_to_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id, *ids] if add_bos and self.bos_id is not None else list(ids)

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

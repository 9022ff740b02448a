"""A SentencePiece tokenizer rebuilt from a GGUF file's metadata (no jax, nothing on disk).

llama.cpp stores a SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) as three arrays
(`tokenizer.ggml.tokens`, `scores`, `token_type`; the types are SentencePiece's piece types) plus
the special ids. We rebuild the `ModelProto` Gemma's `tokenizer.model` has: BPE merged by score,
byte fallback (`<0x00>`..`<0xFF>`), identity normalizer, no dummy prefix, whitespace kept as is
(escaped to `▁`), digits split. Two things the file spells differently are put back:
  * pieces made only of spaces (Gemma's whitespace runs, ids 138-167) are stored with literal
    spaces; SentencePiece matches them as `▁` runs;
  * the unknown piece is typed CONTROL in the file; SentencePiece needs it typed UNKNOWN.
Everything else (scores, the CONTROL type of `<unusedN>`) is kept as the file has it.
"""

from __future__ import annotations

from pathlib import Path

from gemma.io.formats.gguf import GGUFFile
from gemma.io.tokenizer import Tokenizer

SPACE = "\u2581"  # SentencePiece's whitespace symbol
UNKNOWN = 2  # SentencePiece / gguf.TokenType piece types: 1 normal, 2 unknown, 3 control, ...


def model_proto_from_gguf(f: GGUFFile) -> bytes:
  """The serialized SentencePiece ModelProto described by a parsed GGUF file's metadata."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  kind = f.get("tokenizer.ggml.model", None)
  if kind != "llama":
    raise NotImplementedError(
        f"{f.path}: tokenizer.ggml.model {kind!r}: only SentencePiece vocabularies ('llama', as "
        "in Gemma 3 GGUF files) can be rebuilt; Gemma 4 files ('gemma4') carry BPE merges")
  tokens = f.get("tokenizer.ggml.tokens")
  scores = f.get("tokenizer.ggml.scores", None)
  types = f.get("tokenizer.ggml.token_type", None)
  n = len(tokens)
  if scores is None or types is None or len(scores) != n or len(types) != n:
    raise ValueError(f"{f.path}: tokenizer metadata needs tokens, scores and token_type of "
                     "equal length")
  special = {key: int(f.get(f"tokenizer.ggml.{key}_token_id", default))
             for key, default in (("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0))}
  if any(not 0 <= i < n for i in special.values()):
    raise ValueError(f"{f.path}: special token ids {special} outside the vocabulary of {n}")
  m = pb.ModelProto()
  for i, (piece, score, kind_) in enumerate(zip(tokens, scores.tolist(), types.tolist(),
                                               strict=True)):
    p = m.pieces.add()
    p.piece = SPACE * len(piece) if piece and not piece.strip(" ") else piece
    p.score = score
    p.type = UNKNOWN if i == special["unknown"] else int(kind_)
  t = m.trainer_spec
  t.model_type = pb.TrainerSpec.BPE
  t.vocab_size = n
  t.byte_fallback = True
  t.split_digits = True
  t.allow_whitespace_only_pieces = True
  t.unk_id, t.bos_id, t.eos_id, t.pad_id = (special[k] for k in
                                            ("unknown", "bos", "eos", "padding"))
  # SentencePieceProcessor.bos_id() & co. look the ids up by these piece names
  t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = (tokens[special[k]] for k in
                                                        ("unknown", "bos", "eos", "padding"))
  norm = m.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", False))
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return m.SerializeToString()


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
  """The Tokenizer of a GGUF file (Gemma 3 `llama` vocabulary), built in memory."""
  f = GGUFFile(path)
  return Tokenizer.from_proto(model_proto_from_gguf(f), source=f"{path} (GGUF metadata)")

"""Trains the small SentencePiece tokenizer of configs/finetune_tiny.py (data/tiny_tokenizer.model).

  .venv/bin/python scripts/make_tiny_tokenizer.py [--vocab 512] [--out data/tiny_tokenizer.model]

BPE with byte fallback on data/alice_in_wonderland.txt and data/finetune_tiny.jsonl, Gemma ids
(pad 0, eos 1, bos 2, unk 3) and the Gemma 4 chat specials, so `gemma.inference.chat` formats for
it.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<mask>", "<|think|>", "<|channel>", "<channel|>", "<|turn>", "<turn|>"]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--vocab", type=int, default=512)
  ap.add_argument("--out", default=str(ROOT / "data" / "tiny_tokenizer.model"))
  args = ap.parse_args(argv)
  lines = (ROOT / "data" / "alice_in_wonderland.txt").read_text(encoding="utf-8").splitlines()
  for line in (ROOT / "data" / "finetune_tiny.jsonl").read_text(encoding="utf-8").splitlines():
    record = json.loads(line)
    lines += [m["content"] for m in record.get("messages", [])]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([x for x in lines if x.strip()]), model_writer=model,
      vocab_size=args.vocab, model_type="bpe", normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2,
      unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=SPECIALS, byte_fallback=True, num_threads=1, minloglevel=2)
  Path(args.out).write_bytes(model.getvalue())
  print(f"wrote {args.out} ({len(model.getvalue())} bytes, vocab {args.vocab})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

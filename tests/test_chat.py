"""Tokenizers (SentencePiece, tokenizer.json) and chat prompts in the documented formats."""

import io
import random

import pytest

from gemma.inference import chat
from gemma.inference.chat import Message
from gemma.io.checkpoint import load_tokenizer
from gemma.io.tokenizer import HFTokenizer, Tokenizer

GEMMA4_SPECIALS = ["<mask>", "<|think|>", "<|channel>", "<channel|>", "<|turn>", "<turn|>"]
GEMMA3_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
_rng = random.Random(0)
_WORDS = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(2, 9)))
          for _ in range(3000)]
TEXT = ["The quick brown fox jumps over the lazy dog.", "Gemma runs in JAX on one GPU.",
        "user model system turn thought", "Numbers 12345 and symbols !?%", "héllo wörld"] * 20 + [
            " ".join(_rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
VOCAB = 512  # the e_style fixture model's vocabulary


def _sentencepiece(specials) -> bytes:
  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT), model_writer=model, vocab_size=VOCAB, model_type="bpe",
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
      bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=specials,
      byte_fallback=True, minloglevel=2)
  return model.getvalue()


@pytest.fixture(scope="module")
def tok4():
  return Tokenizer.from_proto(_sentencepiece(GEMMA4_SPECIALS), "test-gemma4")


@pytest.fixture(scope="module")
def tok3():
  return Tokenizer.from_proto(_sentencepiece(GEMMA3_SPECIALS), "test-gemma3")


@pytest.mark.parametrize("text", ["hello world", "  two  spaces", "ünïcödé ✓ 🙂", "a\nb\tc", ""])
def test_round_trip(tok4, text):
  ids = tok4.encode(text)
  assert ids[:1] == [2] and tok4.decode(ids[1:]) == text
  assert tok4.encode(text, add_bos=False) == ids[1:]


def test_special_ids(tok4):
  assert (tok4.bos_id, tok4.eos_id, tok4.vocab_size) == (2, 1, VOCAB)
  assert tok4.piece_to_id("<|turn>") is not None and tok4.piece_to_id("<nope>") is None


def test_gemma4_chat_format(tok4):
  msgs = [Message("system", "Be brief."), Message("user", "Hi"), Message("model", "Hello!"),
          Message("user", "Who are you?")]
  template = chat.template_for(tok4)
  assert template.name == "gemma4"
  assert chat.to_text(template.render(msgs)) == (
      "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
      "<|turn>model\nHello!<turn|>\n<|turn>user\nWho are you?<turn|>\n"
      "<|turn>model\n<|channel>thought\n<channel|>")
  assert chat.to_text(template.render(msgs[1:2], thinking=True)) == (
      "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
  assert chat.to_text(template.render(msgs[:2], thinking=True)).startswith(
      "<bos><|turn>system\n<|think|>Be brief.<turn|>\n")


def test_gemma3_chat_format(tok3):
  msgs = [Message("system", "Be brief."), Message("user", "Hi")]
  template = chat.template_for(tok3)
  assert template.name == "gemma3"
  assert chat.to_text(template.render(msgs)) == (
      "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
  with pytest.raises(ValueError, match="thinking"):
    template.render(msgs, thinking=True)


def test_chat_ids_insert_specials_by_id(tok4):
  msgs = [Message("system", "Be brief."), Message("user", "Hi there")]
  ids = chat.chat_prompt(tok4, msgs)
  assert ids[:2] == [2, tok4.piece_to_id("<|turn>")]
  # same ids as tokenizing the rendered text (the specials here are user-defined pieces)
  text = chat.to_text(chat.template_for(tok4).render(msgs))
  assert ids == tok4.encode(text[len("<bos>"):])
  assert chat.stop_ids(tok4) == (1, tok4.piece_to_id("<turn|>"))


def test_bad_role():
  with pytest.raises(ValueError, match="unknown chat role"):
    Message("assistant", "x")


def test_tokenizer_json(tmp_path, tok4):
  from tokenizers import Tokenizer as HFTok
  from tokenizers import models, pre_tokenizers

  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "hello": 4, "world": 5, "<|turn>": 6}
  hf = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.save(str(tmp_path / "tokenizer.json"))
  tok = load_tokenizer(tmp_path)
  assert isinstance(tok, HFTokenizer)
  assert tok.encode("hello world") == [2, 4, 5] and tok.piece_to_id("<|turn>") == 6
  (tmp_path / "tokenizer.model").write_bytes(_sentencepiece(GEMMA4_SPECIALS))
  assert isinstance(load_tokenizer(tmp_path), Tokenizer)  # tokenizer.model wins


def test_missing_or_bad_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError, match="--prompt-ids"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.model").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    load_tokenizer(tmp_path)

"""Tokenizer metadata of an exported GGUF file (gemma/io/formats/gguf_export.py).

llama.cpp's SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`): the pieces, their scores
and their types (SentencePiece's piece types, which `gguf.TokenType` numbers the same way), the
special ids, `add_bos_token` / `add_space_prefix`, and a chat template. This is what
`gemma/io/tokenizer_gguf.py` rebuilds a `ModelProto` from, and what llama.cpp's converter writes
for Gemma (`_set_vocab_sentencepiece`).

Sources, in order:
  * a GGUF file: its `tokenizer.*` keys are copied (typed as llama.cpp reads them);
  * a SentencePiece model (`Tokenizer`, a `tokenizer.model` file, or a directory holding one):
    pieces, scores and types from its ModelProto; the chat template from the directory's
    `chat_template.jinja` / `tokenizer_config.json`, else the Gemma 3 or Gemma 4 template
    below, chosen by the turn markers in the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemma.io.formats.gguf_file import GGUFFile, is_gguf

# keys copied from a GGUF source, and the writer method that types each as llama.cpp reads it
_COPIED = {
    "tokenizer.ggml.model": "add_tokenizer_model",
    "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.tokens": "add_token_list",
    "tokenizer.ggml.scores": "add_token_scores",
    "tokenizer.ggml.token_type": "add_token_types",
    "tokenizer.ggml.merges": "add_token_merges",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id",
    "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.ggml.unknown_token_id": "add_unk_token_id",
    "tokenizer.ggml.padding_token_id": "add_pad_token_id",
    "tokenizer.ggml.seperator_token_id": "add_sep_token_id",
    "tokenizer.ggml.mask_token_id": "add_mask_token_id",
    "tokenizer.ggml.eot_token_id": "add_eot_token_id",
    "tokenizer.ggml.eom_token_id": "add_eom_token_id",
    "tokenizer.ggml.add_bos_token": "add_add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_add_eos_token",
    "tokenizer.ggml.add_sep_token": "add_add_sep_token",
    "tokenizer.ggml.add_space_prefix": "add_add_space_prefix",
    "tokenizer.chat_template": "add_chat_template",
}
END_OF_TURN = ("<end_of_turn>", "<turn|>")
UNUSED = 5  # gguf.TokenType.UNUSED (SentencePiece's piece type numbering)

# Gemma 3's released template (text only): no system role, the system text opens the first
# user turn; `assistant` is spelled `model`.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")

# Gemma 4 as gemma/inference/chat.py renders it: a system role, `<|think|>` opening the system
# turn when `enable_thinking`, and an empty thought channel on the generation prompt otherwise.
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{%- set think = enable_thinking is defined and enable_thinking -%}"
    "{%- if think and messages[0]['role'] != 'system' -%}"
    "{{ '<|turn>system\n<|think|><turn|>\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if think and loop.first and role == 'system' -%}{{ '<|think|>' }}{%- endif -%}"
    "{{ message['content'] }}{{ '<turn|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}"
    "{%- if not think -%}{{ '<|channel>thought\n<channel|>' }}{%- endif -%}{%- endif -%}")


def _dir_template(folder: Path) -> str | None:
  """The chat template a Hugging Face directory ships, if any."""
  jinja = folder / "chat_template.jinja"
  if jinja.is_file():
    return jinja.read_text()
  config = folder / "tokenizer_config.json"
  if config.is_file():
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, str):
      return template
  return None


def _copy_gguf(writer, source: Path, vocab_size: int, notes: list[str]) -> None:
  meta = GGUFFile(source).metadata
  tokens = meta.get("tokenizer.ggml.tokens")
  if tokens is None:
    notes.append(f"{source} has no tokenizer metadata: none written (llama.cpp needs one)")
    return
  if len(tokens) != vocab_size:
    raise ValueError(f"{source}: the tokenizer has {len(tokens)} tokens, the embedding "
                     f"{vocab_size} rows; llama.cpp needs them equal")
  skipped = []
  for key, value in meta.items():
    if not key.startswith("tokenizer."):
      continue
    if key not in _COPIED:
      skipped.append(key)
      continue
    getattr(writer, _COPIED[key])(value.tolist() if hasattr(value, "tolist") else value)
  if "tokenizer.ggml.eot_token_id" not in meta:
    _add_eot(writer, tokens)
  if skipped:
    notes.append(f"tokenizer keys of {source} not copied: {', '.join(sorted(skipped))}")


def _add_eot(writer, tokens) -> None:
  eot = [i for i, t in enumerate(tokens[:256]) if t in END_OF_TURN]
  if eot:
    writer.add_eot_token_id(eot[0])


def _proto(tokenizer, source: Path | None) -> bytes | None:
  if tokenizer is not None and hasattr(tokenizer, "sp"):
    return tokenizer.sp.serialized_model_proto()
  if source is not None:
    model = source if source.suffix == ".model" else source / "tokenizer.model"
    if model.is_file():
      return model.read_bytes()
  return None


def _write_sentencepiece(writer, proto: bytes, vocab_size: int, template: str | None,
                         notes: list[str]) -> None:
  from sentencepiece import sentencepiece_model_pb2 as pb

  m = pb.ModelProto()
  m.ParseFromString(proto)
  tokens = [p.piece for p in m.pieces]
  scores = [float(p.score) for p in m.pieces]
  types = [int(p.type) for p in m.pieces]
  if len(tokens) > vocab_size:
    raise ValueError(f"the tokenizer has {len(tokens)} pieces but the embedding only "
                     f"{vocab_size} rows; llama.cpp needs them equal")
  if len(tokens) < vocab_size:  # as llama.cpp's converter pads a short vocabulary
    pad = vocab_size - len(tokens)
    notes.append(f"tokenizer padded with {pad} unused [PADn] tokens to the embedding's "
                 f"{vocab_size} rows (as llama.cpp's converter does)")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    scores += [-1000.0] * pad
    types += [UNUSED] * pad
  t = m.trainer_spec
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  for add, i in ((writer.add_bos_token_id, t.bos_id), (writer.add_eos_token_id, t.eos_id),
                 (writer.add_unk_token_id, t.unk_id), (writer.add_pad_token_id, t.pad_id)):
    if 0 <= i < len(tokens):
      add(i)
  _add_eot(writer, tokens)
  writer.add_add_bos_token(True)
  writer.add_add_eos_token(False)
  writer.add_add_space_prefix(bool(m.normalizer_spec.add_dummy_prefix))
  if not t.split_digits:
    notes.append("the tokenizer does not split digits; GGUF cannot say so and our GGUF "
                 "tokenizer splits them (text with digits may tokenize differently)")
  if template is None:
    template = (GEMMA3_TEMPLATE if "<start_of_turn>" in tokens[:1024]
                else GEMMA4_TEMPLATE if "<|turn>" in tokens[:1024] else None)
  if template is not None:
    writer.add_chat_template(template)


def write_tokenizer(writer, vocab_size: int, tokenizer=None, source=None) -> list[str]:
  """Adds the tokenizer metadata to a GGUFWriter; returns notes on what could not be written.

  `source`: the checkpoint the params came from (a GGUF file, a directory, a tokenizer.model);
  `tokenizer`: a loaded tokenizer (SentencePiece `Tokenizer`). A GGUF source wins (copied as
  is); else the SentencePiece model of `tokenizer`, else the source's `tokenizer.model`."""
  notes: list[str] = []
  source = Path(source) if source is not None else None
  if source is not None and is_gguf(source):
    _copy_gguf(writer, source, vocab_size, notes)
    return notes
  proto = _proto(tokenizer, source)
  if proto is None:
    what = "a tokenizer.json tokenizer cannot be written as GGUF metadata" if tokenizer else \
        "no tokenizer given"
    notes.append(f"{what}: the file has no vocabulary, so llama.cpp cannot load it (our "
                 "loader can; pass a SentencePiece tokenizer or its source)")
    return notes
  folder = source if source is not None and source.is_dir() else (
      source.parent if source is not None else None)
  template = _dir_template(folder) if folder is not None else None
  _write_sentencepiece(writer, proto, vocab_size, template, notes)
  return notes

"""Chat prompt rendering for Gemma 4 and Gemma 3 (no jax).

Gemma 4:  <bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n{user}<turn|>\\n<|turn>model\\n
          thinking on: the system turn starts with <|think|>; thinking off: the generation prompt
          ends with an empty thought channel <|channel>thought\\n<channel|>.
Gemma 3:  <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n
          (no system role: the system text opens the first user turn).

Rendering yields segments: `Special` tokens, inserted by id (so they work even where the
vocabulary types them CONTROL, which SentencePiece never parses from text), and plain text
(encoded without <bos>). The thought-channel suffix with thinking off is documented for the large
models; it is applied to every Gemma 4 model here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

ROLES = ("system", "user", "model")


@dataclasses.dataclass(frozen=True)
class Special:
  piece: str


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"unknown chat role {self.role!r}; expected one of {ROLES}")


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  start: str  # opens a turn
  end: str  # closes a turn
  stop: str  # the id generation stops on besides <eos>
  system_role: bool  # False: the system text is folded into the first user turn

  def render(self, messages: Sequence[Message], *, thinking: bool = False,
             add_generation_prompt: bool = True) -> list[str | Special]:
    """Segments of the prompt for `messages` (ending with an open model turn if asked)."""
    msgs = list(messages)
    if thinking and self.name != "gemma4":
      raise ValueError(f"thinking mode is a Gemma 4 feature, not available for {self.name}")
    if thinking and not (msgs and msgs[0].role == "system"):
      msgs.insert(0, Message("system", ""))
    if not self.system_role and msgs and msgs[0].role == "system":
      system = msgs.pop(0).content
      if msgs and msgs[0].role == "user":
        msgs[0] = Message("user", f"{system}\n\n{msgs[0].content}")
      else:
        msgs.insert(0, Message("user", system))
    out: list[str | Special] = [Special("<bos>")]
    for i, m in enumerate(msgs):
      out += self.turn(m, think=thinking and i == 0 and m.role == "system")
    if add_generation_prompt:
      out += self.generation_prompt(thinking)
    return [s for s in out if s != ""]

  def turn(self, message: Message, think: bool = False) -> list[str | Special]:
    """One closed turn: start, role, (the thinking switch), content, end, newline."""
    return [Special(self.start), f"{message.role}\n", *([Special("<|think|>")] if think else []),
            message.content, Special(self.end), "\n"]

  def generation_prompt(self, thinking: bool = False) -> list[str | Special]:
    """The open model turn a reply is generated into (Gemma 4 without thinking: with an empty
    thought channel)."""
    out: list[str | Special] = [Special(self.start), "model\n"]
    if self.name == "gemma4" and not thinking:
      out += [Special("<|channel>"), "thought\n", Special("<channel|>")]
    return out

  def next_turn(self, message: Message, thinking: bool = False) -> list[str | Special]:
    """Segments that follow a model reply already in the conversation (closed by its end
    marker): the newline after it, the next user turn, and the open model turn."""
    return [s for s in ["\n", *self.turn(message), *self.generation_prompt(thinking)] if s != ""]


TEMPLATES = {
    "gemma4": Template("gemma4", "<|turn>", "<turn|>", "<turn|>", system_role=True),
    "gemma3": Template("gemma3", "<start_of_turn>", "<end_of_turn>", "<end_of_turn>",
                       system_role=False),
}


def template_for(tokenizer) -> Template:
  """The chat template whose turn markers the tokenizer's vocabulary has."""
  for template in TEMPLATES.values():
    if tokenizer.piece_to_id(template.start) is not None:
      return template
  raise ValueError(f"{tokenizer.source}: vocabulary has no Gemma chat turn markers")


def to_text(segments: Sequence[str | Special]) -> str:
  """The rendered prompt as one string (special tokens written out), for display and tests."""
  return "".join(s.piece if isinstance(s, Special) else s for s in segments)


def encode(tokenizer, segments: Sequence[str | Special]) -> list[int]:
  """Token ids of rendered segments: specials by id, text by the tokenizer (no extra <bos>)."""
  ids: list[int] = []
  for s in segments:
    if isinstance(s, Special):
      i = tokenizer.bos_id if s.piece == "<bos>" else tokenizer.piece_to_id(s.piece)
      if i is None:
        raise ValueError(f"{tokenizer.source}: special token {s.piece!r} not in the vocabulary")
      ids.append(i)
    else:
      ids += tokenizer.encode(s, add_bos=False)
  return ids


def chat_prompt(tokenizer, messages: Sequence[Message], thinking: bool = False) -> list[int]:
  """Prompt ids for a conversation, ending with an open model turn."""
  return encode(tokenizer, template_for(tokenizer).render(messages, thinking=thinking))


def stop_ids(tokenizer) -> tuple[int, ...]:
  """Ids generation stops on in chat: <eos> and the end-of-turn marker of the tokenizer's
  template (only <eos> for a vocabulary without chat markers)."""
  try:
    end = tokenizer.piece_to_id(template_for(tokenizer).stop)
  except ValueError:
    end = None
  return tuple(i for i in (tokenizer.eos_id, end) if i is not None)

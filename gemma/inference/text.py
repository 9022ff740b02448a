"""Text out of a generation: the `Completion` a call returns, incremental UTF-8-safe
detokenization, and the iterator `stream=True` returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from gemma.inference.decode import Generation


@dataclasses.dataclass
class Completion:
  """What one generation produced. Field names are a contract (like the command's flags).

  For one prompt `text` is a str and `token_ids` a list[int]; for a batch, one per prompt.
  `token_ids` are the generated ids (a stopping id included, nothing after it); `text` is their
  decoded text without that final stop id (None without a tokenizer).
  """

  text: str | list[str] | None
  token_ids: list[int] | list[list[int]]
  prefill_tokens_per_s: float
  decode_tokens_per_s: float
  prompt_ids: list[int] | list[list[int]]
  compile_s: float
  kv_cache_bytes: int
  draft: str | None = None  # speculative decoding's drafter ("ngram", "mtp"), None: off
  draft_tokens: int = 0  # K drafts per round
  acceptance_rate: float = 0.0  # kept draft tokens / proposed (`Generation.acceptance_rate`)
  mean_accepted_per_step: float = 0.0  # kept drafts per target step (+1 token of its own)


def strip_stop(ids: list[int], stop_ids) -> list[int]:
  """The ids without a final stop id."""
  return ids[:-1] if ids and ids[-1] in stop_ids else ids


def completion(result: Generation, prompts: list[list[int]], tokenizer, stop_ids,
               batch: bool) -> Completion:
  """A Completion of a finished generation (rows in prompt order)."""
  texts = None if tokenizer is None else [
      tokenizer.decode(strip_stop(row, stop_ids)) for row in result.tokens]
  one = (lambda x: x) if batch else (lambda x: None if x is None else x[0])  # noqa: E731
  return Completion(text=one(texts), token_ids=one(result.tokens),
                    prefill_tokens_per_s=result.prefill_tokens_per_s,
                    decode_tokens_per_s=result.decode_tokens_per_s,
                    prompt_ids=one([list(p) for p in prompts]), compile_s=result.compile_s,
                    kv_cache_bytes=result.kv_cache_bytes, draft=result.draft,
                    draft_tokens=result.draft_tokens, acceptance_rate=result.acceptance_rate,
                    mean_accepted_per_step=result.mean_accepted_per_step)


class Detokenizer:
  """Text of a growing id sequence, released in pieces that never split a UTF-8 character:
  a decode that ends in U+FFFD (an incomplete byte sequence) waits for the next id."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.shown = tokenizer, [], ""

  def push(self, token_id: int) -> str:
    """The new text after appending `token_id` ("" while a character is incomplete)."""
    self.ids.append(token_id)
    text = self.tokenizer.decode(self.ids)
    if text.endswith("\ufffd"):
      return ""
    return self._release(text)

  def flush(self) -> str:
    """Whatever is left (an incomplete character at the very end comes out as U+FFFD)."""
    return self._release(self.tokenizer.decode(self.ids))

  def _release(self, text: str) -> str:
    piece, self.shown = text[len(self.shown):], text
    return piece


class TextStream:
  """`generate(..., stream=True)`: iterates over text pieces (str) as tokens are decoded; the
  pieces join to `completion.text`, which is set once the iterator is exhausted.

  steps: a `gemma.inference.decode.stream` generator (one row); finish(value) turns its return
  value into the Completion (and does any bookkeeping, e.g. a chat session keeping its cache).
  """

  def __init__(self, steps, tokenizer, stop_ids, finish: Callable[[object], Completion]):
    self._steps, self._stop, self._finish = steps, set(stop_ids), finish
    self._detok = Detokenizer(tokenizer)
    self.completion: Completion | None = None

  def __iter__(self) -> Iterator[str]:
    while True:
      try:
        (token_id,) = next(self._steps)
      except StopIteration as end:
        tail = self._detok.flush()
        if tail:
          yield tail
        self.completion = self._finish(end.value)
        return
      if token_id in self._stop:
        continue  # the last id of a row that stops: not part of the text
      piece = self._detok.push(token_id)
      if piece:
        yield piece


"""Chat sessions that keep their KV cache between turns.

A session holds the conversation as token ids and the cache of all of them but the last reply's
final token (sampled, not yet fed back). `send(text)` renders only what follows — the end of the
previous reply, the new user turn and the open model turn (`Template.next_turn`) — prefills it
onto the kept cache and decodes. Earlier replies stay exactly as they were generated (token for
token, the Gemma 4 empty thought channel included), so every turn computes what a fresh
generation from the session's whole transcript (`token_ids`) computes.

Capacity: the cache grows (doubling, `Runner.grow_cache`) up to `max_length` (default: the
model's context). A turn whose prompt plus `max_new_tokens` would pass it is refused before any
compute with an error that names the numbers; nothing is truncated silently (`reset()` starts a
new conversation with the same system prompt).

A TurboQuant KV cache (`kv_quant="tq..."`) fixes its per-channel statistics (outlier channels,
centering, key scaling) on the first turn and keeps them for later turns, so with a quantized cache
later turns differ from a fresh generation within the codes' rounding.
"""

from __future__ import annotations

import numpy as np

from gemma.inference import chat, decode, speculative
from gemma.inference.chat import Message
from gemma.inference.decode import Runner, drain
from gemma.inference.sampling import Sampler
from gemma.inference.text import Completion, TextStream, completion

MIN_CAPACITY = 256


class ChatSession:
  """A conversation with one model (batch 1). Build with `gemma.Model.chat`."""

  def __init__(self, run: Runner, tokenizer, stop_ids, *, system: str | None = None,
               thinking: bool = False, kv_quant: str | None = None,
               max_length: int | None = None, prefill_chunk: int | None = None,
               draft=None):
    self.run, self.tokenizer, self.stop_ids = run, tokenizer, tuple(stop_ids)
    self.draft = draft  # speculative decoding (`gemma.inference.speculative`), None: off
    if draft is not None:
      speculative.check_compatible(draft, run)
    self.template = chat.template_for(tokenizer)
    self.system, self.thinking, self.kv_quant = system, thinking, kv_quant
    self.prefill_chunk = prefill_chunk
    self.max_length = max_length or run.cfg.max_position_embeddings
    if self.max_length > run.cfg.max_position_embeddings:
      raise ValueError(f"max_length {self.max_length} exceeds the model context "
                       f"{run.cfg.max_position_embeddings}")
    self.reset()

  def reset(self) -> None:
    """Forgets the conversation (the system prompt stays) and frees the cache."""
    self.messages: list[Message] = [Message("system", self.system)] if self.system else []
    self.token_ids: list[int] = []  # the whole transcript: prompts and replies, as generated
    self._cache = None
    self._pending: list[int] = []  # the last reply's final token: in token_ids, not in the cache
    self._turns = 0

  def _new_tokens(self, text: str) -> list[int]:
    """Ids this turn adds to the transcript: the first prompt, or what follows the last reply."""
    user = Message("user", text)
    if not self.token_ids:
      segments = self.template.render([*self.messages, user], thinking=self.thinking)
      return chat.encode(self.tokenizer, segments)
    close = []  # the reply's end marker, unless it was generated
    end = self.tokenizer.piece_to_id(self.template.end)
    if self.token_ids[-1] != end:
      close = [end]
    return close + chat.encode(self.tokenizer, self.template.next_turn(user, self.thinking))

  def send(self, text: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stream: bool = False, on_token=None) -> Completion | TextStream:
    """The model's reply to one user message. Returns a Completion (`.text` without the end
    marker), or with `stream=True` a TextStream of text pieces (its `.completion` is set at the
    end). `seed` defaults to the turn number."""
    sampler = Sampler.of(temperature, top_k, top_p)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    new = self._new_tokens(text)
    transcript, pending = self.token_ids, self._pending
    if transcript and transcript[-1] == self.tokenizer.eos_id:
      transcript, pending = transcript[:-1], []  # a reply's <eos> gives way to the end marker
    total = len(transcript) + len(new) + max_new_tokens
    if total > self.max_length:
      raise ValueError(
          f"this turn does not fit the session: {len(transcript)} tokens of conversation + "
          f"{len(new)} new + max_new_tokens {max_new_tokens} = {total} > max_length "
          f"{self.max_length}; call reset() to start over, or lower max_new_tokens")
    prompt = [*transcript, *new]
    # the cache holds the transcript but the pending token (nothing after a failed turn)
    start = 0 if self._cache is None else len(transcript) - len(pending)
    chunk = prompt[start:]
    self._cache = self._room(total)
    tokens = np.asarray([chunk], np.int32)
    positions = np.arange(start, start + len(chunk), dtype=np.int32)[None]
    steps = decode.stream(self.run, self._cache, tokens, positions, max_new_tokens, sampler,
                          self._turns if seed is None else seed, self.stop_ids,
                          self.prefill_chunk, self.draft, prompt[:start])
    self._cache = None  # donated to the steps; the finished turn hands back the new one

    def finish(value) -> Completion:
      result, cache = value
      reply = result.tokens[0]
      self._cache, self._pending = cache, reply[-1:]
      self.token_ids = prompt + reply
      self._turns += 1
      done = completion(result, [prompt], self.tokenizer, self.stop_ids, batch=False)
      self.messages += [Message("user", text), Message("model", done.text)]
      return done

    if stream:
      return TextStream(steps, self.tokenizer, self.stop_ids, finish)
    return finish(drain(steps, on_token))

  def _room(self, needed: int):
    """The kept cache with room for `needed` columns (a new one on the first turn)."""
    size = min(self.max_length, max(MIN_CAPACITY, 1 << (needed - 1).bit_length()))
    slack = 0 if self.draft is None else self.draft.tokens
    if self._cache is None:
      return self.run.new_cache(1, size, self.kv_quant, self.prefill_chunk, slack)
    if needed + slack > self._cache.max_length:
      return self.run.grow_cache(self._cache, size, self.kv_quant, self.prefill_chunk, slack)
    return self._cache

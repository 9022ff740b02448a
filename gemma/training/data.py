"""Fine-tuning data: JSON lines -> (token ids, loss mask) examples -> fixed-shape batches.

Each line is one example:
  {"messages": [{"role": "user"|"system"|"model", "content": "..."}, ...]}  chat, Gemma format
  {"prompt": "...", "response": "..."}  one user turn and the model's answer
  {"text": "..."}  plain text (every token after BOS is trained)
In chat examples only the model turns' content and their end-of-turn marker are in the loss; the
BOS, the turn headers, user/system turns and the empty thought channel Gemma 4 opens before each
answer (as `gemma.inference.chat` does at inference) are masked out.

Batches are deterministic in (seed, step): examples are visited in a fresh permutation per epoch,
so the data position of a run is its step count (what a resumed run needs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gemma.inference import chat

Example = tuple[list[int], list[int]]  # (ids, mask: 1 where the token is a training target)


def _messages(record: dict, where: str) -> list[chat.Message] | None:
  if "messages" in record:
    try:
      return [chat.Message(m["role"], m["content"]) for m in record["messages"]]
    except (KeyError, TypeError) as e:
      raise ValueError(f"{where}: each message needs 'role' and 'content' ({e})") from None
  if "prompt" in record and "response" in record:
    return [chat.Message("user", record["prompt"]), chat.Message("model", record["response"])]
  if "text" in record:
    return None
  raise ValueError(f"{where}: expected 'messages', 'prompt'+'response' or 'text'; got keys "
                   f"{sorted(record)}")


def encode_chat(tokenizer, messages: list[chat.Message]) -> Example:
  """Ids and loss mask of a conversation in the tokenizer's chat template."""
  template = chat.template_for(tokenizer)
  msgs = list(messages)
  if not any(m.role == "model" for m in msgs):
    raise ValueError("a chat example needs at least one model turn to learn from")
  if not template.system_role and msgs and msgs[0].role == "system":  # fold, as render() does
    system = msgs.pop(0).content
    if msgs and msgs[0].role == "user":
      msgs[0] = chat.Message("user", f"{system}\n\n{msgs[0].content}")
    else:
      msgs.insert(0, chat.Message("user", system))
  segments: list[tuple[list, int]] = [([chat.Special("<bos>")], 0)]
  for m in msgs:
    head = [chat.Special(template.start), f"{m.role}\n"]
    if m.role == "model":
      if template.name == "gemma4":
        head += [chat.Special("<|channel>"), "thought\n", chat.Special("<channel|>")]
      segments += [(head, 0), ([m.content, chat.Special(template.end)], 1), (["\n"], 0)]
    else:
      segments.append((head + [m.content, chat.Special(template.end), "\n"], 0))
  ids: list[int] = []
  mask: list[int] = []
  for parts, trained in segments:
    piece = chat.encode(tokenizer, [p for p in parts if p != ""])
    ids += piece
    mask += [trained] * len(piece)
  return ids, mask


def load_examples(path: str | Path, tokenizer) -> list[Example]:
  """Reads a JSONL file into examples; errors name the line."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"training data {path} does not exist")
  out = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{where}: expected a JSON object")
    messages = _messages(record, where)
    if messages is None:
      ids = tokenizer.encode(record["text"], add_bos=True)
      out.append((ids, [0] + [1] * (len(ids) - 1)))
    else:
      out.append(encode_chat(tokenizer, messages))
  if not out:
    raise ValueError(f"{path} has no examples")
  return out


def example_order(count: int, seed: int, start: int, n: int) -> np.ndarray:
  """Indices of examples start..start+n-1 of the stream (a new permutation every epoch)."""
  idx = np.arange(start, start + n)
  epochs = idx // count
  out = np.empty(n, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(count)
    sel = epochs == e
    out[sel] = perm[idx[sel] % count]
  return out


def make_batch(examples: list[Example], indices, seq_len: int):
  """Packs examples into arrays (one example per row, cut to seq_len + 1 tokens).

  Returns dict of numpy arrays:
    tokens [N, T] int32 inputs, targets [N, T] int32 next tokens, positions [N, T] int32
    (-1 on padding), weights [N, T] float32 (1 where the target is trained).
  """
  n, t = len(indices), seq_len
  tokens = np.zeros((n, t), np.int32)
  targets = np.zeros((n, t), np.int32)
  positions = np.full((n, t), -1, np.int32)
  weights = np.zeros((n, t), np.float32)
  for row, i in enumerate(indices):
    ids, mask = examples[i]
    ids, mask = ids[:t + 1], mask[:t + 1]
    m = len(ids) - 1
    tokens[row, :m], targets[row, :m] = ids[:-1], ids[1:]
    positions[row, :m] = np.arange(m)
    weights[row, :m] = mask[1:]
  return dict(tokens=tokens, targets=targets, positions=positions, weights=weights)


def step_batch(examples: list[Example], seed: int, step: int, batch_size: int, grad_accum: int,
               seq_len: int):
  """The batch of optimizer step `step` (0-based): arrays [A, B, T] (A = grad_accum)."""
  per_step = batch_size * grad_accum
  idx = example_order(len(examples), seed, step * per_step, per_step)
  flat = make_batch(examples, idx, seq_len)
  return {k: v.reshape(grad_accum, batch_size, seq_len) for k, v in flat.items()}

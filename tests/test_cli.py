"""The gemma4 command: chat prompts, streaming, interactive chat, prompt files, info."""

import io
import json
import sys

import numpy as np

from gemma.cli import app as cli
from gemma.cli import run
from gemma.io.checkpoint import load_tokenizer
from tests.conftest import fixture_dir


def _json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_chat_json(e_style_ckpt, capsys):
  ckpt = e_style_ckpt
  assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hi there", "--chat",
                   "--system", "Be brief.", "--max-new-tokens", "5", "--json"]) == 0
  out = _json(capsys)
  tok = load_tokenizer(ckpt)
  assert out["prompt_ids"][:2] == [2, tok.piece_to_id("<|turn>")]
  assert tok.decode(out["prompt_ids"]).endswith("<|turn>model\n<|channel>thought\n<channel|>")
  assert 1 <= len(out["token_ids"]) <= 5 and isinstance(out["text"], str)


class _Writes(io.StringIO):
  """stdout that remembers each write (to see text arrive in pieces)."""

  def __init__(self):
    super().__init__()
    self.writes = []

  def write(self, s):
    self.writes.append(s)
    return super().write(s)


def test_generate_streams_text_in_pieces(e_style_ckpt, capsys, monkeypatch):
  args = ["generate", "--checkpoint", str(e_style_ckpt), "--prompt", "hello",
          "--max-new-tokens", "10"]
  assert cli.main([*args, "--json"]) == 0
  text = _json(capsys)["text"]
  out = _Writes()
  monkeypatch.setattr(sys, "stdout", out)
  assert cli.main(args) == 0
  stats = next(i for i, w in enumerate(out.writes) if "[prefill" in w)
  pieces = [w for w in out.writes[:stats] if w not in ("", "\n")]
  assert len(pieces) >= 2 and "".join(pieces) == text  # several writes, the whole text
  assert "decode" in out.writes[stats]


def test_generate_ids_without_tokenizer_prints_ids(capsys):
  assert cli.main(["generate", "--checkpoint", fixture_dir("moe"), "--prompt-ids", "2,5,7",
                   "--max-new-tokens", "3"]) == 0
  first = capsys.readouterr().out.splitlines()[0].split()
  assert len(first) == 3 and all(t.isdigit() for t in first)


def test_prompt_file_and_stdin_equal_prompt(e_style_ckpt, capsys, monkeypatch, tmp_path):
  base = ["generate", "--checkpoint", str(e_style_ckpt), "--max-new-tokens", "4", "--json"]
  assert cli.main([*base, "--prompt", "a long prompt\nwith two lines"]) == 0
  want = _json(capsys)
  f = tmp_path / "prompt.txt"
  f.write_text("a long prompt\nwith two lines\n")  # the editor's trailing newline is dropped
  assert cli.main([*base, "--prompt-file", str(f)]) == 0
  assert _json(capsys)["prompt_ids"] == want["prompt_ids"]
  monkeypatch.setattr(sys, "stdin", io.StringIO("a long prompt\nwith two lines\n"))
  assert cli.main([*base, "--prompt-file", "-"]) == 0
  got = _json(capsys)
  assert got["prompt_ids"] == want["prompt_ids"] and got["token_ids"] == want["token_ids"]
  assert cli.main([*base, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_logits_from_text_equal_logits_from_ids(e_style_ckpt, tmp_path, capsys):
  tok = load_tokenizer(e_style_ckpt)
  ids = ",".join(map(str, tok.encode("some text")))
  ckpt = str(e_style_ckpt)
  assert cli.main(["logits", "--checkpoint", ckpt, "--prompt-ids", ids,
                   "--out", str(tmp_path / "a.npy")]) == 0
  assert cli.main(["logits", "--checkpoint", ckpt, "--prompt", "some text",
                   "--out", str(tmp_path / "b.npy")]) == 0
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_interactive_chat_keeps_one_session(e_style_ckpt, capsys, monkeypatch):
  sessions = []
  original = run.load_model

  def spy(args, **kw):
    model = original(args, **kw)
    chat = model.chat
    model.chat = lambda **kw: sessions.append(chat(**kw)) or sessions[-1]
    return model

  monkeypatch.setattr(run, "load_model", spy)
  args = cli._parser().parse_args(["chat", "--checkpoint", str(e_style_ckpt),
                                   "--max-new-tokens", "3"])
  assert run.cmd_chat(args, stdin=io.StringIO("Hello\nAnd again\n\n")) == 0
  assert capsys.readouterr().err.count("tok/s]") == 2
  (session,) = sessions  # one session for both turns, its cache kept
  assert [m.role for m in session.messages] == ["user", "model", "user", "model"]
  assert int(session._cache.length) == len(session.token_ids) - 1


def test_chat_first_turn_from_prompt_file(e_style_ckpt, capsys, tmp_path):
  f = tmp_path / "q.txt"
  f.write_text("What is up?\n")
  args = cli._parser().parse_args(["chat", "--checkpoint", str(e_style_ckpt),
                                   "--max-new-tokens", "3", "--prompt-file", str(f)])
  assert run.cmd_chat(args, stdin=io.StringIO("")) == 0
  assert capsys.readouterr().err.count("tok/s]") == 1


def test_chat_flags_need_text_prompt(e_style_ckpt, capsys):
  ckpt = e_style_ckpt
  assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "2,3", "--chat",
                   "--max-new-tokens", "2"]) == 2
  assert "need --prompt" in capsys.readouterr().err


def test_info(capsys):
  assert cli.main(["info", "--checkpoint", fixture_dir("moe")]) == 0
  out = capsys.readouterr().out
  assert "format: hf" in out and "num_experts: 8" in out and "layer_types: LLLLLG" in out
  assert "active 229,718" in out

"""The gemma4 command: chat prompts, interactive chat, info."""

import io
import json

from gemma.cli import app as cli
from tests.conftest import fixture_dir


def test_generate_chat_json(e_style_ckpt, capsys):
  ckpt = e_style_ckpt
  assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hi there", "--chat",
                   "--system", "Be brief.", "--max-new-tokens", "5", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  from gemma.io.checkpoint import load_tokenizer

  tok = load_tokenizer(ckpt)
  assert out["prompt_ids"][:2] == [2, tok.piece_to_id("<|turn>")]
  assert tok.decode(out["prompt_ids"]).endswith("<|turn>model\n<|channel>thought\n<channel|>")
  assert 1 <= len(out["token_ids"]) <= 5 and isinstance(out["text"], str)


def test_generate_text_prompt_streams(e_style_ckpt, capsys):
  ckpt = e_style_ckpt
  assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "hello",
                   "--max-new-tokens", "4"]) == 0
  assert "decode" in capsys.readouterr().out


def test_interactive_chat(e_style_ckpt, capsys):
  ckpt = e_style_ckpt
  args = cli._parser().parse_args(["chat", "--checkpoint", str(ckpt), "--max-new-tokens", "3"])
  assert cli.cmd_chat(args, stdin=io.StringIO("Hello\nAnd again\n\n")) == 0
  err = capsys.readouterr().err
  assert err.count("tok/s]") == 2


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

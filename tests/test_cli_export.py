"""`gemma4 export` on the command line: flags onto the exporters, the JSON line, and bad input
refused before anything is read or written (the exporters' own tests: test_export_*.py)."""

import json

import numpy as np
import pytest

import gemma
from gemma.cli.app import main
from tests.conftest import fixture_dir

IDS = [2, 17, 33, 5, 71, 9]


def _json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv, message", [
    (["--format", "peft", "--checkpoint", "X", "--out", "O"], "pass --adapters"),
    (["--format", "hf", "--adapters", "R", "--out", "O"], "pass --checkpoint"),
    (["--format", "gguf", "--out", "O.gguf"], "pass --checkpoint"),
    (["--format", "hf", "--checkpoint", "X", "--out", "O", "--type", "q8_0"], "--type is for"),
    (["--format", "gguf", "--checkpoint", "X", "--out", "O.gguf", "--dtype", "float32"],
     "use --type"),
    (["--format", "gguf", "--checkpoint", "X", "--out", "model.bin"], "named *.gguf"),
    (["--format", "hf", "--checkpoint", "X", "--out", "O", "--any-config"], "--any-config is for"),
])
def test_flags_that_do_not_fit_the_format_are_refused(argv, message, capsys):
  assert main(["export", *argv]) == 2
  assert message in capsys.readouterr().err


def test_unknown_format_is_refused(capsys):
  with pytest.raises(SystemExit) as e:
    main(["export", "--format", "onnx", "--checkpoint", "X", "--out", "O"])
  assert e.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


def test_existing_outputs_are_kept_without_force(tmp_path, capsys):
  gguf_file = tmp_path / "m.gguf"
  gguf_file.write_bytes(b"keep")
  assert main(["export", "--format", "gguf", "--checkpoint", fixture_dir("gemma3"),
               "--out", str(gguf_file)]) == 2
  assert "already exists (pass --force" in capsys.readouterr().err
  assert gguf_file.read_bytes() == b"keep"
  folder = tmp_path / "notes"
  folder.mkdir()
  (folder / "mine.txt").write_text("keep")
  assert main(["export", "--format", "hf", "--checkpoint", fixture_dir("gemma3"),
               "--out", str(folder), "--force"]) == 2
  assert "refusing to replace it" in capsys.readouterr().err
  assert (folder / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("fmt, out, extra", [
    ("hf", "export_hf", ["--dtype", "float32"]),
    # e_style's KV sharing is not llama.cpp's layout: written for our loader on request
    ("gguf", "model.gguf", ["--type", "f32", "--any-config"]),
])
def test_export_reloads_with_the_same_logits(fmt, out, extra, e_style_ckpt, tmp_path, capsys):
  src = str(e_style_ckpt)  # the e_style fixture with a tokenizer
  path = tmp_path / out
  assert main(["export", "--format", fmt, "--checkpoint", src, "--out", str(path), *extra]) == 0
  result = _json(capsys)
  assert result["format"] == fmt and result["out"] == str(path)
  assert isinstance(result["notes"], list)
  want = gemma.load(src, dtype="float32").logits(IDS)
  got = gemma.load(path, dtype="float32").logits(IDS)
  np.testing.assert_array_equal(got, want)

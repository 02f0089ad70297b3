"""run.py end to end in a subprocess, on a tiny checkpoint and tokenizer made here."""

import os
import pathlib
import subprocess
import sys

import pytest

import grok_moe
from grok_moe import manifest
from tests.helpers import random_params, train_char_tokenizer as train_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("run")
  checkpoint = root / "tiny"
  config = grok_moe.TINY.replace(sequence_len=32)
  grok_moe.save_checkpoint(manifest.unflatten(random_params(config, "release", seed=1)),
                           checkpoint, config)
  assert train_tokenizer(checkpoint / "tokenizer.model") < config.vocab_size
  assert train_tokenizer(root / "wide.model", extra_pieces=config.vocab_size) > config.vocab_size
  return checkpoint


def run(*args, stdin: str = "") -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO / "run.py"), *args], input=stdin,
                        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def test_completes_a_prompt_and_reports_speed(tiny_checkpoint):
  result = run("--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO:",
               "--max-new-tokens", "8", "--temperature", "0")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("ROMEO:")
  assert len(result.stdout) > len("ROMEO:\n")
  assert "tokens/s" in result.stderr and "loaded in" in result.stderr
  again = run("--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO:",
              "--max-new-tokens", "8", "--temperature", "0")
  assert again.stdout == result.stdout  # greedy is deterministic


def test_prompt_from_stdin_and_empty_prompt_starts_from_bos(tiny_checkpoint):
  result = run("--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "4", stdin="")
  assert result.returncode == 0, result.stderr


def test_truncate_keeps_the_end_of_a_long_prompt(tiny_checkpoint):
  long_prompt = "Juliet is the sun. " * 5   # ~95 characters: longer than the 32-token context
  result = run("--checkpoint", str(tiny_checkpoint), "--prompt", long_prompt,
               "--max-new-tokens", "3", "--truncate")
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("make_args, message", [
    (lambda ckpt, root: ["--prompt", "Juliet is the sun. " * 5], "--truncate"),
    (lambda ckpt, root: ["--prompt", "x", "--temperature", "-1"], "temperature"),
    (lambda ckpt, root: ["--prompt", "x", "--top-p", "0"], "top_p"),
    (lambda ckpt, root: ["--prompt", "x", "--top-p", "1.5"], "top_p"),
    (lambda ckpt, root: ["--prompt", "x", "--tokenizer", str(root / "missing.model")],
     "tokenizer not found"),
    (lambda ckpt, root: ["--prompt", "x", "--tokenizer", str(ckpt / "config.json")],
     "not a SentencePiece model"),
    (lambda ckpt, root: ["--prompt", "x", "--tokenizer", str(root / "wide.model")],
     "vocabulary"),
])
def test_bad_input_gives_one_line_and_exit_code_2(tiny_checkpoint, make_args, message):
  root = tiny_checkpoint.parent
  result = run("--checkpoint", str(tiny_checkpoint), *make_args(tiny_checkpoint, root))
  assert result.returncode == 2
  # Progress lines ("loading ...", "loaded in ...") may come first; the error is one line.
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr
  assert result.stderr.rstrip().endswith(errors[0])
  assert "Traceback" not in result.stderr


def test_missing_checkpoint(tmp_path):
  result = run("--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x")
  assert result.returncode == 2
  assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_help_explains_the_options():
  result = run("--help")
  assert result.returncode == 0
  for option in ("--prompt", "--checkpoint", "--tokenizer", "--config", "--max-new-tokens",
                 "--temperature", "--top-p", "--top-k", "--seed", "--dtype", "--truncate"):
    assert option in result.stdout


def test_cpu_devices_runs_on_a_mesh_of_cores_with_the_same_text(tiny_checkpoint):
  args = ("--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "6",
          "--temperature", "0")
  one, two = run(*args), run(*args, "--cpu-devices", "2")
  assert two.returncode == 0, two.stderr
  assert "onto a 1x2 mesh" in two.stderr
  assert two.stdout == one.stdout  # greedy, float32: the mesh gives one device's logits

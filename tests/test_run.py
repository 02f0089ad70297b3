"""The command line (grok_moe.cli; run.py, python -m grok_moe, grok-moe) on a tiny checkpoint
and tokenizer made here.

Most tests call `cli.main(argv)` in this process, with stdout and stderr captured;
the ones about the process itself (exit on Ctrl-C, a closed pipe, a terminal on
stdin, running outside the clone) start it as a subprocess.
"""

import io
import os
import pathlib
import pty
import select
import shutil
import signal
import subprocess
import sys
import tomllib

import pytest

import grok_moe
from grok_moe import cli, manifest
from tests.helpers import random_params, train_char_tokenizer as train_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = grok_moe.TINY.replace(sequence_len=32)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("run")
  checkpoint = root / "tiny"
  grok_moe.save_checkpoint(manifest.unflatten(random_params(CONFIG, "release", seed=1)),
                           checkpoint, CONFIG, progress=False)
  assert train_tokenizer(checkpoint / "tokenizer.model") < CONFIG.vocab_size
  assert train_tokenizer(root / "wide.model", extra_pieces=CONFIG.vocab_size) > CONFIG.vocab_size
  return checkpoint


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory) -> pathlib.Path:
  """A tiny model with a 4096-token context: generating 4000 tokens takes many seconds."""
  checkpoint = tmp_path_factory.mktemp("run") / "long"
  config = grok_moe.TINY.replace(sequence_len=4096)
  grok_moe.save_checkpoint(manifest.unflatten(random_params(config, "release", seed=1)),
                           checkpoint, config, progress=False)
  train_tokenizer(checkpoint / "tokenizer.model")
  return checkpoint


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint) -> grok_moe.Model:
  return grok_moe.Model.from_checkpoint(tiny_checkpoint, progress=False)


class Result:
  def __init__(self, returncode, stdout, stderr):
    self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main(capsys, monkeypatch, *args, stdin: bytes = b"") -> Result:
  """cli.main(args) in this process, with `stdin` as a pipe (not a terminal) on stdin."""
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
  try:
    code = cli.main([str(arg) for arg in args])
  except SystemExit as exit_:  # argparse: --help, --version, bad flags
    code = exit_.code
  out, err = capsys.readouterr()
  return Result(code, out, err)


def subprocess_env() -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu")


def run(*args, stdin: str = "") -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], input=stdin,
                        capture_output=True, text=True, env=subprocess_env(), timeout=300,
                        cwd=REPO)


def completion(result: Result, prompt: str) -> str:
  """The generated text: stdout is the prompt, the completion and a newline."""
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(prompt) and result.stdout.endswith("\n")
  return result.stdout[len(prompt):-1]


def test_run_py_completes_a_prompt_and_reports_speed(tiny_checkpoint):
  """run.py as a program: catches a broken wrapper, the text not on stdout, or the load and
  speed report missing from stderr."""
  result = run("--checkpoint", tiny_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 8,
               "--temperature", 0)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:\n")
  assert "tokens/s" in result.stderr and "loaded in" in result.stderr


def test_greedy_text_is_the_api_text_with_the_same_default_dtype(capsys, monkeypatch,
                                                                  tiny_checkpoint, tiny_model):
  """The command line and Model.from_checkpoint give the same text for the same prompt and
  seed with their defaults (issue 13, item 5): catches a dtype default that differs between
  the two (bfloat16 in the API, float32 in the CLI on CPU), or flags not passed through."""
  args = ("--checkpoint", tiny_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 8,
          "--seed", 3)
  text = completion(main(capsys, monkeypatch, *args), "ROMEO:")
  assert tiny_model.dtype == "float32"  # CPU
  assert text and text == tiny_model.generate("ROMEO:", max_new_tokens=8, seed=3)
  assert completion(main(capsys, monkeypatch, *args), "ROMEO:") == text  # seeded: repeatable


def test_empty_prompt_from_stdin_starts_from_bos(capsys, monkeypatch, tiny_checkpoint,
                                                 tiny_model):
  """An empty stdin completes from BOS: catches an empty prompt refused, or generating from
  something else (a pad, nothing), or stdin not read."""
  result = main(capsys, monkeypatch, "--checkpoint", tiny_checkpoint, "--max-new-tokens", 6,
                "--temperature", 1, "--seed", 0, stdin=b"")
  from_bos = tiny_model.tokenizer.decode(tiny_model.generate_tokens(
      [CONFIG.bos_token], max_new_tokens=6, temperature=1, seed=0))  # a seed whose text is not empty
  assert from_bos and completion(result, "") == from_bos


def test_truncate_keeps_the_end_of_a_long_prompt(capsys, monkeypatch, tiny_checkpoint):
  """--truncate drops the start of a prompt longer than the 32-token context and keeps its
  end: two prompts that differ only in their first 20 characters give the same text, one
  with another last character gives a different text. Catches keeping the start, or
  ignoring the prompt."""
  tail = "Juliet is the sun. " * 3                 # 57 characters, one token each
  prompts = ("It is the east, and " + tail, "O Romeo, Romeo, art " + tail,
             "It is the east, and " + tail + "O")
  texts = [completion(main(capsys, monkeypatch, "--checkpoint", tiny_checkpoint, "--prompt",
                           prompt, "--max-new-tokens", 3, "--temperature", 0, "--truncate"),
                      prompt) for prompt in prompts]
  assert texts[0] == texts[1]
  assert texts[0] != texts[2]


def test_unknown_characters_are_named_on_stderr(capsys, monkeypatch, tiny_checkpoint):
  """Characters the tokenizer has no piece for are named in one `warning:` line (item 9),
  before the prompt is echoed: catches them turning into <unk> silently, a multi-line
  warning with a source line, or the warning landing in the middle of the text."""
  result = main(capsys, monkeypatch, "--checkpoint", tiny_checkpoint, "--prompt", "ROMEO: é~",
                "--max-new-tokens", 2, "--temperature", 0)
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "'é' (U+00E9)" in warnings[0] and "'~' (U+007E)" in warnings[0]
  assert "<unk>" in warnings[0] and "'R'" not in warnings[0]
  assert "warnings.warn" not in result.stderr and "UserWarning" not in result.stderr
  terminal = io.StringIO()  # stdout and stderr interleaved, as on a terminal
  monkeypatch.setattr(sys, "stdout", terminal)
  monkeypatch.setattr(sys, "stderr", terminal)
  assert cli.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO: é~",
                   "--max-new-tokens", "2", "--temperature", "0"]) == 0
  assert terminal.getvalue().index("warning:") < terminal.getvalue().index("ROMEO: é~")


BAD_INPUT = [
    (["--prompt", "Juliet is the sun. " * 5], "--truncate"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "x", "--top-k", "-2"], "--top-k"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompt", "x", "--seed", "99999999999999999999999"], "--seed"),
    (["--prompt", "x", "--seed", "-1"], "--seed"),
    (["--prompt", "x", "--batch", "4"], "--batch is for the memory plan only"),
    (["--prompt", "x", "--cache-len", "16"], "--cache-len is for the memory plan only"),
    (["--prompt", "x", "--tokenizer", "{root}/missing.model"], "tokenizer not found"),
    (["--prompt", "x", "--tokenizer", "{ckpt}/ckpt-0/tensor00000_000"], "not a SentencePiece model"),
    (["--prompt", "x", "--tokenizer", "{ckpt}/config.json"], "not a tokenizer.json"),
    (["--prompt", "x", "--tokenizer", "{root}/wide.model"], "vocabulary"),
    (["--prompt", "x", "--config", "tiny"], "--config tiny differs from"),
    (["--prompt", "x", "--config", "{root}/none.json"], "cannot read --config"),
    (["--prompt", "x", "--config", "{ckpt}/ckpt-0/tensor00000_000"], "not a UTF-8 text file"),
    (["--prompt", "ROMEO\udcff:"], "--prompt is not valid UTF-8 (byte 0xff at character 5)"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_gives_one_line_naming_the_flag_and_exit_code_2(capsys, monkeypatch,
                                                                  tiny_checkpoint, args,
                                                                  message):
  """Each bad value gets one `error:` line that names the flag (not the Python argument)
  and exit status 2: catches a traceback, a usage dump, or a message in the API's words
  (`top_p`, `config=None`)."""
  root = tiny_checkpoint.parent
  args = [arg.format(root=root, ckpt=tiny_checkpoint) for arg in args]
  result = main(capsys, monkeypatch, "--checkpoint", tiny_checkpoint, *args)
  assert_one_error_line(result, message)
  assert "config=None" not in result.stderr and "top_p" not in result.stderr


def assert_one_error_line(result: Result, message: str) -> None:
  assert result.returncode == 2, result.stderr
  # Progress lines ("loading ...", "loaded in ...") may come first; the error is one line.
  errors = [line for line in result.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
  assert message in errors[0], result.stderr
  assert result.stderr.rstrip().endswith(errors[0])
  assert "Traceback" not in result.stderr and "usage:" not in result.stderr


def test_prompt_on_stdin_that_is_not_utf8(capsys, monkeypatch, tiny_checkpoint):
  """Bytes on stdin that are not UTF-8 (printf 'ROMEO\\xff:' | run.py) give one line naming
  the byte, not a traceback from the tokenizer."""
  result = main(capsys, monkeypatch, "--checkpoint", tiny_checkpoint, stdin=b"ROMEO\xff:")
  assert_one_error_line(result, "not valid UTF-8 (byte 0xff at offset 5)")


@pytest.mark.parametrize("make_args, message", [
    (lambda ckpt: ["--checkpoint", ckpt.parent / "nowhere"], "does not exist"),
    (lambda ckpt: ["--checkpoint", ckpt / "config.json"], "is a file"),
])
def test_missing_or_file_checkpoint(capsys, monkeypatch, tiny_checkpoint, make_args, message):
  """A checkpoint path that does not exist, or is a file: catches "directory README.md does
  not exist" for a file that does exist."""
  result = main(capsys, monkeypatch, *make_args(tiny_checkpoint), "--prompt", "x")
  assert_one_error_line(result, message)


def test_checkpoint_without_tokenizer_asks_for_one(capsys, monkeypatch, tiny_checkpoint,
                                                   tmp_path):
  """A checkpoint with no tokenizer.model: one line that names --tokenizer."""
  bare = tmp_path / "bare"
  shutil.copytree(tiny_checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer.model"))
  result = main(capsys, monkeypatch, "--checkpoint", bare, "--prompt", "x")
  assert_one_error_line(result, "--tokenizer")


@pytest.mark.parametrize("args, message", [
    (["--device-memory", "-5"], "--device-memory must be a positive number"),
    (["--device-memory", "0"], "--device-memory must be a positive number"),
    (["--cache-len", "65"], "--cache-len 65 exceeds the model's context of 64"),
    (["--batch", "0"], "--batch must be positive"),
])
def test_plan_refuses_impossible_sizes(capsys, monkeypatch, args, message):
  """--plan with a negative device memory or a cache longer than the context: one error line,
  where the plan used to print "does NOT fit 1 x -5 GB"."""
  result = main(capsys, monkeypatch, "--plan", "--config", "tiny", *args)
  assert_one_error_line(result, message)


def test_plan_prints_the_plan(capsys, monkeypatch):
  """--plan still prints the memory plan for a config, with the batch and cache asked for."""
  result = main(capsys, monkeypatch, "--plan", "--config", "tiny", "--batch", 2, "--cache-len",
                64, "--mesh", "1x1")
  assert result.returncode == 0, result.stderr
  assert "memory plan:" in result.stdout and "batch 2" in result.stdout
  assert "KV cache 64 tokens" in result.stdout


def test_help_and_version(capsys, monkeypatch):
  """--help lists every option and says where the default checkpoint is looked for; --version
  prints the package version: catches a flag dropped from the parser."""
  result = main(capsys, monkeypatch, "--help")
  assert result.returncode == 0
  for option in ("--prompt", "--checkpoint", "--tokenizer", "--config", "--max-new-tokens",
                 "--temperature", "--top-p", "--top-k", "--seed", "--dtype", "--truncate",
                 "--version", "--plan"):
    assert option in result.stdout
  assert "Default checkpoint" in result.stdout and "checkpoints" in result.stdout
  version = main(capsys, monkeypatch, "--version")
  assert version.returncode == 0 and version.stdout.strip() == f"grok_moe {grok_moe.__version__}"


def test_console_script_and_module_run_the_cli():
  """pyproject declares `grok-moe` as grok_moe.cli:main, and the version is grok_moe's own
  (item 11): catches a console script pointing elsewhere or a second version number."""
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  assert project["project"]["scripts"] == {"grok-moe": "grok_moe.cli:main"}
  assert "version" in project["project"]["dynamic"]
  assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "grok_moe.__version__"}
  assert (REPO / "grok_moe" / "__main__.py").read_text().count("from grok_moe.cli import main")


def copy_package(destination: pathlib.Path) -> pathlib.Path:
  """grok_moe alone in `destination`, as pip installs it into site-packages (no checkpoints/)."""
  shutil.copytree(REPO / "grok_moe", destination / "grok_moe",
                  ignore=shutil.ignore_patterns("__pycache__"))
  return destination


def test_module_outside_the_clone_finds_checkpoints_in_the_current_directory(tiny_checkpoint,
                                                                             tmp_path):
  """python -m grok_moe from an installed copy of the package (no clone around it): with no
  checkpoints/ it says to pass --checkpoint; run in a directory holding checkpoints/demo it
  uses that. Catches paths computed from run.py's location."""
  site = copy_package(tmp_path / "site-packages")
  env = dict(subprocess_env(), PYTHONPATH=str(site))
  empty = tmp_path / "empty"
  empty.mkdir()
  command = [sys.executable, "-m", "grok_moe", "--prompt", "ROMEO:", "--max-new-tokens", "2"]
  lost = subprocess.run(command, cwd=empty, env=env, capture_output=True, text=True,
                        timeout=300)
  assert lost.returncode == 2, lost.stderr
  assert lost.stderr.startswith("error: no checkpoint given") and "--checkpoint" in lost.stderr
  work = tmp_path / "work"
  shutil.copytree(tiny_checkpoint, work / "checkpoints" / "demo")
  found = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
  assert found.returncode == 0, found.stderr
  assert f"the bundled demo model ({work / 'checkpoints' / 'demo'})" in found.stderr
  assert found.stdout.startswith("ROMEO:")


# Starts run.py with SIGINT as a terminal's foreground program gets it. A parent that ignores
# SIGINT (a shell's background job, some test runs) passes that on through exec, and Python
# then never raises KeyboardInterrupt; resetting it in a preexec_fn would fork this
# multithreaded process, so a small Python resets it and execs run.py instead.
TAKE_CTRL_C = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def start(*args, **popen_args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", TAKE_CTRL_C, str(REPO / "run.py"),
                           *map(str, args)], cwd=REPO, env=subprocess_env(),
                          stderr=subprocess.PIPE, **popen_args)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
  try:
    _, stderr = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, stderr.decode()


def test_terminal_on_stdin_is_told_and_ctrl_c_stops_quietly():
  """With no --prompt and a terminal on stdin, stderr says the prompt is read from stdin
  (item 7); Ctrl-C then ends with exit status 130 and no traceback (item 6)."""
  controller, terminal = pty.openpty()
  process = start(stdin=terminal, stdout=subprocess.DEVNULL)
  os.close(terminal)
  try:
    ready, _, _ = select.select([process.stderr], [], [], 60)
    assert ready, "nothing on stderr within 60 s while waiting on the terminal"
    line = process.stderr.readline().decode()
    assert "reading the prompt from stdin" in line and "Ctrl-D" in line
    process.send_signal(signal.SIGINT)
    code, rest = finish(process)
  finally:
    os.close(controller)
  assert code == 130 and rest == ""


def wait_for_prompt(process: subprocess.Popen, prompt: bytes) -> None:
  """Reads stdout until the echoed prompt: generation is about to start."""
  seen = b""
  while not seen.startswith(prompt):
    chunk = process.stdout.read1(64)
    assert chunk, "stdout closed before the prompt"
    seen += chunk


def test_ctrl_c_while_generating_stops_quietly(long_checkpoint):
  """Ctrl-C during generation: exit status 130 and nothing after the load report on stderr
  (no KeyboardInterrupt traceback)."""
  process = start("--checkpoint", long_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens",
                  4000, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
  wait_for_prompt(process, b"ROMEO:")
  process.send_signal(signal.SIGINT)
  code, stderr = finish(process)
  assert code == 130, stderr
  assert "Traceback" not in stderr and stderr.rstrip().splitlines()[-1].startswith("loaded in")


def test_closed_pipe_stops_quietly(long_checkpoint):
  """Output piped into `head`: when the reader goes, generation stops with exit status 141
  and nothing on stderr after the load report (no BrokenPipeError)."""
  process = start("--checkpoint", long_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens",
                  4000, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
  wait_for_prompt(process, b"ROMEO:")
  process.stdout.close()
  code, stderr = finish(process)
  assert code == 141, stderr
  assert "Error" not in stderr and stderr.rstrip().splitlines()[-1].startswith("loaded in")


def test_cpu_devices_runs_on_a_mesh_of_cores_with_the_same_text(tiny_checkpoint):
  """--cpu-devices 2 runs on a 1x2 mesh of CPU devices and gives one device's greedy text."""
  args = ("--checkpoint", tiny_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", "6",
          "--temperature", "0")
  one, two = run(*args), run(*args, "--cpu-devices", "2")
  assert two.returncode == 0, two.stderr
  assert "onto a 1x2 mesh" in two.stderr
  assert two.stdout == one.stdout  # greedy, float32: the mesh gives one device's logits

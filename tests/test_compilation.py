"""The persistent compilation cache: a second run with the same shapes compiles nothing again."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from grok_moe import compilation

REPO = pathlib.Path(__file__).resolve().parent.parent

# One run of the Model API in a fresh process (the cache lives across processes):
# load the bundled demo, generate a few tokens, report the timer's counts.
_RUN = """
import json, sys
import grok_moe
from grok_moe import compilation
model = grok_moe.Model.from_checkpoint("checkpoints/demo", dtype="float32", progress=False,
                                       compilation_cache=sys.argv[1])
timer = compilation.CompileTimer()
model.generate_tokens([5, 6, 7], max_new_tokens=3, temperature=0)
print(json.dumps({"hits": timer.cache_hits, "compile_s": model.last_stats.compile_s,
                  "dir": str(model.compilation_cache)}))
"""


def _run(cache_dir: pathlib.Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", _RUN, str(cache_dir)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_run_with_the_same_shapes_hits_the_compilation_cache(tmp_path):
  """The first run fills the cache directory and loads nothing from it; the second, in a
  new process with the same shapes, loads its programs from it. Catches a cache that is
  never turned on, pointed elsewhere, or skips the small programs (JAX's default skips
  programs that compiled in under a second)."""
  first = _run(tmp_path)
  assert first["dir"] == str(tmp_path) and first["hits"] == 0
  assert any(tmp_path.iterdir()), "nothing was written to the cache"
  second = _run(tmp_path)
  assert second["hits"] >= 2  # at least the prefill and the decode step


def test_cache_directory_follows_the_argument_and_the_environment(monkeypatch, tmp_path):
  """GROK_MOE_COMPILATION_CACHE moves the cache or turns it off; an argument overrides it."""
  monkeypatch.delenv(compilation.ENVIRONMENT_VARIABLE, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation.resolve_cache_dir() == tmp_path / "xdg" / "grok_moe" / "jax"
  monkeypatch.setenv(compilation.ENVIRONMENT_VARIABLE, str(tmp_path / "elsewhere"))
  assert compilation.resolve_cache_dir() == tmp_path / "elsewhere"
  for off in ("off", "0", ""):
    monkeypatch.setenv(compilation.ENVIRONMENT_VARIABLE, off)
    assert compilation.resolve_cache_dir() is None
  assert compilation.resolve_cache_dir(tmp_path / "given") == tmp_path / "given"
  assert compilation.resolve_cache_dir(False) is None

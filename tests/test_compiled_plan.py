"""The compiled memory plan: XLA's per-device bytes of every program generation runs."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from grok_moe import compiled_plan, memory, sharding
from grok_moe.config import BENCH, TINY

REPO = pathlib.Path(__file__).resolve().parent.parent
# The scan runs every layer in one layer's buffers, so temporaries do not grow with
# the layer count; what little does (loop bookkeeping) is far below 10% here
# (measured: 5.64 and 5.65 MB for the prefill chunk, 0.80 and 0.82 MB for the decode
# step). float32, the CPU's activation dtype: XLA on CPU has no bfloat16 cache
# update, so a bfloat16 cache costs one float32 working copy of the whole cache,
# which does grow with the layers (not so on GPUs and TPUs).
TEMPORARIES_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def plans():
  mesh = sharding.make_mesh(1, 8)
  return {layers: compiled_plan.compiled_plan(BENCH.replace(num_layers=layers), mesh,
                                              prompt_len=512, cache_len=1024,
                                              prefill_chunk=256, dtype="float32")
          for layers in (2, 6)}


def test_temporaries_do_not_grow_with_the_layer_count(plans):
  """2 and 6 layers of BENCH on 8 devices: each program's temporaries within 10%.
  Catches a model whose layers are unrolled (or whose scan keeps every layer's
  activations alive) instead of reusing one layer's buffers."""
  two, six = plans[2], plans[6]
  assert [p.name for p in two.programs] == ["prefill_chunk_256", "decode_step"]
  for small, large in zip(two.programs, six.programs):
    assert small.temp_bytes > 0
    assert abs(large.temp_bytes - small.temp_bytes) <= TEMPORARIES_TOLERANCE * small.temp_bytes, (
        small.name, small.temp_bytes, large.temp_bytes)


def test_arguments_are_the_analytic_plan(plans):
  """XLA's argument bytes are the weights and cache the parameter table counts, plus the
  small inputs (tokens, validity, logits, sampler settings): catches a plan that lays
  out weights or the cache differently from what the model receives."""
  for layers, plan in plans.items():
    analytic = memory.memory_plan(BENCH.replace(num_layers=layers), (1, 8), 1, 1024,
                                  cache_dtype="float32")
    for program in plan.programs:
      small_inputs = program.argument_bytes - analytic.total
      assert 0 <= small_inputs < 100_000, (layers, program.name, small_inputs)
    prefill = plan.programs[0]
    assert prefill.runs == 2  # 512 tokens in chunks of 256
    assert plan.peak_bytes == max(p.peak_bytes for p in plan.programs) and plan.fits


def test_run_py_prints_the_compiled_plan_as_json():
  """run.py --plan --json on forced CPU devices: one JSON object with a program per
  prefill chunk size and the decode step, and the peak and verdict at the top."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, str(REPO / "run.py"), "--cpu-devices", "2", "--plan", "--config", "tiny",
       "--mesh", "1x2", "--prompt-len", "40", "--cache-len", "64", "--prefill-chunk", "16",
       "--num-layers", "3", "--json"],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  plan = json.loads(result.stdout)
  assert plan["num_layers"] == 3 and plan["mesh"] == "1x2"
  assert [p["name"] for p in plan["programs"]] == ["prefill_chunk_16", "decode_step"]
  assert plan["programs"][0]["runs"] == 3
  for program in plan["programs"]:
    assert program["compile_s"] > 0 and program["argument_bytes"] > 0
  assert plan["peak_bytes"] == max(p["peak_bytes"] for p in plan["programs"])
  assert plan["fits"] is True


@pytest.mark.parametrize("flags, message", [
    (["--device-memory", "-5"], "--device-memory must be a positive"),
    (["--cache-len", "65"], "exceeds the model's context of 64"),
    (["--prompt-len", "50", "--cache-len", "32"], "does not fit a cache of 32"),
])
def test_run_py_refuses_impossible_plans(flags, message):
  """Plans no model could run get a one-line error and exit code 2, not a plan."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(REPO / "run.py"), "--plan", "--config", "tiny",
                           *flags], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=env)
  assert result.returncode == 2
  assert message in result.stderr and "Traceback" not in result.stderr

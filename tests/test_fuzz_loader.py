"""The loader under fuzzing: no file makes it crash, hang, raise a raw exception or spike memory.

Runs `python -m benchmarks.fuzz_loader` (300 seeded cases: mutations of the
demo checkpoint's tensor files and the hand-written payloads of issue 12),
each read in a worker subprocess with a 3 GiB address-space cap and a 10 s
timeout. The long run for the README is the same command with --cases 5000.
"""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_300_fuzz_cases_end_in_a_load_or_a_checkpoint_error(tmp_path):
  """Catches crashes, hangs, raw exceptions and memory spikes on mutated or hostile files.

  Also checks the run exercised both outcomes (a decoder that refused every
  file, or accepted every file, would fail here) and that every hostile
  payload got past the size check and was refused by the decoder itself.
  """
  report = tmp_path / "fuzz.json"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.fuzz_loader", "--cases", "300", "--json", str(report)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False)
  summary = json.loads(report.read_text())
  assert result.returncode == 0, summary["bad_cases"]
  outcomes = summary["outcomes"]
  assert outcomes["raw"] == outcomes["crash"] == outcomes["hang"] == 0, summary["bad_cases"]
  assert outcomes["ok"] > 30 and outcomes["error"] > 100, outcomes
  assert summary["peak_extra_mb"] <= summary["peak_limit_mb"]
  hostile = {kind: counts for kind, counts in summary["by_kind"].items()
             if kind.startswith("hostile")}
  assert len(hostile) == 13 and all(set(counts) == {"error"} for counts in hostile.values())
  for kind, message in summary["hostile_errors"].items():
    assert "needs at least" not in message and "tensor00000_000" in message, (kind, message)

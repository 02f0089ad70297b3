"""This process's resident memory, from /proc/self/status (Linux), for the benchmarks."""

from __future__ import annotations

import pathlib


def status_bytes(field: str) -> int | None:
  """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024  # kB
  except OSError:
    pass
  return None


def reset_peak_rss() -> bool:
  """Restart the peak RSS (VmHWM) at the current RSS (Linux >= 4.0); False where it cannot.

  VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss also counts its
  parent's RSS at the time of the fork.
  """
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False

"""Load throughput and peak host memory of `grok_moe.checkpoint.load_checkpoint`.

  python -m benchmarks.load_checkpoint [--size-mb 400] [--workers 4]

Writes a random release-format checkpoint of about --size-mb (the BENCH config
with as many layers as that takes) into a temporary directory, then loads it
in a fresh subprocess per measurement, so that building and writing it does
not count towards the peak RSS. Each load is measured with 1 and with
--workers reader threads, and with two `place` functions:

- "drop": the tensor is handed off and dropped, as a GPU/TPU `place` does once
  the copy is on the device; peak RSS minus the RSS before loading is the
  loader's own host memory, which should stay near (workers + 1) x the largest
  tensor;
- "jax-cpu": the default `place` on jax's CPU device, whose "device memory" is
  host memory, so the whole model shows up in the RSS.

"warm" reads come from the page cache (the files were just written); "cold"
ones first drop the files from the cache with posix_fadvise(DONTNEED). Each
row is the median of --repeats loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax

from grok_moe import params as param_table
from grok_moe import checkpoint, manifest, quant
from grok_moe.config import BENCH
from tests import helpers

MB = 1e6
PLACES = ("drop", "jax-cpu")


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.load_checkpoint",
      description="Measure checkpoint load throughput (MB/s) and peak host memory (RSS).")
  parser.add_argument("--size-mb", type=float, default=400,
                      help="approximate checkpoint size in MB (default: 400)")
  parser.add_argument("--workers", type=int, default=4,
                      help="reader threads to compare with 1 (default: 4)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="loads per measurement; the median is reported (default: 3)")
  parser.add_argument("--dir", type=pathlib.Path, default=None,
                      help="write the checkpoint here and keep it (default: a temporary "
                           "directory, deleted afterwards)")
  parser.add_argument("--measure", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--place", choices=PLACES, default="drop", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _status_mb(field: str) -> float:
  """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024 / MB  # kB
  raise KeyError(field)


def _reset_peak_rss() -> bool:
  """Restart the peak RSS (VmHWM) at the current RSS (Linux >= 4.0).

  VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss also counts its
  parent's RSS at the time of the fork, here the params just written.
  """
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def _config_of_size(size_mb: float):
  """The BENCH config with as many layers as make about size_mb of checkpoint."""
  one_layer = _checkpoint_bytes(BENCH.replace(num_layers=1))
  two_layers = _checkpoint_bytes(BENCH.replace(num_layers=2))
  per_layer = two_layers - one_layer
  layers = max(1, round((size_mb * MB - (one_layer - per_layer)) / per_layer))
  return BENCH.replace(num_layers=layers)


def _checkpoint_bytes(config) -> int:
  """Bytes of tensor data in the release form: int8 + bf16 scales, or float32."""
  total = 0
  for name, shape in manifest.parameter_shapes(config).items():
    row_blocks = param_table.row_blocks_for(name)
    if row_blocks is None:
      total += 4 * math.prod(shape)
    else:
      *batch, _, cols = shape
      total += math.prod(shape) + 2 * math.prod(batch) * row_blocks * cols
  return total


def _write_checkpoint(config, root: pathlib.Path) -> float:
  """Random release-form params saved to root; returns the seconds it took."""
  params = manifest.unflatten(helpers.random_params(config, "release", seed=0))
  start = time.perf_counter()
  checkpoint.save_checkpoint(params, root, config, overwrite=True, progress=False)
  return time.perf_counter() - start


def _evict_from_page_cache(tensor_dir: pathlib.Path) -> None:
  for path in tensor_dir.iterdir():
    descriptor = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(descriptor)


def _measure(root: pathlib.Path, workers: int, place_name: str) -> dict:
  """One load in this process: seconds, MB/s and RSS before and at peak."""
  place = {"drop": lambda name, leaf: None,
           "jax-cpu": checkpoint.place_on_default_device}[place_name]
  jax.block_until_ready(jax.device_put(0))  # start the backend before the baseline
  total_bytes = sum(path.stat().st_size for path in (root / "ckpt-0").iterdir())
  if not _reset_peak_rss():  # then the peak may be the imports' and `added` too low
    print("warning: cannot reset the peak RSS", file=sys.stderr)
  rss_before = _status_mb("VmRSS")
  start = time.perf_counter()
  checkpoint.load_checkpoint(root, max_workers=workers, place=place, progress=False)
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "mb_per_s": total_bytes / MB / seconds,
          "rss_before_mb": rss_before, "peak_rss_mb": _status_mb("VmHWM")}


def _measure_in_subprocess(root: pathlib.Path, workers: int, place: str, cold: bool) -> dict:
  if cold:
    _evict_from_page_cache(root / "ckpt-0")
  command = [sys.executable, "-m", "benchmarks.load_checkpoint", "--measure", str(root),
             "--workers", str(workers), "--place", place]
  repo_root = pathlib.Path(__file__).resolve().parents[1]
  output = subprocess.run(command, cwd=repo_root, check=True, capture_output=True,
                          text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def _median_measurement(root: pathlib.Path, workers: int, place: str, cold: bool,
                        repeats: int) -> dict:
  """The measurement with the median time of `repeats` loads, each in a fresh process."""
  results = sorted((_measure_in_subprocess(root, workers, place, cold) for _ in range(repeats)),
                   key=lambda result: result["seconds"])
  return results[len(results) // 2]


def _report(root: pathlib.Path, config, save_seconds: float, worker_counts,
            repeats: int) -> None:
  sizes = [path.stat().st_size for path in (root / "ckpt-0").iterdir()]
  print(f"checkpoint: {sum(sizes) / MB:.0f} MB in {len(sizes)} files "
        f"(BENCH config, num_layers={config.num_layers}); largest tensor file "
        f"{max(sizes) / MB:.1f} MB; saved at {sum(sizes) / MB / save_seconds:.0f} MB/s")
  print(f"{'cache':>5} {'place':>8} {'workers':>7} {'MB/s':>8} {'seconds':>8} "
        f"{'RSS before':>11} {'peak RSS':>9} {'added':>8} {'added / largest':>16}")
  for cache in ("warm", "cold"):
    for place in PLACES:
      for workers in worker_counts:
        result = _median_measurement(root, workers, place, cache == "cold", repeats)
        added = result["peak_rss_mb"] - result["rss_before_mb"]
        print(f"{cache:>5} {place:>8} {workers:>7} {result['mb_per_s']:>8.0f} "
              f"{result['seconds']:>8.2f} {result['rss_before_mb']:>8.0f} MB "
              f"{result['peak_rss_mb']:>6.0f} MB {added:>5.0f} MB "
              f"{added * MB / max(sizes):>15.1f}x")


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.measure is not None:
    print(json.dumps(_measure(args.measure, args.workers, args.place)))
    return
  config = _config_of_size(args.size_mb)
  worker_counts = sorted({1, args.workers})
  with tempfile.TemporaryDirectory(prefix="grok_moe_load_bench_") as temporary:
    root = args.dir or pathlib.Path(temporary) / "checkpoint"
    save_seconds = _write_checkpoint(config, root)
    _report(root, config, save_seconds, worker_counts, args.repeats)


if __name__ == "__main__":
  main()

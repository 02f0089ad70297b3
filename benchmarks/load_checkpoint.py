"""Load throughput and peak host memory of `grok_moe.checkpoint.load_checkpoint`.

  python -m benchmarks.load_checkpoint [--size-mb 400] [--workers 4] [--json PATH]

Writes a random release-format checkpoint of about --size-mb (the BENCH config
with as many layers as that takes; `grok_moe.random_weights`) into a
temporary directory, then loads it in a fresh subprocess per measurement, so
that building and writing it does not count towards the peak RSS. Each load
is measured with 1 and with --workers reader threads, in three modes:

- "stacked": the real load, no `place` hook: every layer's tensor is written
  into its slot of the stacked array on jax's default device
  (`checkpoint._StackedTarget`). Its device memory is measured as the sum of
  the bytes of all live jax arrays (`jax.live_arrays()`) over the baseline
  before loading, sampled just before and just after each layer's in-place
  write (`checkpoint._write_layer`, wrapped here) and after each tensor is
  added, and its peak is compared with the issue's bound: the final arrays'
  bytes plus the largest single layer tensor (no stack-then-copy doubling).
  On the CPU backend device memory is host memory, so the RSS holds the model
  too;
- "drop": `place` hands the tensor off and drops it, as a GPU/TPU `place` does
  once the copy is on the device; peak RSS minus the RSS before loading is the
  loader's own host memory, which should stay near (workers + 1) x the largest
  tensor;
- "jax-cpu": `place` is `checkpoint.place_on_default_device` (one jax array
  per release tensor, release-named, nothing stacked); live array bytes are
  sampled after each tensor as for "stacked".

"warm" reads come from the page cache (the files were just written); "cold"
ones first drop the files from the cache with posix_fadvise(DONTNEED). Each
row is the median of --repeats loads. It prints a Markdown table and writes
every measurement to benchmarks/results/load-checkpoint-latest.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax

from benchmarks import process_memory
from grok_moe import params as param_table
from grok_moe import checkpoint, manifest, random_weights
from grok_moe.config import BENCH

MB = 1e6
MODES = ("stacked", "drop", "jax-cpu")


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
  parser.add_argument("--json", type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parent / "results"
                      / "load-checkpoint-latest.json",
                      help="write every measurement here (default: %(default)s)")
  parser.add_argument("--measure", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--mode", choices=MODES, default="stacked", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _status_mb(field: str) -> float:
  """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
  value = process_memory.status_bytes(field)
  if value is None:
    raise KeyError(field)
  return value / MB


def _config_of_size(size_mb: float):
  """The BENCH config with as many layers as make about size_mb of checkpoint."""
  one_layer = _checkpoint_bytes(BENCH.replace(num_layers=1))
  two_layers = _checkpoint_bytes(BENCH.replace(num_layers=2))
  per_layer = two_layers - one_layer
  layers = max(1, round((size_mb * MB - (one_layer - per_layer)) / per_layer))
  return BENCH.replace(num_layers=layers)


def _tensor_bytes(name: str, shape) -> int:
  """Bytes of one release tensor: int8 + bf16 scales, or float32."""
  row_blocks = param_table.row_blocks_for(name)
  if row_blocks is None:
    return 4 * math.prod(shape)
  *batch, _, cols = shape
  return math.prod(shape) + 2 * math.prod(batch) * row_blocks * cols


def _checkpoint_bytes(config) -> int:
  """Bytes of tensor data in the release form (= the final arrays' bytes)."""
  return sum(_tensor_bytes(name, shape)
             for name, shape in manifest.parameter_shapes(config).items())


def _largest_layer_tensor_bytes(config) -> int:
  """Bytes of the largest per-layer tensor: what a load may hold beside the stacks."""
  return max(_tensor_bytes(spec.release_name(0), spec.layer_shape(config))
             for spec in param_table.layer_params_for(config))


def _write_checkpoint(config, root: pathlib.Path) -> float:
  """Random release-form params saved to root; returns the seconds it took."""
  params = random_weights.release_params(config, seed=0)
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


def _live_array_bytes() -> int:
  """Bytes of every live jax array (one device here: an array's nbytes is its buffer)."""
  return sum(array.nbytes for array in jax.live_arrays())


class _LiveBytesPeak:
  """The peak of `_live_array_bytes()` over the samples taken so far."""

  def __init__(self):
    self.peak = 0
    self.samples = 0

  def sample(self) -> None:
    self.peak = max(self.peak, _live_array_bytes())
    self.samples += 1


def _sampling_device_memory(peak: _LiveBytesPeak) -> None:
  """Samples live array bytes around each stacked write and after each tensor added.

  Just before `_write_layer` the stack and the placed layer are both live;
  just after it, the old stack too unless it was donated (the doubling the
  bound rules out).
  """
  # pylint: disable=protected-access
  write_layer, add = checkpoint._write_layer, checkpoint._StackedTarget.add

  def sampled_write_layer(stack, leaf, layer):
    peak.sample()
    result = jax.block_until_ready(write_layer(stack, leaf, layer))
    peak.sample()
    return result

  def sampled_add(target, *args, **kwargs):
    add(target, *args, **kwargs)
    peak.sample()

  checkpoint._write_layer = sampled_write_layer
  checkpoint._StackedTarget.add = sampled_add


def _measure(root: pathlib.Path, workers: int, mode: str) -> dict:
  """One load in this process: seconds, MB/s, RSS before and at peak, and live jax
  array bytes at the peak and at the end, over the baseline before loading."""
  peak = _LiveBytesPeak()

  def place_and_sample(name, leaf):
    placed = checkpoint.place_on_default_device(name, leaf)
    peak.sample()
    return placed

  place = {"stacked": None, "drop": lambda name, leaf: None,
           "jax-cpu": place_and_sample}[mode]
  if mode == "stacked":
    _sampling_device_memory(peak)
  jax.block_until_ready(jax.device_put(0))  # start the backend before the baseline
  total_bytes = sum(path.stat().st_size for path in (root / "ckpt-0").iterdir())
  live_before = _live_array_bytes()
  if not process_memory.reset_peak_rss():  # then the peak may be the imports' and `added` too low
    print("warning: cannot reset the peak RSS", file=sys.stderr)
  rss_before = _status_mb("VmRSS")
  start = time.perf_counter()
  params = checkpoint.load_checkpoint(root, max_workers=workers, place=place, progress=False)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  peak_rss = _status_mb("VmHWM")
  final_bytes = _live_array_bytes() - live_before
  return {"seconds": seconds, "mb_per_s": total_bytes / MB / seconds,
          "rss_before_mb": rss_before, "peak_rss_mb": peak_rss,
          "device_peak_mb": (peak.peak - live_before) / MB if peak.samples else None,
          "device_final_mb": final_bytes / MB, "device_samples": peak.samples}


def _measure_in_subprocess(root: pathlib.Path, workers: int, mode: str, cold: bool) -> dict:
  if cold:
    _evict_from_page_cache(root / "ckpt-0")
  command = [sys.executable, "-m", "benchmarks.load_checkpoint", "--measure", str(root),
             "--workers", str(workers), "--mode", mode]
  repo_root = pathlib.Path(__file__).resolve().parents[1]
  output = subprocess.run(command, cwd=repo_root, check=True, capture_output=True,
                          text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def _median_measurement(root: pathlib.Path, workers: int, mode: str, cold: bool,
                        repeats: int) -> dict:
  """The measurement with the median time of `repeats` loads, each in a fresh process."""
  results = sorted((_measure_in_subprocess(root, workers, mode, cold) for _ in range(repeats)),
                   key=lambda result: result["seconds"])
  return results[len(results) // 2]


def _report(root: pathlib.Path, config, save_seconds: float, worker_counts,
            repeats: int) -> dict:
  """Prints the table (Markdown) and returns every measurement for the JSON."""
  sizes = [path.stat().st_size for path in (root / "ckpt-0").iterdir()]
  final_mb = _checkpoint_bytes(config) / MB
  largest_layer_mb = _largest_layer_tensor_bytes(config) / MB
  bound_mb = final_mb + largest_layer_mb
  print(f"checkpoint: {sum(sizes) / MB:.0f} MB in {len(sizes)} files "
        f"(BENCH config, num_layers={config.num_layers}); largest tensor file "
        f"{max(sizes) / MB:.1f} MB; saved at {sum(sizes) / MB / save_seconds:.0f} MB/s")
  print(f"device memory bound: final arrays {final_mb:.1f} MB + largest layer tensor "
        f"{largest_layer_mb:.1f} MB = {bound_mb:.1f} MB")
  print()
  print("| cache | mode | workers | MB/s | seconds | RSS before | peak RSS | RSS added "
        "| added / largest file | device peak | device final | peak / bound |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  rows = []
  for cache in ("warm", "cold"):
    for mode in MODES:
      for workers in worker_counts:
        result = _median_measurement(root, workers, mode, cache == "cold", repeats)
        added = result["peak_rss_mb"] - result["rss_before_mb"]
        device_peak = result["device_peak_mb"]
        device = (("-", "-") if device_peak is None else
                  (f"{device_peak:.1f} MB", f"{device_peak / bound_mb:.3f}"))
        print(f"| {cache} | {mode} | {workers} | {result['mb_per_s']:.0f} "
              f"| {result['seconds']:.2f} | {result['rss_before_mb']:.0f} MB "
              f"| {result['peak_rss_mb']:.0f} MB | {added:.0f} MB "
              f"| {added * MB / max(sizes):.1f}x | {device[0]} "
              f"| {result['device_final_mb']:.1f} MB | {device[1]} |")
        rows.append(dict(result, cache=cache, mode=mode, workers=workers))
  return {"config_layers": config.num_layers, "checkpoint_mb": sum(sizes) / MB,
          "files": len(sizes), "largest_file_mb": max(sizes) / MB,
          "final_arrays_mb": final_mb, "largest_layer_tensor_mb": largest_layer_mb,
          "device_bound_mb": bound_mb, "repeats": repeats, "measurements": rows}


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.measure is not None:
    print(json.dumps(_measure(args.measure, args.workers, args.mode)))
    return
  config = _config_of_size(args.size_mb)
  worker_counts = sorted({1, args.workers})
  with tempfile.TemporaryDirectory(prefix="grok_moe_load_bench_") as temporary:
    root = args.dir or pathlib.Path(temporary) / "checkpoint"
    save_seconds = _write_checkpoint(config, root)
    results = _report(root, config, save_seconds, worker_counts, args.repeats)
  results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  results["jax"] = jax.__version__
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(results, indent=1) + "\n")
  print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
  main()

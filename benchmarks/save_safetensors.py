"""Time and host memory of `save_checkpoint(..., format="safetensors")`.

  python -m benchmarks.save_safetensors [--layers 2 8] [--max-shard-mb 500]

For each layer count: bfloat16 params of a Mixtral-shaped model (Mixtral-8x7B's
vocabulary, experts and heads' layout at width 1024, expert FFN 3584) are
made on jax's default device (filled with constants: the values do not matter
to the save), then saved into a temporary directory. The row reports the
process's peak resident memory during the save (VmHWM, restarted just before
it) minus its resident memory just before it. The save takes one tensor at a
time from the device, so that increase should not grow with the layers (on
the CPU backend the params themselves are host memory, already counted
before): it is compiled code and a few copies of the largest tensor.

Measured on 2 shared CPU cores, 2026-12-02 (`python -m benchmarks.save_safetensors`):

| layers | params (bf16) | files | save | rate | resident before | during save |
| --- | --- | --- | --- | --- | --- | --- |
| 2 | 494 MB | 1 | 2.3 s | 216 MB/s | 738 MB | +264 MB |
| 8 | 1582 MB | 4 | 5.2 s | 303 MB/s | 1903 MB | +262 MB |
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax.numpy as jnp

from benchmarks import process_memory
from grok_moe import checkpoint
from grok_moe import params as param_table
from grok_moe.config import MIXTRAL_8X7B


def measure(layers: int, max_shard_mb: int) -> str:
  config = MIXTRAL_8X7B.replace(emb_size=1024, num_q_heads=8, num_kv_heads=2,
                                num_layers=layers, expert_ffn_size=3584,
                                widening_factor=3584 / 1024)
  flat = {spec.path: jnp.full(spec.stored_shape(config), 0.5 + i, jnp.bfloat16)
          for i, spec in enumerate(param_table.params_for(config))}
  total_mb = sum(array.nbytes for array in flat.values()) / 1e6

  with tempfile.TemporaryDirectory() as directory:
    if not process_memory.reset_peak_rss():
      raise SystemExit("this benchmark needs Linux's /proc/self/clear_refs (Linux >= 4.0)")
    before = process_memory.status_bytes("VmRSS") / 1e6
    start = time.perf_counter()
    root = checkpoint.save_checkpoint(param_table.unflatten(flat), pathlib.Path(directory) / "m",
                                      config, format="safetensors", progress=False,
                                      max_shard_bytes=max_shard_mb * 10**6)
    seconds = time.perf_counter() - start
    peak = process_memory.status_bytes("VmHWM") / 1e6
    files = len(list(root.glob("*.safetensors")))
  return (f"| {layers} | {total_mb:.0f} MB | {files} | {seconds:.1f} s | "
          f"{total_mb / seconds:.0f} MB/s | {before:.0f} MB | +{peak - before:.0f} MB |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
  parser.add_argument("--max-shard-mb", type=int, default=500)
  args = parser.parse_args()
  print("| layers | params (bf16) | files | save | rate | resident before | during save |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for layers in args.layers:
    print(measure(layers, args.max_shard_mb), flush=True)


if __name__ == "__main__":
  main()

"""The machine's own limits, measured: read bandwidth and matmul FLOP/s.

Both are measured with the same JAX and XLA that run the model, so a ratio
"model time / limit time" says how far the model is from what this machine
does for the simplest program that reads as many bytes or does as many
FLOPs, not from a number on a data sheet.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, args_list, repeats: int) -> tuple[float, list[float]]:
  """Median and all wall times of `repeats` calls of fn, rotating through args_list.

  fn is called once on each argument set first, so compilation and first-touch
  costs stay outside the timed calls.
  """
  for args in args_list:
    jax.block_until_ready(fn(*args))
  times = []
  for i in range(repeats):
    args = args_list[i % len(args_list)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


@jax.jit
def _sum(x):
  return jnp.sum(x, dtype=jnp.float32)


def read_bandwidth(num_bytes: int, repeats: int) -> dict:
  """Bytes/s of a jitted float32 sum over an array of num_bytes (two arrays, alternated)."""
  size = num_bytes // 4
  arrays = [jnp.full((size,), value, jnp.float32) for value in (1.0, 2.0)]
  seconds, times = median_seconds(_sum, [(a,) for a in arrays], repeats)
  return {"bytes": size * 4, "seconds": seconds, "times": times,
          "bytes_per_s": size * 4 / seconds}


def matmul_flops(size: int, dtype, repeats: int) -> dict:
  """FLOP/s of a jitted [size, size] @ [size, size] matmul in dtype (2 size^3 FLOPs)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  a, b, c = (jax.random.normal(key, (size, size), jnp.float32).astype(dtype) for key in keys)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=dtype))
  seconds, times = median_seconds(matmul, [(a, b), (c, a), (b, c)], repeats)
  flops = 2 * size ** 3
  return {"size": size, "dtype": jnp.dtype(dtype).name, "seconds": seconds, "times": times,
          "flops_per_s": flops / seconds}

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


def _matmul_program(size: int, dtype):
  """The FLOP limit's program: a jitted [size, size] @ [size, size] matmul in dtype, and
  three argument pairs to rotate through."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  a, b, c = (jax.random.normal(key, (size, size), jnp.float32).astype(dtype) for key in keys)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=dtype))
  return matmul, [(a, b), (c, a), (b, c)]


def matmul_flops(size: int, dtype, repeats: int) -> dict:
  """FLOP/s of a jitted [size, size] @ [size, size] matmul in dtype (2 size^3 FLOPs)."""
  matmul, args_list = _matmul_program(size, dtype)
  seconds, times = median_seconds(matmul, args_list, repeats)
  flops = 2 * size ** 3
  return {"size": size, "dtype": jnp.dtype(dtype).name, "seconds": seconds, "times": times,
          "flops_per_s": flops / seconds}


def seconds_at_flop_limit(fn, args_list, flops: float, size: int, dtype,
                          repeats: int) -> dict:
  """fn's time over the time of `flops` at the FLOP limit, with the limit measured beside it.

  Each of `repeats` rounds times one call of the limit's matmul
  (`matmul_flops`'s program) and then one call of fn (rotating through
  args_list), so that both see the same state of a shared machine; the
  round's ratio is fn's time over flops / (the matmul's FLOP/s in that
  round). Returns the median of those ratios ("ratio"), fn's median time
  ("seconds") and the matmul's median FLOP/s ("flops_per_s"), with every
  round's times. On a shared machine the matmul's own time moves by a
  third within a minute (41 to 62 ms for 2048^3 on the 2-core CPU), so a
  limit measured once, minutes before the program, puts that drift into the
  ratio.
  """
  matmul, matmul_args = _matmul_program(size, dtype)
  for program, programs_args in ((matmul, matmul_args), (fn, args_list)):
    for args in programs_args:  # compiles, and touches the arguments first
      jax.block_until_ready(program(*args))
  fn_times, matmul_times = [], []
  for i in range(repeats):
    for program, args, times in ((matmul, matmul_args[i % len(matmul_args)], matmul_times),
                                 (fn, args_list[i % len(args_list)], fn_times)):
      start = time.perf_counter()
      jax.block_until_ready(program(*args))
      times.append(time.perf_counter() - start)
  matmul_flops_each = 2 * size ** 3
  ratios = [fn_time / (flops * matmul_time / matmul_flops_each)
            for fn_time, matmul_time in zip(fn_times, matmul_times)]
  return {"ratio": statistics.median(ratios), "ratios": ratios,
          "seconds": statistics.median(fn_times), "times": fn_times,
          "flops_per_s": matmul_flops_each / statistics.median(matmul_times),
          "matmul_times": matmul_times}

"""Time of one MoE layer's gradient: sparse_moe's custom VJP against dense_moe's autodiff.

  python -m benchmarks.moe_grad [--tokens 4096] [--tile-size 256] [--repeats 10]

One layer of the demo model's size by default (4096 tokens = a batch of 16
windows of 256, D 128, F 344, 8 experts, top 2, float32), random weights and
a random router, so the experts get uneven shares as in training. Each row
is the median of --repeats calls of a jitted function after one call that
compiles it; the functions take turns, call by call, so that other load on
the machine slows them alike:

- forward: `moe.sparse_moe` alone;
- gradient, custom VJP: `jax.grad` of <sparse_moe(...), c> for a fixed random
  cotangent c, with respect to x, the gates and the three expert weights:
  the forward rule and the backward pass together, as a training step runs them;
- gradient, dense: the same for `moe.dense_moe` (every expert on every
  token).

(JAX's own differentiation of sparse_moe's loops is no longer a row: they
run over the experts with rows and their tiles with traced trip counts,
which JAX cannot differentiate in reverse mode.)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok_moe import moe


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.moe_grad",
      description="Time one MoE layer's forward pass, and its gradient two ways "
                  "(sparse_moe's custom VJP, dense_moe's autodiff).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--tokens", type=int, default=4096, help="tokens N")
  parser.add_argument("--width", type=int, default=128, help="model width D")
  parser.add_argument("--hidden", type=int, default=344, help="expert hidden width F")
  parser.add_argument("--experts", type=int, default=8, help="experts E")
  parser.add_argument("--top", type=int, default=2, help="experts per token k")
  parser.add_argument("--tile-size", type=int, default=256, help="sparse_moe tile rows")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per row")
  parser.add_argument("--seed", type=int, default=0, help="weights, router and cotangent")
  return parser.parse_args(argv)


def _inputs(args):
  """x [N, D], gates and expert indices [N, k] from a random router, w_in, w_v, w_out, cotangent."""
  rng = np.random.default_rng(args.seed)
  n, d, f, e = args.tokens, args.width, args.hidden, args.experts
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  router = jnp.asarray(rng.normal(size=(d, e)) / d ** 0.5, jnp.float32)
  gates, expert_indices = moe.route(x, router, args.top)
  weights = [jnp.asarray(rng.normal(size=shape) / shape[1] ** 0.5, jnp.float32)
             for shape in ((e, d, f), (e, d, f), (e, f, d))]
  cotangent = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  return x, gates, expert_indices, weights, cotangent


def _gradient(dispatch, cotangent):
  """A jitted (x, gates, expert_indices, *weights) -> cotangents of x, gates and the weights."""
  def objective(x, gates, expert_indices, *weights):
    return jnp.sum(dispatch(x, gates, expert_indices, *weights) * cotangent)

  return jax.jit(jax.grad(objective, argnums=(0, 1, 3, 4, 5)))


def _median_seconds(functions: dict, inputs, repeats: int) -> dict:
  """{name: median seconds of a call} over `repeats` rounds, each calling every function once."""
  for fn in functions.values():
    jax.block_until_ready(fn(*inputs))  # compiles
  times = {name: [] for name in functions}
  for _ in range(repeats):
    for name, fn in functions.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*inputs))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(seconds) for name, seconds in times.items()}


def main(argv=None) -> None:
  args = _parse_args(argv)
  x, gates, expert_indices, weights, cotangent = _inputs(args)
  inputs = (x, gates, expert_indices, *weights)
  sparse = functools.partial(moe.sparse_moe, tile_size=args.tile_size)
  rows = {
      "forward": jax.jit(sparse),
      "gradient, custom VJP": _gradient(sparse, cotangent),
      "gradient, dense_moe autodiff": _gradient(moe.dense_moe, cotangent),
  }
  counts = np.bincount(np.asarray(expert_indices).ravel(), minlength=args.experts)
  print(f"N {args.tokens}, D {args.width}, F {args.hidden}, E {args.experts}, top {args.top}, "
        f"tile {args.tile_size}, float32; rows per expert {counts.tolist()}; "
        f"jax {jax.__version__} on {jax.default_backend()}, load average "
        f"{os.getloadavg()[0]:.2f}")
  medians = _median_seconds(rows, inputs, args.repeats)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  print("| function | median ms | x forward |\n| --- | ---: | ---: |")
  for name, seconds in medians.items():
    print(f"| {name} | {seconds * 1e3:.1f} | {seconds / medians['forward']:.2f} |")


if __name__ == "__main__":
  main()

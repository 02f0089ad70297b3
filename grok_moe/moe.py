"""Mixture-of-experts feed-forward: routing and sparse dispatch.

Axis letters: N tokens, D model width, E experts, F expert hidden width,
k experts per token, A = N*k assignments (token, expert) pairs, C tile rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grok_moe import quant

DEFAULT_TILE_SIZE = 128


def route(x: jax.Array, router_w: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k routing in float32: softmax over all E experts, then top_k.

  The gates are the softmax probabilities themselves (not renormalised over
  the k chosen experts); ties go to the lower expert index.
  Returns gates [N, k] float32 and expert indices [N, k] int32.
  """
  logits = jnp.matmul(x.astype(jnp.float32), router_w.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)        # [N, E]
  probs = jax.nn.softmax(logits, axis=-1)                         # [N, E]
  gates, expert_indices = jax.lax.top_k(probs, k)                 # [N, k]
  return gates, expert_indices.astype(jnp.int32)


def expert_ffn(x: jax.Array, w_in: quant.Weight, w_v: quant.Weight,
               w_out: quant.Weight) -> jax.Array:
  """One expert: (gelu(x @ W) * (x @ V)) @ O, gelu in its tanh form. x [C, D] -> [C, D]."""
  hidden = jax.nn.gelu(quant.matmul(x, w_in)) * quant.matmul(x, w_v)  # [C, F]
  return quant.matmul(hidden, w_out)                                  # [C, D]


def dense_moe(x, gates, expert_indices, w_in, w_v, w_out):
  """Every expert on every token, weighted by its gate (0 when not selected).

  The baseline the sparse path is measured against: E/k times the work.
  """
  num_experts = w_in.shape[0]
  # [N, E]: the gate of each expert for each token, 0 where not selected.
  expert_gates = jnp.sum(
      jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.float32) * gates[..., None],
      axis=1)
  out = jnp.zeros(x.shape, jnp.float32)
  for e in range(num_experts):
    y = expert_ffn(x, quant.take(w_in, e), quant.take(w_v, e), quant.take(w_out, e))
    out = out + y.astype(jnp.float32) * expert_gates[:, e:e + 1]
  return out.astype(x.dtype)


def _tile_size_for(num_assignments: int, tile_size: int | None) -> int:
  """Tile rows: the default, but never more than the assignments rounded up to 8."""
  tile_size = tile_size or DEFAULT_TILE_SIZE
  return max(1, min(tile_size, -(-num_assignments // 8) * 8))


def sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, *, tile_size=None):
  """Each token through its k selected experts only; no token is dropped.

  Algorithm (A = N*k assignments, C rows a tile):
    1. Flatten the (token, expert, gate) assignments and sort them by expert
       (stable, so tokens keep their order within an expert).
    2. `lax.scan` over the experts. An expert no token chose is skipped with
       `lax.cond`, so its weights are never read; otherwise its int8 weights
       are dequantized once and its rows run in tiles of C rows
       (ceil(count / C) tiles; the loop's static bound is ceil(N / C)).
    3. Each tile gathers its tokens, runs the expert's FFN, scales the rows by
       their gates and scatter-adds them back onto their tokens, undoing the
       sort. Padding rows of the last tile carry gate 0.
  Work: about A + E*C/2 rows of FFN instead of the dense N*E.
  """
  num_tokens, width = x.shape
  k = expert_indices.shape[-1]
  num_experts = w_in.shape[0]
  num_assignments = num_tokens * k
  tile = _tile_size_for(num_assignments, tile_size)

  # 1. Sort assignments by expert.
  flat_experts = expert_indices.reshape(num_assignments)                       # [A]
  flat_tokens = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)         # [A]
  order = jnp.argsort(flat_experts, stable=True)                               # [A]
  sorted_tokens = flat_tokens[order]                                           # [A]
  sorted_gates = gates.reshape(num_assignments)[order]                         # [A]
  counts = jnp.bincount(flat_experts, length=num_experts)                      # [E]
  row_begin = jnp.cumsum(counts) - counts                                      # [E]

  # 2.-3. One expert at a time, its rows in tiles. An expert has at most N
  # rows (a token picks distinct experts), so ceil(N / C) tiles bound the loop
  # statically; tiles past the expert's own count are skipped. The static
  # bound keeps the loop reverse-differentiable (for training the demo).
  max_tiles = -(-num_tokens // tile)

  def run_expert(out, expert):
    count = counts[expert]

    def process(out):
      expert_weights = [quant.dequantize(quant.take(w, expert), x.dtype)
                        for w in (w_in, w_v, w_out)]                           # [D, F], [D, F], [F, D]

      def run_tile(out, tile_index):
        def compute(out):
          within = tile_index * tile + jnp.arange(tile)                        # [C]
          valid = within < count                                               # [C]
          rows = jnp.where(valid, row_begin[expert] + within, 0)               # [C]
          tokens = sorted_tokens[rows]                                         # [C]
          row_gates = jnp.where(valid, sorted_gates[rows], 0.0)                # [C]
          y = expert_ffn(x[tokens], *expert_weights)                           # [C, D]
          return out.at[tokens].add(y.astype(jnp.float32) * row_gates[:, None])

        return jax.lax.cond(tile_index * tile < count, compute, lambda out: out, out), None

      out, _ = jax.lax.scan(run_tile, out, jnp.arange(max_tiles))
      return out

    return jax.lax.cond(count > 0, process, lambda out: out, out), None

  out, _ = jax.lax.scan(run_expert, jnp.zeros((num_tokens, width), jnp.float32),
                        jnp.arange(num_experts))                               # [N, D]
  return out.astype(x.dtype)

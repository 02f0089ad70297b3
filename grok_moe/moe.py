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
    2. Give each expert ceil(count_e / C) tiles; every tile holds rows of one
       expert only. At most (A + E*(C-1)) // C tiles exist: a static bound.
    3. `lax.scan` over the tiles: gather the tile's tokens, run that expert's
       FFN on them (its int8 weights dequantized there, for that tile only),
       and skip the unused tiles at the end with `lax.cond`, so an expert no
       token chose is never read.
    4. Scale each row by its gate and scatter-add the rows back onto their
       tokens (undoing the sort).
  """
  num_tokens, width = x.shape
  k = expert_indices.shape[-1]
  num_experts = w_in.shape[0]
  num_assignments = num_tokens * k
  tile = _tile_size_for(num_assignments, tile_size)
  max_tiles = (num_assignments + num_experts * (tile - 1)) // tile

  # 1. Sort assignments by expert.
  flat_experts = expert_indices.reshape(num_assignments)                       # [A]
  flat_tokens = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)         # [A]
  flat_gates = gates.reshape(num_assignments)                                  # [A]
  order = jnp.argsort(flat_experts, stable=True)                               # [A]
  sorted_tokens = flat_tokens[order]                                           # [A]
  sorted_gates = flat_gates[order]                                             # [A]

  # 2. Tiles per expert and where each expert's rows and tiles start.
  counts = jnp.bincount(flat_experts, length=num_experts)                      # [E]
  tiles_per_expert = -(-counts // tile)                                        # [E]
  tile_end = jnp.cumsum(tiles_per_expert)                                      # [E]
  tile_begin = tile_end - tiles_per_expert                                     # [E]
  row_begin = jnp.cumsum(counts) - counts                                      # [E]
  used_tiles = tile_end[-1]

  tile_ids = jnp.arange(max_tiles)                                             # [T]
  tile_expert = jnp.minimum(
      jnp.searchsorted(tile_end, tile_ids, side="right"), num_experts - 1)     # [T]
  within = (tile_ids - tile_begin[tile_expert])[:, None] * tile + jnp.arange(tile)  # [T, C]
  row_valid = (within < counts[tile_expert][:, None]) & (tile_ids < used_tiles)[:, None]
  rows = jnp.where(row_valid, row_begin[tile_expert][:, None] + within, 0)     # [T, C]
  row_tokens = sorted_tokens[rows]                                             # [T, C]
  row_gates = jnp.where(row_valid, sorted_gates[rows], 0.0)                    # [T, C]

  # 3. One expert per tile.
  def run_tile(_, tile_inputs):
    tile_id, expert, tokens = tile_inputs

    def compute():
      return expert_ffn(x[tokens], quant.take(w_in, expert), quant.take(w_v, expert),
                        quant.take(w_out, expert))                             # [C, D]

    y = jax.lax.cond(tile_id < used_tiles, compute,
                     lambda: jnp.zeros((tile, width), x.dtype))
    return None, y

  _, tile_outputs = jax.lax.scan(run_tile, None, (tile_ids, tile_expert, row_tokens))  # [T, C, D]

  # 4. Gate and scatter back.
  weighted = tile_outputs.astype(jnp.float32) * row_gates[..., None]          # [T, C, D]
  out = jnp.zeros((num_tokens, width), jnp.float32).at[row_tokens.reshape(-1)].add(
      weighted.reshape(-1, width))                                             # [N, D]
  return out.astype(x.dtype)

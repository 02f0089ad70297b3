"""Mixture-of-experts feed-forward: routing and sparse dispatch.

Axis letters: N tokens, D model width, E experts, F expert hidden width,
k experts per token, A = N*k assignments (token, expert) pairs, C tile rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grok_moe import quant

DEFAULT_TILE_SIZE = 256


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


def _indexed_expert_ffn(x, w_in, w_v, w_out, index):
  """expert_ffn with the expert at `index` of the stacks ([E, ...] or [L, E, ...]), read in
  place. x [C, D] -> [C, D]."""
  hidden = (jax.nn.gelu(quant.matmul(x, w_in, index=index))
            * quant.matmul(x, w_v, index=index))                             # [C, F]
  return quant.matmul(hidden, w_out, index=index)                           # [C, D]


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


def _tile_size_for(num_tokens: int, tile_size: int | None) -> int:
  """Tile rows: the default, but never more than the tokens (an expert's most rows)."""
  tile_size = tile_size or DEFAULT_TILE_SIZE
  return max(1, min(tile_size, num_tokens))


def _last_tile_sizes(tile: int) -> tuple[int, ...]:
  """Sizes for an expert's last, partial tile: 8, 16, 24, 40, 64, 96, ... (x1.5, multiples
  of 8) below `tile`, then `tile`."""
  sizes, size = [], 8
  while size < tile:
    sizes.append(size)
    size = -(-(size * 3 // 2) // 8) * 8
  return (*sizes, tile)


def sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, *, tile_size=None, layer=None):
  """Each token through its k selected experts only; no token is dropped.

  Algorithm (A = N*k assignments, C rows a tile, at most N):
    1. Flatten the (token, expert, gate) assignments and sort them by expert
       (stable, so tokens keep their order within an expert).
    2. `lax.scan` over the experts. An expert no token chose is skipped with
       `lax.cond`, so its weights are never read.
    3. An expert's `count` rows run as count // C full tiles of C rows (a scan
       with the static bound N // C, tiles past the count skipped), then the
       remaining count % C rows as one tile of the smallest size that holds
       them among 8, 16, 24, 40, 64, 96, ..., C (`lax.switch`), so a partial
       tile pads less than half its rows (plus up to 8), and an expert with
       fewer than C rows costs one call of each matmul.
    4. Each tile gathers its tokens, runs the expert's FFN, scales the rows by
       their gates and scatter-adds them back onto their tokens, undoing the
       sort. Padding rows carry gate 0.
  Weights: with tiles of more than quant.CHUNKED_MAX_ROWS rows (prefill,
  training) an expert's weights are dequantized once for all its tiles; with
  fewer (decode) `quant.matmul` reads its int8 weights in place, chunk by chunk.
  `layer` (an int or traced index) selects one layer of weights stacked
  [L, E, ...], read in place.
  Work: A rows of FFN plus the padding of one partial tile per expert,
  instead of the dense N*E. Every loop has a static trip count, so the
  function is reverse-differentiable (for training the demo).
  """
  num_tokens, width = x.shape
  k = expert_indices.shape[-1]
  num_experts = w_in.shape[-3]
  # With `layer`, the weights are every layer's stacks [L, E, ...], read at [layer, expert].
  prefix = () if layer is None else (layer,)
  num_assignments = num_tokens * k
  tile = _tile_size_for(num_tokens, tile_size)
  last_tile_sizes = _last_tile_sizes(tile)
  convert_once = tile > quant.CHUNKED_MAX_ROWS

  # 1. Sort assignments by expert.
  flat_experts = expert_indices.reshape(num_assignments)                       # [A]
  flat_tokens = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)         # [A]
  order = jnp.argsort(flat_experts, stable=True)                               # [A]
  sorted_tokens = flat_tokens[order]                                           # [A]
  sorted_gates = gates.reshape(num_assignments)[order]                         # [A]
  counts = jnp.bincount(flat_experts, length=num_experts)                      # [E]
  row_begin = jnp.cumsum(counts) - counts                                      # [E]

  def run_expert(out, expert):
    count = counts[expert]

    def process(out):
      if convert_once:  # dequantize the expert's weights once for all its tiles
        weights = [quant.dequantize(quant.take(w, prefix + (expert,)), x.dtype)
                   for w in (w_in, w_v, w_out)]                                # [D, F], [D, F], [F, D]
        ffn = functools.partial(expert_ffn, w_in=weights[0], w_v=weights[1], w_out=weights[2])
      else:  # few rows: quant.matmul reads the expert's weights in place
        ffn = functools.partial(_indexed_expert_ffn, w_in=w_in, w_v=w_v, w_out=w_out,
                                index=prefix + (expert,))

      def run_rows(out, first, size: int):
        """The expert's rows first .. first + size (those below count) onto out."""
        within = first + jnp.arange(size)                                      # [C]
        valid = within < count                                                 # [C]
        rows = jnp.where(valid, row_begin[expert] + within, 0)                 # [C]
        tokens = sorted_tokens[rows]                                           # [C]
        row_gates = jnp.where(valid, sorted_gates[rows], 0.0)                  # [C]
        y = ffn(x[tokens])                                                     # [C, D]
        return out.at[tokens].add(y.astype(jnp.float32) * row_gates[:, None])

      full_tiles = count // tile

      def run_full_tile(out, index):
        return jax.lax.cond(index < full_tiles,
                            lambda out: run_rows(out, index * tile, tile),
                            lambda out: out, out), None

      out, _ = jax.lax.scan(run_full_tile, out, jnp.arange(num_tokens // tile))
      first, rest = full_tiles * tile, count % tile
      branches = [lambda out: out] + [functools.partial(run_rows, first=first, size=size)
                                      for size in last_tile_sizes]
      # 0 when no rows are left, else 1 + the smallest size that holds them.
      branch = jnp.where(rest > 0, 1 + jnp.searchsorted(jnp.asarray(last_tile_sizes), rest), 0)
      return jax.lax.switch(branch, branches, out)

    return jax.lax.cond(count > 0, process, lambda out: out, out), None

  out, _ = jax.lax.scan(run_expert, jnp.zeros((num_tokens, width), jnp.float32),
                        jnp.arange(num_experts))                               # [N, D]
  return out.astype(x.dtype)

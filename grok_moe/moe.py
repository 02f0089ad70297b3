"""Mixture-of-experts feed-forward: routing and sparse dispatch.

Axis letters: N tokens, D model width, E experts, F expert hidden width,
k experts per token, A = N*k assignments (token, expert) pairs, C tile rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok_moe import quant
from grok_moe.soft_cap import soft_cap

DEFAULT_TILE_SIZE = 256


def route(x: jax.Array, router_w: jax.Array, k: int, renormalize: bool = False,
          logit_cap: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Top-k routing in float32: softmax over all E experts, then top_k.

  The router logits x @ router_w are soft-capped to c * tanh(g / c) first
  when `logit_cap` c is not 0 (Grok-2). The gates are the softmax
  probabilities themselves (Grok-1, Grok-2), or with `renormalize` those
  divided by their sum over the k chosen experts (Mixtral, Qwen3-MoE); ties
  go to the lower expert index.
  Returns gates [N, k] float32 and expert indices [N, k] int32.
  """
  logits = jnp.matmul(x.astype(jnp.float32), router_w.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)        # [N, E]
  logits = soft_cap(logits, logit_cap)
  probs = jax.nn.softmax(logits, axis=-1)                         # [N, E]
  gates, expert_indices = jax.lax.top_k(probs, k)                 # [N, k]
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return gates, expert_indices.astype(jnp.int32)


# "gelu": the tanh form (Grok-1); "gelu_exact": 0.5 x (1 + erf(x / sqrt 2)) (Grok-2).
ACTIVATIONS = {"gelu": jax.nn.gelu, "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
               "silu": jax.nn.silu}


def expert_ffn(x: jax.Array, w_in: quant.Weight, w_v: quant.Weight,
               w_out: quant.Weight, activation: str = "gelu", index=None,
               native: bool = True) -> jax.Array:
  """One expert: (act(x @ W) * (x @ V)) @ O, act one of ACTIVATIONS. x [C, D] -> [C, D].

  With `index`, the weights are stacks ([E, ...] or [L, E, ...]) and the expert
  at `index` is read in place. `native` as in `quant.matmul`.
  """
  matmul = functools.partial(quant.matmul, index=index, native=native)
  hidden = ACTIVATIONS[activation](matmul(x, w_in)) * matmul(x, w_v)    # [C, F]
  return matmul(hidden, w_out)                                         # [C, D]


def dense_moe(x, gates, expert_indices, w_in, w_v, w_out, activation: str = "gelu"):
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
    y = expert_ffn(x, quant.take(w_in, e), quant.take(w_v, e), quant.take(w_out, e), activation)
    out = out + y.astype(jnp.float32) * expert_gates[:, e:e + 1]
  return out.astype(x.dtype)


def _tile_size_for(num_tokens: int, tile_size: int | None) -> int:
  """Tile rows: the default, but never more than the tokens (an expert's most rows)."""
  tile_size = tile_size or DEFAULT_TILE_SIZE
  return max(1, min(tile_size, num_tokens))


def _tile_sizes(tile: int) -> tuple[int, ...]:
  """The sizes of tile an expert's rows run in, largest first: `tile`, then the powers of
  two below it down to 8 (`tile` alone when it is at most 8)."""
  smallest = min(8, tile)
  return (tile, *(1 << j for j in reversed(range(tile.bit_length()))
                  if smallest <= 1 << j < tile))


class _SortedAssignments(NamedTuple):
  """The A = N*k (token, expert) assignments sorted by expert (stable: tokens keep their order)."""

  order: jax.Array      # [A] each sorted row's place among the flat [N*k] assignments
  tokens: jax.Array     # [A] each sorted row's token
  gates: jax.Array      # [A] each sorted row's gate
  counts: jax.Array     # [E] rows of each expert
  row_begin: jax.Array  # [E] each expert's first sorted row


def _sort_assignments(gates, expert_indices, num_experts: int) -> _SortedAssignments:
  """gates, expert_indices [N, k] -> their assignments sorted by expert.

  Indices outside 0 .. E-1 sort last and count for no expert, so they are never run.
  """
  num_tokens, k = expert_indices.shape
  num_assignments = num_tokens * k
  flat_experts = expert_indices.reshape(num_assignments)                       # [A]
  flat_tokens = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)         # [A]
  order = jnp.argsort(flat_experts, stable=True)                               # [A]
  counts = jnp.bincount(flat_experts, length=num_experts)                      # [E]
  return _SortedAssignments(order=order, tokens=flat_tokens[order],
                            gates=gates.reshape(num_assignments)[order], counts=counts,
                            row_begin=jnp.cumsum(counts) - counts)


def _tile_rows(assignments: _SortedAssignments, expert, first, size: int):
  """Rows first .. first + size of `expert`'s sorted rows, padded past its count.

  Returns sorted row [C], valid [C], token [C] and gate [C]; padding rows
  (valid False) point at row 0 and carry gate 0.
  """
  within = first + jnp.arange(size)                                            # [C]
  valid = within < assignments.counts[expert]                                  # [C]
  rows = jnp.where(valid, assignments.row_begin[expert] + within, 0)           # [C]
  tokens = assignments.tokens[rows]                                            # [C]
  row_gates = jnp.where(valid, assignments.gates[rows], 0.0)                   # [C]
  return rows, valid, tokens, row_gates


def _tile_counts(count, sizes: tuple[int, ...]) -> list[jax.Array]:
  """How many tiles of each of `sizes` (`_tile_sizes(tile)`) cover `count` rows.

  count // tile full tiles; the rest rounded up to a multiple of the smallest
  size (so padded by at most 7 rows), which is one more full tile if it
  reaches `tile`, else a sum of distinct powers of two below `tile`: its bits.
  """
  tile, smallest = sizes[0], sizes[-1]
  rest = jnp.minimum((count % tile + smallest - 1) // smallest * smallest, tile)
  counts = [count // tile + (rest == tile)]
  return counts + [((rest < tile) & ((rest & size) != 0)).astype(count.dtype)
                   for size in sizes[1:]]


def _over_tiles(run_rows, carry, count, tile: int):
  """carry through run_rows(carry, first, size) over an expert's `count` rows, tile by tile.

  The rows run as `_tile_counts` tiles of each size of `_tile_sizes(tile)`,
  largest first, each size a loop of that many steps (most run 0 or 1 times):
  one compiled FFN per size, and at most 7 padding rows per expert.
  """
  sizes = _tile_sizes(tile)
  first = jnp.zeros((), count.dtype)
  for size, tiles in zip(sizes, _tile_counts(count, sizes)):
    carry = jax.lax.fori_loop(
        0, tiles, lambda index, carry, first=first, size=size: run_rows(
            carry, first + index * size, size), carry)
    first = first + tiles * size
  return carry


def _active_experts(counts) -> tuple[jax.Array, jax.Array]:
  """counts [E] -> the experts with rows, in index order, padded with 0s [E], and their number."""
  has_rows = counts > 0                                                        # [E]
  (active,) = jnp.nonzero(has_rows, size=counts.shape[0], fill_value=0)        # [E]
  return active.astype(jnp.int32), jnp.sum(has_rows, dtype=jnp.int32)


def sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, *, tile_size=None, layer=None,
               activation: str = "gelu", native: bool = True):
  """Each token through its k selected experts only; no token is dropped.

  With int8 weights and float32 x on CPU, where the native kernel is built
  (`quant.fuses_int8`; `native=False` declines it), the forward pass is
  `_grouped_moe_forward`: the sorted assignments go through three grouped
  matmuls of the kernel, every expert's rows at once, and `tile_size` is
  unused. Otherwise:

  Algorithm (A = N*k assignments, C rows a tile, at most N):
    1. Flatten the (token, expert, gate) assignments and sort them by expert
       (stable, so tokens keep their order within an expert).
    2. A loop over the experts that have rows only (their number is a traced
       trip count), so an expert no token chose costs nothing and its weights
       are never read: decoding one token with 8 of 128 experts runs 8 steps.
    3. An expert's `count` rows run as count // C full tiles of C rows, then
       the rest, rounded up to a multiple of 8, as at most one tile each of
       the powers of two below C (its binary digits; 75 rows with C = 256: 64
       + 16), each size a loop of 0 or 1 steps: at most 7 padding rows per
       expert, and one compiled FFN per size (6 for C = 256).
    4. Each tile gathers its tokens, runs the expert's FFN, scales the rows by
       their gates and scatter-adds them back onto their tokens, undoing the
       sort. Padding rows carry gate 0.
  Weights: `quant.matmul` reads an expert's int8 weights in place, in the
  native kernel (`quant.fuses_int8`) or, for tiles of at most
  quant.CHUNKED_MAX_ROWS rows (decode), chunk by chunk; otherwise (tiles of
  more rows without the native kernel: prefill, training) an expert's weights
  are dequantized once for all its tiles.
  Work: A rows of FFN plus at most 7 padding rows per expert with rows,
  instead of the dense N*E.

  `layer` (an int or a traced index) selects one layer of weights stacked
  [L, E, ...] (the model's layer scan), read in place at [layer, expert]:
  slicing the layer out first would copy all its experts where decoding
  reads k of them.

  Gradient: a `jax.custom_vjp` (`_sparse_moe_backward`) that walks the same
  tiles and skips the same empty experts and tiles (JAX cannot differentiate
  loops of a traced trip count in reverse mode, and its differentiation of
  scans over every expert and tile took 10x as long for one demo-sized
  layer). It keeps only the inputs and recomputes each tile's FFN. It gives
  the cotangents of x, gates and the weights' float leaves: float weights,
  or the bfloat16 scales of a QuantizedWeight (whose int8 values, like
  expert_indices, get float0 zeros: integers have no gradient). Reverse
  mode only: `jax.jvp` through it raises.
  """
  # NumPy inputs become arrays, which traced indices can index.
  arrays = jax.tree.map(jnp.asarray, (x, gates, expert_indices, w_in, w_v, w_out))
  layer = None if layer is None else jnp.asarray(layer, jnp.int32)
  return _sparse_moe(_Static(tile_size, activation, native), layer, *arrays)


class _Static(NamedTuple):
  """The custom_vjp's static argument: the tile rows, the experts' activation and whether
  the native kernel may be used."""
  tile_size: int | None
  activation: str
  native: bool


def _prefix(layer) -> tuple:
  """The leading index of an expert's weights before the expert's own: (layer,) or ()."""
  return () if layer is None else (layer,)


def _grouped_moe_forward(activation, layer, x, gates, expert_indices, w_in, w_v, w_out):
  """`sparse_moe` as three grouped matmuls of the native kernel (`quant.grouped_matmul`).

  The assignments sorted by expert are the rows, each expert's row count its
  group: every expert's rows at once, with no tiles and no padding. The
  kernel gathers the rows' tokens from x itself, and the down projection adds
  each row's output times its gate onto its token.
  """
  num_experts = w_in.shape[-3]
  assignments = _sort_assignments(gates, expert_indices, num_experts)
  project = functools.partial(quant.grouped_matmul, group_sizes=assignments.counts,
                              index=_prefix(layer))
  hidden = (ACTIVATIONS[activation](project(x, w_in, rows=assignments.tokens))
            * project(x, w_v, rows=assignments.tokens))                        # [A, F]
  out = project(hidden, w_out, targets=assignments.tokens, row_scales=assignments.gates,
                out_rows=x.shape[0])                                           # [N, D]
  return out.astype(x.dtype)


def _sparse_moe_forward(static, layer, x, gates, expert_indices, w_in, w_v, w_out):
  """`sparse_moe`'s algorithm, with tile_size and activation first (the custom_vjp's
  static argument)."""
  tile_size, activation, native = static
  if native and all(quant.fuses_int8(x.dtype, w) for w in (w_in, w_v, w_out)):
    return _grouped_moe_forward(activation, layer, x, gates, expert_indices, w_in, w_v, w_out)
  num_tokens, width = x.shape
  num_experts = w_in.shape[-3]
  prefix = _prefix(layer)
  tile = _tile_size_for(num_tokens, tile_size)
  convert_once = tile > quant.CHUNKED_MAX_ROWS
  assignments = _sort_assignments(gates, expert_indices, num_experts)

  active, num_active = _active_experts(assignments.counts)

  def run_expert(index, out):
    expert = active[index]
    if convert_once:  # dequantize the expert's weights once for all its tiles
      weights = [quant.dequantize(quant.take(w, prefix + (expert,)), x.dtype)
                 for w in (w_in, w_v, w_out)]                          # [D, F], [D, F], [F, D]
      ffn = functools.partial(expert_ffn, w_in=weights[0], w_v=weights[1], w_out=weights[2],
                              activation=activation)
    else:  # few rows: quant.matmul reads the expert's weights in place
      ffn = functools.partial(expert_ffn, w_in=w_in, w_v=w_v, w_out=w_out,
                              index=prefix + (expert,), activation=activation, native=native)

    def run_rows(out, first, size: int):
      """The expert's rows first .. first + size (those below its count) onto out."""
      _, _, tokens, row_gates = _tile_rows(assignments, expert, first, size)  # [C] each
      y = ffn(x[tokens])                                                     # [C, D]
      return out.at[tokens].add(y.astype(jnp.float32) * row_gates[:, None])

    return _over_tiles(run_rows, out, assignments.counts[expert], tile)

  out = jax.lax.fori_loop(0, num_active, run_expert,
                          jnp.zeros((num_tokens, width), jnp.float32))         # [N, D]
  return out.astype(x.dtype)


def _sparse_moe_forward_with_residuals(static, layer, x, gates, expert_indices, w_in, w_v,
                                       w_out):
  """The custom_vjp's forward rule: the output, and the inputs as its only residuals."""
  out = _sparse_moe_forward(static, layer, x, gates, expert_indices, w_in, w_v, w_out)
  return out, (layer, x, gates, expert_indices, w_in, w_v, w_out)


def _sparse_moe_backward(static, residuals, out_grad):
  """Cotangents of (layer, x, gates, expert_indices, w_in, w_v, w_out) from out_grad [N, D].

  The forward's walk again (the same sort, the same experts with rows and
  tiles). Per expert, its weights are dequantized once to x's dtype
  (keeping the VJP of that step), then per tile of rows, with g_t the tile's
  rows of out_grad in float32:
    1. recompute y_t = expert_ffn(x_t) and keep its VJP (nothing from the
       forward pass is stored but its inputs);
    2. d gate = <g_t, y_t> per row (0 for padding rows);
    3. d x_t, d W_t = VJP(g_t * gate), padding rows having gate 0;
    4. scatter-add d x_t onto the tokens and d gate onto the sorted rows;
       sum d W_t over the tiles in float32.
  The expert's summed d W goes back through the dequantization's VJP to the
  float leaves of its weights (the weights themselves, or the scales of int8
  weights), written into its slot of zero stacks shaped as the weights
  ([E, ...], or [L, E, ...] with a `layer`), so that experts no token chose
  and other layers get zero cotangents. Finally the gate cotangents are
  unsorted.
  """
  tile_size, activation, _ = static
  layer, x, gates, expert_indices, w_in, w_v, w_out = residuals
  prefix = _prefix(layer)
  ffn = functools.partial(expert_ffn, activation=activation)
  num_tokens = x.shape[0]
  num_experts = w_in.shape[-3]
  tile = _tile_size_for(num_tokens, tile_size)
  assignments = _sort_assignments(gates, expert_indices, num_experts)
  out_grad = jnp.asarray(out_grad, jnp.float32)                                    # [N, D]
  weight_leaves, weight_tree = jax.tree.flatten((w_in, w_v, w_out))
  is_float = [_is_float(leaf) for leaf in weight_leaves]

  float_leaves = [leaf for leaf, f in zip(weight_leaves, is_float) if f]
  active, num_active = _active_experts(assignments.counts)

  def run_expert(index, carry):
    expert = active[index]
    x_grad, sorted_gate_grad, stacked_float_grads = carry
    # weights: w_in, w_v [D, F] and w_out [F, D] in x's dtype.
    weights, dense_weights_vjp = _dense_expert_weights_with_vjp(
        (w_in, w_v, w_out), prefix + (expert,), x.dtype)

    def run_rows(carry, first, size: int):
      """The expert's rows first .. first + size: their cotangents added to carry."""
      x_grad, sorted_gate_grad, weight_grads = carry
      rows, valid, tokens, row_gates = _tile_rows(assignments, expert, first, size)  # [C]
      y, ffn_vjp = jax.vjp(ffn, x[tokens], *weights)                           # y [C, D]
      row_grad = out_grad[tokens]                                              # [C, D]
      row_gate_grad = jnp.where(
          valid, jnp.sum(row_grad * y.astype(jnp.float32), axis=-1), 0.0)      # [C]
      rows_x_grad, *tile_weight_grads = ffn_vjp(
          (row_grad * row_gates[:, None]).astype(y.dtype))                     # [C, D], W shapes
      return (x_grad.at[tokens].add(rows_x_grad.astype(jnp.float32)),
              sorted_gate_grad.at[rows].add(row_gate_grad),
              [total + part.astype(jnp.float32)
               for total, part in zip(weight_grads, tile_weight_grads)])

    zero_weight_grads = [jnp.zeros(w.shape, jnp.float32) for w in weights]
    x_grad, sorted_gate_grad, weight_grads = _over_tiles(
        run_rows, (x_grad, sorted_gate_grad, zero_weight_grads), assignments.counts[expert],
        tile)
    (float_grads,) = dense_weights_vjp(
        [grad.astype(w.dtype) for grad, w in zip(weight_grads, weights)])
    return (x_grad, sorted_gate_grad,
            [_put(stack, grad, prefix + (expert,))
             for stack, grad in zip(stacked_float_grads, float_grads)])

  init = (jnp.zeros(x.shape, jnp.float32),                                     # [N, D]
          jnp.zeros(assignments.gates.shape, jnp.float32),                     # [A]
          [jnp.zeros(leaf.shape, leaf.dtype) for leaf in float_leaves])        # [(L,) E, ...]
  x_grad, sorted_gate_grad, stacked_float_grads = jax.lax.fori_loop(
      0, num_active, run_expert, init)
  stacked = iter(stacked_float_grads)
  weight_grads = jax.tree.unflatten(
      weight_tree, [next(stacked) if f else _integer_cotangent(leaf)
                    for leaf, f in zip(weight_leaves, is_float)])
  gates_grad = jnp.zeros_like(sorted_gate_grad).at[assignments.order].set(
      sorted_gate_grad).reshape(gates.shape)                                   # [N, k]
  layer_grad = None if layer is None else _integer_cotangent(layer)
  return (layer_grad, x_grad.astype(x.dtype), gates_grad.astype(gates.dtype),
          _integer_cotangent(expert_indices), *weight_grads)


def _put(stack, value, index: tuple):
  """stack [I..., ...] with value [...] written at the leading index (traced ints)."""
  start = (*index, *(0,) * value.ndim)
  return jax.lax.dynamic_update_slice(stack, value.reshape((1,) * len(index) + value.shape),
                                      start)


def _is_float(leaf) -> bool:
  """Whether a weight leaf has a gradient: float weights and scales do, int8 values not."""
  return jnp.issubdtype(leaf.dtype, jnp.floating)


def _dense_expert_weights_with_vjp(weights, index, dtype):
  """One expert's weights dequantized to `dtype`, and the VJP of that step.

  weights: the stacks (w_in, w_v, w_out) [E, ...] (or [L, E, ...]), float arrays or
  QuantizedWeight, of which the expert at `index` is used.
  Returns [w_in [D, F], w_v [D, F], w_out [F, D]] and a function from their
  cotangents to those of the expert's float leaves (in tree order: the float
  weights themselves, or the scales of int8 weights).
  """
  leaves, tree = jax.tree.flatten(weights)
  expert_leaves = [quant.take(leaf, index) for leaf in leaves]                # [D, F] etc.

  def dense(float_leaves):
    replacements = iter(float_leaves)
    merged = [next(replacements) if _is_float(leaf) else leaf for leaf in expert_leaves]
    return [quant.dequantize(w, dtype) for w in jax.tree.unflatten(tree, merged)]

  return jax.vjp(dense, [leaf for leaf in expert_leaves if _is_float(leaf)])


def _integer_cotangent(value) -> np.ndarray:
  """The cotangent JAX expects for an integer input: float0 zeros of its shape."""
  return np.zeros(np.shape(value), jax.dtypes.float0)


_sparse_moe = jax.custom_vjp(_sparse_moe_forward, nondiff_argnums=(0,))
_sparse_moe.defvjp(_sparse_moe_forward_with_residuals, _sparse_moe_backward)

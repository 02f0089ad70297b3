"""moe.sparse_moe and moe.dense_moe against a plain NumPy loop over experts; moe.route.

Sizes are odd and distinct (D 24, F 40, E 5) so that a swapped axis fails.
Relative error is max|a - b| / max|b|.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import moe, quant
from tests import helpers, oracle

D, F, E = 24, 40, 5
# float32 (unit roundoff 6e-8) against the float64 loop: sums of 24 and 40
# terms and a gate-weighted sum of k, measured at ~1e-7 relative; 1e-5 leaves
# 100x room, while a wrong expert, gate, row or scale block is O(1).
LOOP_TOLERANCE = 1e-5
# sparse vs dense: the same float32 expert computation in a different order
# (tiles, gate-weighted sums); each is within ~4e-7 of the float64 loop
# (measured), so they differ by at most ~8e-7: 2e-6 leaves room for that.
DENSE_TOLERANCE = 2e-6

sparse_jit = jax.jit(moe.sparse_moe, static_argnames=("tile_size", "native"))
dense_jit = jax.jit(moe.dense_moe)


def _expert_weights(layout: str, seed: int):
  """w_in, w_v [E, D, F] and w_out [E, F, D] in `layout` (see helpers.LAYOUTS)."""
  rng = np.random.default_rng(seed)
  names = ("moe/linear/w", "moe/linear_v/w", "moe/linear_1/w")
  shapes = ((E, D, F), (E, D, F), (E, F, D))
  return [helpers.random_weight(rng, shape, helpers.row_blocks(name, layout), gain=1.5)
          for name, shape in zip(names, shapes)]


def _routing(rng, num_tokens: int, k: int, unused_expert: int | None):
  """Random distinct experts per token (never `unused_expert`) and gates in (0, 1)."""
  scores = rng.random((num_tokens, E))
  if unused_expert is not None:
    scores[:, unused_expert] = -1.0
  indices = np.argsort(-scores, axis=-1)[:, :k].astype(np.int32)
  gates = rng.uniform(0.05, 0.6, size=(num_tokens, k)).astype(np.float32)
  return gates, indices


def loop_moe(x, gates, indices, w_in, w_v, w_out):
  """The reference: for each expert, its tokens through its FFN, times their gates (float64)."""
  w_in, w_v, w_out = (oracle.dense_weight(w) for w in (w_in, w_v, w_out))
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for e in range(w_in.shape[0]):
    tokens, slot = np.nonzero(indices == e)                 # the (token, slot) pairs choosing e
    if tokens.size == 0:
      continue
    xe = x[tokens]                                          # [n_e, D]
    ye = (oracle.gelu_tanh(xe @ w_in[e]) * (xe @ w_v[e])) @ w_out[e]
    np.add.at(out, tokens, gates[tokens, slot][:, None] * ye)
  return out


# Every token count, top-1 and top-2 in each weight layout, the default tile
# and tiles of 1, 3, 8, 50 and one larger than all assignments, and experts
# that no token chooses; each case compiles, so the set is small. Tiles of at
# most quant.CHUNKED_MAX_ROWS rows read int8 weights chunk by chunk (on CPU).
# Where the native kernel is built, int8 weights take its grouped path (no
# tiles); each int8 case also runs with native=False, the tiled path of other
# backends and machines.
CASES = (
    # (tokens, k, tile_size, layout, unused expert)
    (1, 1, None, "release", None),
    (2, 2, None, "swapped", None),
    (7, 2, 3, "float", 3),
    (64, 1, 8, "swapped", None),
    (64, 2, 1, "release", None),
    (300, 2, None, "release", 0),
    (300, 1, 1000, "float", None),
    (300, 2, 50, "swapped", None),   # full tiles of 50, then a partial tile of 16 or 24
)


@pytest.mark.parametrize("num_tokens,k,tile_size,layout,unused_expert,native", [
    (*case, native) for case in CASES
    for native in ((True,) if case[3] == "float" else (True, False))])
def test_sparse_matches_loop_and_dense(num_tokens, k, tile_size, layout, unused_expert, native):
  rng = np.random.default_rng(num_tokens * 10 + k)
  x = rng.normal(size=(num_tokens, D)).astype(np.float32)
  gates, indices = _routing(rng, num_tokens, k, unused_expert)
  weights = _expert_weights(layout, seed=k)
  expected = loop_moe(x, gates, indices, *weights)
  # The reference is not degenerate (outputs here are ~0.05 .. 1); a library
  # returning zeros already fails the relative error with 1.0.
  assert np.max(np.abs(expected)) > 0.01

  sparse = np.asarray(sparse_jit(x, gates, indices, *weights, tile_size=tile_size,
                                 native=native))
  dense = np.asarray(dense_jit(x, gates, indices, *weights))
  assert sparse.shape == dense.shape == (num_tokens, D)
  assert helpers.relative_error(sparse, expected) < LOOP_TOLERANCE
  assert helpers.relative_error(dense, expected) < LOOP_TOLERANCE
  assert helpers.relative_error(sparse, dense) < DENSE_TOLERANCE


def _numpy_route(x, router_w, k):
  logits = np.asarray(x, np.float64) @ np.asarray(router_w, np.float64)   # [N, E]
  probs = oracle.softmax(logits, axis=-1)
  order = np.argsort(-probs, axis=-1, kind="stable")                      # ties: lower index first
  return probs, order


@pytest.mark.parametrize("k", [1, 2, E])
def test_route_matches_numpy_softmax_top_k(k):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(50, D)).astype(np.float32)
  router_w = rng.normal(0, D ** -0.5, size=(D, E)).astype(np.float32)
  gates, indices = moe.route(jnp.asarray(x), jnp.asarray(router_w), k)
  assert gates.dtype == jnp.float32 and indices.dtype == jnp.int32
  assert gates.shape == indices.shape == (50, k)

  probs, order = _numpy_route(x, router_w, k)
  # float32 routing can only differ from float64 at near-ties (gaps ~1e-7):
  # these inputs keep every gap among the top k+1 above 1e-5.
  top = np.take_along_axis(probs, order[:, : k + 1], axis=-1)
  assert np.min(top[:, :-1] - top[:, 1:]) > 1e-5
  np.testing.assert_array_equal(np.asarray(indices), order[:, :k])
  # Gates are the softmax over all E experts, not renormalised over the k.
  np.testing.assert_allclose(np.asarray(gates), probs[np.arange(50)[:, None], order[:, :k]],
                             rtol=0, atol=1e-6)
  sums = np.asarray(gates).sum(-1)
  if k < E:
    assert np.all(sums < 1 - 1e-3)
  else:
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)


def test_route_breaks_exact_ties_to_the_lower_index():
  # One-hot tokens make the router logits exactly the rows of router_w.
  router_w = np.array([[0.1, 2.0, 0.5, 2.0, 1.0],    # experts 1 and 3 tie for first
                       [3.0, 0.5, 1.0, 0.5, 1.0],    # 0 first; 2 and 4 tie for second
                       [1.0, 1.0, 1.0, 1.0, 1.0]],   # all equal
                      np.float32)
  x = np.eye(3, D, dtype=np.float32)                 # token i picks router_w row i
  router = np.zeros((D, E), np.float32)
  router[:3] = router_w
  expected = {1: [[1], [0], [0]], 2: [[1, 3], [0, 2], [0, 1]], 3: [[1, 3, 4], [0, 2, 4], [0, 1, 2]]}
  for k, want in expected.items():
    gates, indices = moe.route(jnp.asarray(x), jnp.asarray(router), k)
    np.testing.assert_array_equal(np.asarray(indices), want, err_msg=f"k={k}")
  gates, _ = moe.route(jnp.asarray(x), jnp.asarray(router), 2)
  assert float(gates[0, 0]) == float(gates[0, 1])    # the tied pair has equal gates


# sparse_moe's custom VJP against JAX's gradient of dense_moe: the same
# float32 function computed in another order (tiles, sorted rows, summed
# per-tile weight gradients). Measured at most 1.9e-7 relative (max|a - b| /
# max|b| per cotangent) over the tile sizes below; 2e-6 leaves 10x room, while
# a missing gate factor, a row sent to the wrong token or a skipped tile is O(1).
GRAD_TOLERANCE = 2e-6
# Tiles of 1 and 3 rows (every expert spans many tiles, with a partial last
# one), 8 (one last-tile size only), 16 (full tiles, then a last tile of 8 or
# 16 rows) and the default (capped at the 37 tokens: one partial tile each).
GRAD_TILE_SIZES = (1, 3, 8, 16, None)
GRAD_TOKENS, GRAD_UNUSED_EXPERT = 37, 3


def _vjp_program(dispatch):
  """A jitted (cotangent, x, gates, expert_indices, *weights) -> (output, input cotangents)."""
  def run(cotangent, *inputs):
    out, vjp = jax.vjp(dispatch, *inputs)
    return out, vjp(cotangent)
  return jax.jit(run)


dense_vjp = _vjp_program(moe.dense_moe)


def _grad_inputs(layout: str):
  """Cotangent [N, D], x [N, D], gates, indices [N, k] (expert 3 unused), weights in `layout`."""
  rng = np.random.default_rng(11)
  x = rng.normal(size=(GRAD_TOKENS, D)).astype(np.float32)
  gates, indices = _routing(rng, GRAD_TOKENS, 2, GRAD_UNUSED_EXPERT)
  cotangent = rng.normal(size=(GRAD_TOKENS, D)).astype(np.float32)
  return cotangent, x, gates, indices, _expert_weights(layout, seed=5)


@pytest.mark.parametrize("tile_size", GRAD_TILE_SIZES)
def test_sparse_moe_gradient_matches_dense_moe_autodiff(tile_size):
  """sparse_moe's custom VJP gives JAX's gradient of dense_moe (the same function,
  computed plainly) for x, the gates and every expert weight.

  Catches a backward pass that drops a tile or a partial last tile, misses a
  gate factor, scatters to the wrong token or unsorts the gates wrongly, and
  one that gives an expert no token chose a non-zero gradient. Also checks
  that the VJP's forward value is sparse_moe's own output, bit for bit (the
  loss training sees is the function inference runs).
  """
  cotangent, x, gates, indices, weights = _grad_inputs("float")
  sparse_vjp = _vjp_program(lambda *inputs: moe.sparse_moe(*inputs, tile_size=tile_size))
  out, got = sparse_vjp(cotangent, x, gates, indices, *weights)
  _, want = dense_vjp(cotangent, x, gates, indices, *weights)

  np.testing.assert_array_equal(out, sparse_jit(x, gates, indices, *weights, tile_size=tile_size))
  assert got[2].dtype == jax.dtypes.float0  # expert indices: no gradient
  for name, index in (("x", 0), ("gates", 1), ("w_in", 3), ("w_v", 4), ("w_out", 5)):
    assert got[index].shape == want[index].shape, name
    assert helpers.relative_error(got[index], want[index]) < GRAD_TOLERANCE, name
  for name, grad in zip(("w_in", "w_v", "w_out"), got[3:]):
    assert np.max(np.abs(grad[GRAD_UNUSED_EXPERT])) == 0.0, name
    assert np.min(np.max(np.abs(grad), axis=(1, 2))[[0, 1, 2, 4]]) > 0.01, name


def test_sparse_moe_gradient_of_int8_weights_reaches_their_scales():
  """With int8 weights (the release's layouts) the VJP gives the scales dense_moe's
  autodiff gradient and the int8 values float0 zeros, and x and the gates
  their gradient as with float weights.

  Catches a backward pass that breaks on QuantizedWeight inputs, ignores the
  row-blocked scales or returns a gradient of the wrong dtype or structure.
  The scale cotangents are bfloat16 (the scales' dtype), each rounded from
  float32 sums that agree to ~1e-7: they may differ by one bfloat16 step,
  2**-8 relative, so 2**-7 of the largest bounds them.
  """
  cotangent, x, gates, indices, weights = _grad_inputs("release")
  sparse_vjp = _vjp_program(lambda *inputs: moe.sparse_moe(*inputs, tile_size=8))
  _, got = sparse_vjp(cotangent, x, gates, indices, *weights)
  _, want = dense_vjp(cotangent, x, gates, indices, *weights)

  for name, index in (("x", 0), ("gates", 1)):
    assert helpers.relative_error(got[index], want[index]) < GRAD_TOLERANCE, name
  for name, grad, expected, weight in zip(("w_in", "w_v", "w_out"), got[3:], want[3:], weights):
    assert grad.weight.dtype == jax.dtypes.float0 and grad.weight.shape == weight.shape, name
    assert grad.scales.dtype == weight.scales.dtype and grad.scales.shape == weight.scales.shape
    scales_grad, expected_scales = (np.asarray(g.scales, np.float32) for g in (grad, expected))
    assert np.max(np.abs(expected_scales)) > 0.01, name
    assert helpers.relative_error(scales_grad, expected_scales) < 2 ** -7, name


def test_sparse_moe_reads_and_differentiates_one_layer_of_a_stack():
  """With `layer`, sparse_moe on weights stacked [L, E, ...] is sparse_moe on that layer's
  [E, ...] (forward bit for bit, traced layer index), and its gradient is that layer's
  gradient in the layer's slot, zero in the others. Catches a stacked read of the wrong
  layer (the model's layer scan) and a backward pass that puts a layer's weight
  gradient in the wrong slot or shape."""
  cotangent, x, gates, indices, weights = _grad_inputs("float")
  rng = np.random.default_rng(5)
  stacks = [np.stack([rng.normal(size=w.shape).astype(np.float32), np.asarray(w),
                      rng.normal(size=w.shape).astype(np.float32)]) for w in weights]  # [3, E, ..]
  layer = jnp.int32(1)

  def stacked_moe(x, gates, indices, *stacks):
    return moe.sparse_moe(x, gates, indices, *stacks, tile_size=8, layer=layer)

  out, stacked_vjp = jax.vjp(stacked_moe, x, gates, indices, *stacks)
  np.testing.assert_array_equal(out, sparse_jit(x, gates, indices, *weights, tile_size=8))
  got = stacked_vjp(cotangent)
  _, want = dense_vjp(cotangent, x, gates, indices, *weights)
  assert helpers.relative_error(got[0], want[0]) < GRAD_TOLERANCE
  for name, grad, expected in zip(("w_in", "w_v", "w_out"), got[3:], want[3:]):
    assert grad.shape == (3, *expected.shape), name
    assert helpers.relative_error(grad[1], expected) < GRAD_TOLERANCE, name
    assert np.max(np.abs(grad[0])) == 0.0 and np.max(np.abs(grad[2])) == 0.0, name


def test_sparse_moe_reads_one_layer_of_an_int8_stack():
  """With `layer` and int8 weights stacked [L, E, ...] (the model's layer scan), both
  paths (native=True: the kernel's grouped matmuls where it is built; native=False:
  the tiles) equal the float64 loop over that layer's experts. Catches the grouped
  path reading experts of another layer (its offset into the flattened stack) or
  another expert's scales."""
  rng = np.random.default_rng(11)
  x = rng.normal(size=(37, D)).astype(np.float32)
  gates, indices = _routing(rng, 37, 2, unused_expert=1)
  layers = [_expert_weights("release", seed=seed) for seed in (7, 8, 9)]
  stacks = [quant.QuantizedWeight(np.stack([layer[i].weight for layer in layers]),
                                  np.stack([layer[i].scales for layer in layers]))
            for i in range(3)]                                              # [3, E, ...]
  expected = loop_moe(x, gates, indices, *layers[1])
  stacked = jax.jit(moe.sparse_moe, static_argnames="native")
  for native in (True, False):
    got = stacked(x, gates, indices, *stacks, layer=jnp.int32(1), native=native)
    assert helpers.relative_error(got, expected) < LOOP_TOLERANCE, native


def test_sparse_moe_runs_every_row_count_of_an_expert():
  """One expert gets each number of rows from 0 to all 53 tokens (the two others share
  the rest), with tiles of 24 rows: an expert's rows then run as full tiles of 24 and
  the rest, rounded up to a multiple of 8, as tiles of 16 and 8 or one more of 24.
  sparse_moe equals dense_moe at every count.

  Catches a tile decomposition that drops, repeats or misplaces rows at some count: a
  rest that is a multiple of 8 or one row past it, a rest that rounds up to a whole
  tile, counts just past a full tile. (The routings share one compiled program.)
  """
  num_tokens, tile = 53, 24
  rng = np.random.default_rng(53)
  x = rng.normal(size=(num_tokens, D)).astype(np.float32)
  weights = _expert_weights("float", seed=3)
  gates = rng.uniform(0.2, 1.0, size=(num_tokens, 1)).astype(np.float32)
  order = rng.permutation(num_tokens)  # expert 0's tokens are spread over the batch
  for count in range(num_tokens + 1):
    indices = np.where(np.arange(num_tokens) < count, 0, 1 + np.arange(num_tokens) % 2)
    indices = indices[order][:, None].astype(np.int32)                     # [N, 1]
    sparse = sparse_jit(x, gates, indices, *weights, tile_size=tile)
    dense = dense_jit(x, gates, indices, *weights)
    assert helpers.relative_error(sparse, dense) < DENSE_TOLERANCE, count


def test_many_experts_most_unchosen_forward_and_gradient():
  """16 experts, top 2, on 4 tokens (at most 8 experts chosen, most of them by one
  token): sparse_moe equals the float64 loop, and its gradient equals dense_moe's
  autodiff, with exactly zero weight gradient for every expert no token chose; on 1
  token (decode, int8 weights read in place) it equals the loop too.

  Catches a loop over the chosen experts that skips or repeats one, reads another
  expert's weights (the compacted expert list against the expert index), or writes an
  expert's weight gradient into another's slot.
  """
  num_experts, k = 16, 2
  rng = np.random.default_rng(16)
  shapes = ((num_experts, D, F), (num_experts, D, F), (num_experts, F, D))
  weights = [helpers.random_weight(rng, shape, None, gain=1.5) for shape in shapes]

  def routing(num_tokens):
    indices = np.argsort(-rng.random((num_tokens, num_experts)), axis=-1)[:, :k]
    gates = rng.uniform(0.05, 0.6, size=(num_tokens, k)).astype(np.float32)
    return gates, indices.astype(np.int32)                                 # [N, k] each

  x = rng.normal(size=(4, D)).astype(np.float32)
  gates, indices = routing(4)
  cotangent = rng.normal(size=(4, D)).astype(np.float32)
  out, got = _vjp_program(moe.sparse_moe)(cotangent, x, gates, indices, *weights)
  _, want = dense_vjp(cotangent, x, gates, indices, *weights)
  assert helpers.relative_error(out, loop_moe(x, gates, indices, *weights)) < LOOP_TOLERANCE
  for name, index in (("x", 0), ("gates", 1), ("w_in", 3), ("w_v", 4), ("w_out", 5)):
    assert helpers.relative_error(got[index], want[index]) < GRAD_TOLERANCE, name
  chosen = np.zeros(num_experts, bool)
  chosen[indices.ravel()] = True
  assert 0 < chosen.sum() < num_experts
  for name, grad in zip(("w_in", "w_v", "w_out"), got[3:]):
    grad = np.asarray(grad)
    assert np.all(grad[~chosen] == 0.0), name
    assert np.min(np.max(np.abs(grad[chosen]), axis=(1, 2))) > 0.0, name

  int8_weights = [helpers.random_weight(rng, shape, 1, gain=1.5) for shape in shapes]
  x = rng.normal(size=(1, D)).astype(np.float32)
  gates, indices = routing(1)
  decoded = sparse_jit(x, gates, indices, *int8_weights)
  expected = loop_moe(x, gates, indices, *int8_weights)
  assert helpers.relative_error(decoded, expected) < LOOP_TOLERANCE

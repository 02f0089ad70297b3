"""quant.matmul's two formulations against a float64 product with the oracle's dequantization.

`chunked_matmul` (the CPU decode path) converts the weight chunk by chunk and
applies the scales to partial products; these tests hold it to the plain
dequantize-then-matmul in both scale layouts (per output channel and row
blocks), with odd sizes so that a chunk straddling a scale block or a swapped
axis fails, with a stacked weight and a traced expert index, and with float
weights of another dtype (the bfloat16 residency).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok_moe import quant
from tests import helpers, oracle

# float32 products of K <= 45 terms against float64: ~1e-7 relative measured;
# a wrong scale block or chunk is O(1).
TOLERANCE = 1e-5


def _quantized(rng, shape, blocks):
  return helpers.random_weight(rng, shape, blocks)


def _expected(x, w, expert=None):
  dense = oracle.dense_weight(w)
  if expert is not None:
    dense = dense[expert]
  return np.asarray(x, np.float64) @ dense


@pytest.mark.parametrize("rows,cols,blocks,chunk_rows", [
    (40, 27, 1, 4),     # per output channel; chunks of 4 rows
    (40, 27, 8, 2),     # 8 blocks of 5 rows; chunks of 1 row (5 is prime)
    (45, 13, 3, 8),     # 3 blocks of 15 rows; chunks of 5 rows
    (48, 7, 8, 64),     # chunks bigger than a block: one block (6 rows) a chunk
])
def test_chunked_matmul_matches_dequantized_product(rows, cols, blocks, chunk_rows):
  chunk_bytes = chunk_rows * cols * 4
  rng = np.random.default_rng(rows * cols + blocks)
  w = _quantized(rng, (rows, cols), blocks)
  for lead in [(1,), (3,), (2, 1)]:
    x = rng.normal(size=(*lead, rows)).astype(np.float32)
    got = np.asarray(quant.chunked_matmul(jnp.asarray(x), w, chunk_bytes=chunk_bytes))
    assert got.shape == (*lead, cols) and got.dtype == np.float32
    assert helpers.relative_error(got, _expected(x, w)) < TOLERANCE


@pytest.mark.parametrize("blocks", [1, 8])
def test_chunked_matmul_reads_one_expert_of_a_stack(blocks):
  """The in-place read of w[e] of a stack [E, K, N], as an int and as a traced index.
  Catches a wrong chunk offset into the stack or scales taken from another expert."""
  chunk_bytes = 3 * 11 * 4
  rng = np.random.default_rng(blocks)
  w = _quantized(rng, (5, 24, 11), blocks)                     # [E, K, N]
  x = rng.normal(size=(2, 24)).astype(np.float32)
  at = jax.jit(lambda x, w, e: quant.matmul(x, w, index=e, chunk_bytes=chunk_bytes))
  for expert in (0, 3, 4):
    want = _expected(x, w, expert)
    assert helpers.relative_error(quant.chunked_matmul(x, w, index=expert,
                                                       chunk_bytes=chunk_bytes), want) < TOLERANCE
    assert helpers.relative_error(at(x, w, jnp.int32(expert)), want) < TOLERANCE


@pytest.mark.parametrize("blocks", [1, 8])
def test_chunked_matmul_reads_one_layer_and_expert_of_a_stack(blocks):
  """w[layer, e] of a layer-stacked expert stack [L, E, K, N], read in place by traced
  indices (the decode path inside the model's layer scan): catches a flattened stack
  index that mixes up layers and experts."""
  chunk_bytes = 3 * 11 * 4
  rng = np.random.default_rng(10 + blocks)
  w = _quantized(rng, (3, 5, 24, 11), blocks)                  # [L, E, K, N]
  x = rng.normal(size=(2, 24)).astype(np.float32)
  at = jax.jit(lambda x, w, layer, e: quant.matmul(x, w, index=(layer, e),
                                                   chunk_bytes=chunk_bytes))
  for layer, expert in ((0, 4), (2, 1), (1, 3)):
    one_layer = quant.QuantizedWeight(w.weight[layer], w.scales[layer])
    want = _expected(x, one_layer, expert)
    assert helpers.relative_error(at(x, w, jnp.int32(layer), jnp.int32(expert)), want) < TOLERANCE


def test_matmul_takes_either_path_with_the_same_result():
  rng = np.random.default_rng(7)
  w = _quantized(rng, (5, 32, 19), 8)
  for num_rows in (1, quant.CHUNKED_MAX_ROWS, quant.CHUNKED_MAX_ROWS + 9):  # chunked, chunked, whole
    x = rng.normal(size=(num_rows, 32)).astype(np.float32)
    got = quant.matmul(jnp.asarray(x), w, expert=jnp.int32(2))
    assert helpers.relative_error(got, _expected(x, w, 2)) < TOLERANCE


def test_float_weights_of_another_dtype_are_converted_in_chunks():
  chunk_bytes = 4 * 9 * 4
  rng = np.random.default_rng(3)
  w = rng.normal(size=(20, 9)).astype(ml_dtypes.bfloat16)
  x = rng.normal(size=(1, 20)).astype(np.float32)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert helpers.relative_error(quant.chunked_matmul(x, jnp.asarray(w), chunk_bytes=chunk_bytes),
                                want) < TOLERANCE
  assert helpers.relative_error(quant.matmul(jnp.asarray(x), jnp.asarray(w),
                                             chunk_bytes=chunk_bytes), want) < TOLERANCE


@pytest.mark.parametrize("residency", ["bfloat16", "float32"])
def test_with_residency_dequantizes_once(residency):
  rng = np.random.default_rng(1)
  params = {"layer/linear": {"w": _quantized(rng, (16, 6), 8)},
            "layer/router": {"w": rng.normal(size=(16, 3)).astype(np.float32)}}
  held = quant.with_residency(params, residency)
  w = held["layer/linear"]["w"]
  assert w.dtype == jnp.dtype(residency) and w.shape == (16, 6)
  np.testing.assert_allclose(np.asarray(w, np.float32),
                             np.asarray(quant.dequantize(params["layer/linear"]["w"]).astype(residency),
                                        np.float32))
  assert held["layer/router"]["w"] is params["layer/router"]["w"]
  assert quant.with_residency(params, "int8") is params
  with pytest.raises(ValueError, match="residency"):
    quant.with_residency(params, "int4")

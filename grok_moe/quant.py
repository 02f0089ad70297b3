"""8-bit weights: the release's int8 + bfloat16-scale format and the one place it is undone.

A weight is either a plain float array or a `QuantizedWeight`: an int8 `weight`
[..., K, N] and bfloat16 `scales` [..., R, N]. The real weight is
`weight * scales` where row block r (rows r*K/R .. (r+1)*K/R) uses scales row r.
R = 1 is the per-output-channel layout, R = 8 the release's row-block layout.
Int8 weights stay int8 in device memory; `dequantize` and `matmul` undo the
scaling inside the computation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# Scale row blocks per weight in the release: every weight not listed here is
# quantized per output channel (one block).
RELEASE_ROW_BLOCKS = {"multi_head_attention/linear": 8, "moe/linear_1": 8}
# Weights the release keeps in float32 (never quantized).
FLOAT_WEIGHTS = ("in_out_embed", "rms_norm", "router")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """int8 `weight` [..., K, N] with bfloat16 `scales` [..., R, N], R dividing K."""

  weight: jax.Array
  scales: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.weight.shape)

  @property
  def row_blocks(self) -> int:
    return self.scales.shape[-2]

  @property
  def nbytes(self) -> int:
    return self.weight.nbytes + self.scales.nbytes


Weight = jax.Array | QuantizedWeight


def row_blocks_for(name: str) -> int | None:
  """Scale row blocks the release uses for the parameter `name`; None if it stays float."""
  if any(part in name for part in FLOAT_WEIGHTS):
    return None
  for suffix, blocks in RELEASE_ROW_BLOCKS.items():
    if name.endswith(suffix) or name.endswith(suffix + "/w"):
      return blocks
  return 1


def dequantize(w: Weight, dtype=jnp.float32) -> jax.Array:
  """The real weight in `dtype`: `weight * scales`, row block by row block."""
  if not isinstance(w, QuantizedWeight):
    return jnp.asarray(w).astype(dtype)
  *batch, rows, cols = w.weight.shape
  blocks = w.row_blocks
  weight = w.weight.astype(dtype).reshape(*batch, blocks, rows // blocks, cols)  # [..., R, K/R, N]
  scales = w.scales.astype(dtype)[..., :, None, :]                              # [..., R, 1, N]
  return (weight * scales).reshape(*batch, rows, cols)                          # [..., K, N]


# The chunked matmul (see `matmul`): used on CPU for at most this many rows of
# x, with chunks of the weight of about CHUNK_BYTES once converted.
CHUNKED_MAX_ROWS = 32
CHUNK_BYTES = 256 * 1024


def matmul(x: jax.Array, w: Weight, *, expert=None) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in x's dtype, dequantizing w inside the computation.

  With `expert`, w is a stack [E, K, N] and x is multiplied by w[expert]
  (an int or a traced index), without copying that expert out first.

  Two formulations, the same product within float32 rounding:
  - dequantize w whole into x's dtype, then one matmul: right for many rows
    of x (prefill, training), where the conversion is a small part of the work;
  - on CPU, for few rows (decode) of a weight that needs converting (int8, or
    a float dtype other than x's) or is one expert of a stack,
    `chunked_matmul`: XLA on CPU would write a whole converted (or sliced)
    copy of w on every call, which costs several times the read of the int8
    weight itself.
  """
  rows = math.prod(x.shape[:-1])
  in_place = (isinstance(w, QuantizedWeight) or w.dtype != x.dtype or expert is not None)
  if in_place and rows <= CHUNKED_MAX_ROWS and jax.default_backend() == "cpu":
    return chunked_matmul(x, w, expert=expert)
  if expert is not None:
    w = take(w, expert)
  return jnp.matmul(x, dequantize(w, x.dtype), preferred_element_type=x.dtype)


def _chunk_rows(block_rows: int, cols: int, itemsize: int) -> int:
  """The largest divisor of block_rows whose chunk [rows, cols] converted fits CHUNK_BYTES."""
  limit = max(1, CHUNK_BYTES // (cols * itemsize))
  return max(d for d in range(1, min(block_rows, limit) + 1) if block_rows % d == 0)


def chunked_matmul(x: jax.Array, w: Weight, *, expert=None) -> jax.Array:
  """x [..., K] @ w [K, N] (or w[expert] of a stack [E, K, N]) -> [..., N], by row chunks.

  A `lax.scan` over chunks of c rows of w (c divides the scale row block K/R):
  each step converts one chunk to x's dtype while it is in cache, multiplies
  the matching c columns of x by it and adds the product [M, N] to a float32
  sum. The scales are applied to the partial products: per scale row block
  (R > 1), or once after the loop for per-output-channel scales (R = 1).
  Reads w once, as it is stored, and never writes a converted copy.
  """
  *lead, depth = x.shape
  x2 = x.reshape(-1, depth)                                                   # [M, K]
  if expert is not None and not isinstance(w, QuantizedWeight) and w.dtype != x.dtype:
    # XLA on CPU turns a bfloat16 loop operand into a float32 copy before the
    # loop: take the expert out first, so that only its weights are converted.
    w, expert = take(w, expert), None
  stacked = expert is not None
  if isinstance(w, QuantizedWeight):
    weight, scales = jnp.asarray(w.weight), jnp.asarray(w.scales, jnp.float32)  # [(E,) R, N]
  else:
    weight, scales = jnp.asarray(w), None
  if not stacked:
    weight = weight[None]                                                     # [1, K, N]
    scales = None if scales is None else scales[None]                         # [1, R, N]
    expert = 0
  _, rows, cols = weight.shape
  blocks = 1 if scales is None else scales.shape[-2]
  chunk = _chunk_rows(rows // blocks, cols, jnp.dtype(x.dtype).itemsize)
  num_chunks, chunks_per_block = rows // chunk, rows // blocks // chunk
  chunks = weight.reshape(weight.shape[0], num_chunks, chunk, cols)           # [E, C, c, N]
  x_chunks = x2.reshape(-1, num_chunks, chunk).transpose(1, 0, 2)             # [C, M, c]

  def add_chunk(total, inputs):
    index, x_chunk = inputs
    w_chunk = chunks[expert, index].astype(x.dtype)                           # [c, N]
    part = jnp.matmul(x_chunk, w_chunk, preferred_element_type=jnp.float32)   # [M, N]
    if blocks > 1:
      part = part * scales[expert, index // chunks_per_block]                 # [M, N] * [N]
    return total + part, None

  total = jnp.zeros((x2.shape[0], cols), jnp.float32)                         # [M, N]
  total, _ = jax.lax.scan(add_chunk, total, (jnp.arange(num_chunks), x_chunks))
  if scales is not None and blocks == 1:
    total = total * scales[expert, 0]
  return total.astype(x.dtype).reshape(*lead, cols)                            # [..., N]


def take(w: Weight, index) -> Weight:
  """w[index] along the leading axis, for arrays and QuantizedWeight alike."""
  return jax.tree.map(lambda leaf: jnp.asarray(leaf)[index], w)


def quantize(w, row_blocks: int = 1) -> QuantizedWeight:
  """Symmetric int8 quantization of a float weight [..., K, N] with bfloat16 scales.

  Each (row block, column) gets scale = max|w| / 127 rounded to bfloat16, and
  weight = round(w / scale) clipped to [-127, 127]. The error per element is at
  most half a scale step plus the bfloat16 rounding of the scale (|w| * 2**-8).
  """
  w = np.asarray(w, dtype=np.float32)
  *batch, rows, cols = w.shape
  if rows % row_blocks:
    raise ValueError(f"{row_blocks} row blocks do not divide {rows} rows")
  blocked = w.reshape(*batch, row_blocks, rows // row_blocks, cols)          # [..., R, K/R, N]
  absmax = np.abs(blocked).max(axis=-2)                                       # [..., R, N]
  scales = (absmax / 127).astype(ml_dtypes.bfloat16)
  safe = np.where(scales.astype(np.float32) == 0, 1, scales.astype(np.float32))
  weight = np.clip(np.rint(blocked / safe[..., :, None, :]), -127, 127)
  return QuantizedWeight(weight=weight.astype(np.int8).reshape(w.shape), scales=scales)


# How weights can be held on the device: the release's int8 + scales, or
# dequantized once to a dense float array (2x or 4x the bytes).
RESIDENCIES = ("int8", "bfloat16", "float32")


def with_residency(params, residency: str):
  """params with every QuantizedWeight held as `residency`: "int8" keeps them,
  "bfloat16" or "float32" dequantizes them once into dense arrays of that dtype.

  Float-only parameters (embeddings, norms, router) are left as they are.
  """
  if residency not in RESIDENCIES:
    raise ValueError(f"unknown residency {residency!r}; known: {RESIDENCIES}")
  if residency == "int8":
    return params
  dtype = jnp.dtype(residency)
  return jax.tree.map(
      lambda leaf: dequantize(leaf, dtype) if isinstance(leaf, QuantizedWeight) else leaf,
      params, is_leaf=lambda leaf: isinstance(leaf, QuantizedWeight))

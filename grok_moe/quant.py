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


def matmul(x: jax.Array, w: Weight) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in x's dtype, dequantizing w inside the computation."""
  return jnp.matmul(x, dequantize(w, x.dtype), preferred_element_type=x.dtype)


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

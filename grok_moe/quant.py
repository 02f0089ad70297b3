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

from grok_moe import native as native_kernel

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
# x, with chunks of the weight of about `chunk_bytes` once converted, by default
# CHUNK_BYTES. 1 MiB halved decode time against 256 KiB (benchmarks.run --only
# decode,many-experts: 4.8-5.6 ms against 9.1-9.6 ms a token for BENCH, 1.15-1.26 ms
# against 1.56-2.34 ms for the many-experts layer's token; 2 and 4 MiB were slower).
CHUNKED_MAX_ROWS = 32
CHUNK_BYTES = 1024 * 1024


def _as_index(index) -> tuple:
  """A leading index as a tuple: None -> (), an int or traced scalar -> (index,)."""
  if index is None:
    return ()
  return tuple(index) if isinstance(index, (tuple, list)) else (index,)


def matmul(x: jax.Array, w: Weight, *, index=None, expert=None,
           chunk_bytes: int = CHUNK_BYTES, native: bool = True) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in x's dtype, dequantizing w inside the computation.

  With `index` (a tuple of ints or traced indices i1, i2, ...), w is a stack
  [I1, I2, ..., K, N] and x is multiplied by w[i1, i2, ...], read in place
  without copying that slice out first (`expert=e` is `index=(e,)`).

  Three formulations, the same product within float32 rounding:
  - on CPU, for an int8 weight and float32 x, when the native kernel is
    available (`fuses_int8`): `native.grouped_int8_matmul`, which converts
    the int8 values inside its matmul and reads w[index] in place, for any
    number of rows;
  - otherwise, dequantize w whole into x's dtype, then one matmul: right for
    many rows of x (prefill, training), where the conversion is a small part
    of the work (the slice of a stack fuses into that conversion);
  - otherwise on CPU, for few rows (decode) of a weight that needs converting
    (int8, or a float dtype other than x's) or is a slice of a stack,
    `chunked_matmul` (chunks of about `chunk_bytes`): XLA on CPU would write
    a whole converted (or sliced) copy of w on every call, which costs
    several times the read of the int8 weight itself.
  `native=False` keeps XLA's formulations. The native one is differentiable:
  its derivatives are those of the dequantized product.
  """
  index = _as_index(index) + _as_index(expert)
  if native and fuses_int8(x.dtype, w) and w.weight.ndim == len(index) + 2:
    return _native_matmul(x, w, index)
  rows = math.prod(x.shape[:-1])
  in_place = isinstance(w, QuantizedWeight) or w.dtype != x.dtype or bool(index)
  if in_place and rows <= CHUNKED_MAX_ROWS and jax.default_backend() == "cpu":
    return chunked_matmul(x, w, index=index, chunk_bytes=chunk_bytes)
  if index:
    w = take(w, index)
  return jnp.matmul(x, dequantize(w, x.dtype), preferred_element_type=x.dtype)


def fuses_int8(dtype, w: Weight) -> bool:
  """Whether the native kernel can multiply x in `dtype` by w: an int8 weight with
  bfloat16 or float32 scales, float32 x, on CPU, with the kernel built
  (`native.available()`). It converts w's int8 values inside its matmul, so that
  dequantizing w first would only add work."""
  return (isinstance(w, QuantizedWeight) and w.weight.dtype == jnp.int8
          and w.scales.dtype in (jnp.bfloat16, jnp.float32)
          and jnp.dtype(dtype) == jnp.float32
          and jax.default_backend() == "cpu" and native_kernel.available())


def grouped_matmul(x: jax.Array, w: QuantizedWeight, group_sizes: jax.Array, index=None, *,
                   rows=None, targets=None, row_scales=None,
                   out_rows: int | None = None) -> jax.Array:
  """Sorted rows in groups by the stack w [(I...,) G, K, N], in float32: the native
  kernel's call (`native.grouped_int8_matmul`; needs `fuses_int8(x.dtype, w)`).

  Sorted row a is x[rows[a]] (x's row a when rows is None); group g is the
  next group_sizes[g] of them, multiplied by w[index + (g,)]. `index` (ints or
  traced ints) picks the leading entries before the groups' axis (the layer of
  a layer stack). Returns [A, N] (0 past the last group), or with `targets`
  the products times row_scales added onto rows targets of [out_rows, N]
  zeros. Not differentiable.
  """
  index = _as_index(index)
  if w.weight.ndim != len(index) + 3:
    raise ValueError(f"grouped_matmul: a stack {w.weight.shape} needs {w.weight.ndim - 3} "
                     f"index entries before its groups' axis, not {len(index)}")
  groups = w.weight.shape[len(index)]
  stack_shape = w.weight.shape[:len(index)]
  first = jnp.ravel_multi_index(index, stack_shape, mode="clip") * groups if index else 0
  # The stacks as they are ([I..., G, K, N], [I..., G, R, N]): XLA on CPU may copy
  # a reshaped stack, so the kernel flattens the leading axes itself.
  return native_kernel.grouped_int8_matmul(x, w.weight, w.scales, group_sizes, first, rows=rows,
                                           targets=targets, row_scales=row_scales,
                                           out_rows=out_rows)


def _native_matmul(x: jax.Array, w: QuantizedWeight, index: tuple) -> jax.Array:
  """x [..., K] @ w[index] [K, N] -> [..., N] float32: the native kernel's one group."""
  *lead, depth = x.shape
  stack_shape = w.weight.shape[:len(index)]
  flat = jnp.ravel_multi_index(index, stack_shape, mode="clip") if index else 0
  out = _native_product(x.reshape(-1, depth), w.weight, w.scales,
                        jnp.asarray(flat, jnp.int32))                        # [M, N]
  return out.reshape(*lead, w.weight.shape[-1])                              # [..., N]


@jax.custom_jvp
def _native_product(x, weight, scales, flat):
  """x [M, K] @ (weight [I..., K, N] * scales [I..., R, N] at their flat entry `flat`)
  by the native kernel."""
  return native_kernel.grouped_int8_matmul(x, weight, scales, jnp.full((1,), x.shape[0]), flat)


@_native_product.defjvp
def _native_product_jvp(primals, tangents):
  """The native product's value, with the tangent of the dequantized product (written in
  jnp, so that reverse mode can transpose it)."""
  x, weight, scales, flat = primals
  x_dot, _, scales_dot, _ = tangents

  def dequantized_product(x, scales):
    w = take(QuantizedWeight(weight.reshape(-1, *weight.shape[-2:]),
                             scales.reshape(-1, *scales.shape[-2:])), flat)  # [K, N], [R, N]
    return jnp.matmul(x, dequantize(w, jnp.float32))                        # [M, N]

  _, out_dot = jax.jvp(dequantized_product, (x, scales), (x_dot, scales_dot))
  return _native_product(x, weight, scales, flat), out_dot


def _chunk_rows(block_rows: int, cols: int, itemsize: int, chunk_bytes: int) -> int:
  """The largest divisor of block_rows whose chunk [rows, cols] converted fits chunk_bytes."""
  limit = max(1, chunk_bytes // (cols * itemsize))
  return max(d for d in range(1, min(block_rows, limit) + 1) if block_rows % d == 0)


def chunked_matmul(x: jax.Array, w: Weight, *, index=None,
                   chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
  """x [..., K] @ w [K, N] (or w[index] of a stack [I..., K, N]) -> [..., N], by row chunks.

  A `lax.scan` over chunks of c rows of w (c divides the scale row block K/R,
  and a chunk converted to x's dtype is at most `chunk_bytes` where it can be):
  each step converts one chunk to x's dtype while it is in cache, multiplies
  the matching c columns of x by it and adds the product [M, N] to a float32
  sum. The scales are applied to the partial products: per scale row block
  (R > 1), or once after the loop for per-output-channel scales (R = 1).
  Reads w once, as it is stored, and never writes a converted copy.
  """
  index = _as_index(index)
  *lead, depth = x.shape
  x2 = x.reshape(-1, depth)                                                   # [M, K]
  if index and not isinstance(w, QuantizedWeight) and w.dtype != x.dtype:
    # XLA on CPU turns a bfloat16 loop operand into a float32 copy before the
    # loop: take the slice out first, so that only its weights are converted.
    w, index = take(w, index), ()
  if isinstance(w, QuantizedWeight):
    weight, scales = jnp.asarray(w.weight), jnp.asarray(w.scales, jnp.float32)  # [I..., R, N]
  else:
    weight, scales = jnp.asarray(w), None
  stack_shape = weight.shape[:len(index)]
  # One flat leading axis for the stack: [I, K, N] and [I, R, N], read at `flat`.
  flat = jnp.ravel_multi_index(index, stack_shape, mode="clip") if index else 0
  weight = weight.reshape(-1, *weight.shape[len(index):])                     # [I, K, N]
  scales = None if scales is None else scales.reshape(-1, *scales.shape[len(index):])  # [I, R, N]
  _, rows, cols = weight.shape
  blocks = 1 if scales is None else scales.shape[-2]
  chunk = _chunk_rows(rows // blocks, cols, jnp.dtype(x.dtype).itemsize, chunk_bytes)
  num_chunks, chunks_per_block = rows // chunk, rows // blocks // chunk
  chunks = weight.reshape(weight.shape[0], num_chunks, chunk, cols)           # [I, C, c, N]
  x_chunks = x2.reshape(-1, num_chunks, chunk).transpose(1, 0, 2)             # [C, M, c]

  def add_chunk(total, inputs):
    chunk_index, x_chunk = inputs
    w_chunk = chunks[flat, chunk_index].astype(x.dtype)                       # [c, N]
    part = jnp.matmul(x_chunk, w_chunk, preferred_element_type=jnp.float32)   # [M, N]
    if blocks > 1:
      part = part * scales[flat, chunk_index // chunks_per_block]             # [M, N] * [N]
    return total + part, None

  total = jnp.zeros((x2.shape[0], cols), jnp.float32)                         # [M, N]
  total, _ = jax.lax.scan(add_chunk, total, (jnp.arange(num_chunks), x_chunks))
  if scales is not None and blocks == 1:
    total = total * scales[flat, 0]
  return total.astype(x.dtype).reshape(*lead, cols)                            # [..., N]


def take(w: Weight, index) -> Weight:
  """w[i1, i2, ...] along the leading axes (an int, a traced index or a tuple of them),
  for arrays and QuantizedWeight alike, as a dynamic slice."""
  index = _as_index(index)

  def slice_leaf(leaf):
    leaf = jnp.asarray(leaf)
    start = tuple(jnp.asarray(i, jnp.int32) for i in index) + (0,) * (leaf.ndim - len(index))
    sizes = (1,) * len(index) + leaf.shape[len(index):]
    return jax.lax.dynamic_slice(leaf, start, sizes).reshape(leaf.shape[len(index):])

  return jax.tree.map(slice_leaf, w)


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

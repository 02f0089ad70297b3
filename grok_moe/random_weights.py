"""Random weights in the release's storage: for benchmarks, demos and tests of storage.

`release_params(config, seed)` draws every tensor of the parameter table, in
the stacked form the model holds ({module: {param: leaf}}, per-layer tensors
[L, ...]), stored as the release stores them, on the default device (so that
layers of Grok-1's width need no host copy):

- quantized matrices (the table's `row_blocks` is set): `quantized`, int8
  uniform in [-127, 127] with bfloat16 scales [..., R, N] uniform in
  [0.5, 1.5] / (127 sqrt(fan_in)), so a unit-RMS input gives outputs of RMS
  about 0.58 (int8 uniform has RMS 127 / sqrt(3)); R is the table's row
  blocks where they divide the rows, else 1 (`ParamSpec.blocks_for_rows`);
- embeddings: float32 normal with standard deviation 0.5;
- the router and other float matrices: float32 normal with standard
  deviation 1 / sqrt(fan_in), so routing spreads over the experts;
- vectors (norm scales, biases): float32 uniform within 0.25 of the table's
  `init_value` (1 for scales, 0 for biases).

`checkpoint.save_checkpoint(release_params(config), path, config)` writes a
release-format checkpoint of any config. Tensor k of the table draws from
`fold_in(PRNGKey(seed), k)`, so the same seed gives the same weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grok_moe import params as param_table
from grok_moe.config import ModelConfig
from grok_moe.quant import QuantizedWeight


def quantized(key: jax.Array, shape, row_blocks: int = 1) -> QuantizedWeight:
  """A random int8 weight [..., K, N] with bfloat16 scales [..., row_blocks, N] (see the
  module docstring)."""
  *batch, fan_in, fan_out = shape
  weight_key, scale_key = jax.random.split(key)
  weight = jax.random.randint(weight_key, shape, -127, 128, jnp.int8)
  scales = jax.random.uniform(scale_key, (*batch, row_blocks, fan_out), jnp.float32,
                              0.5, 1.5) / (127 * math.sqrt(fan_in))
  return QuantizedWeight(weight, scales.astype(jnp.bfloat16))


def _float(key: jax.Array, spec: param_table.ParamSpec, shape) -> jax.Array:
  """A float32 tensor of the table's kind `spec` (see the module docstring)."""
  if spec.fan_in_axis is None:  # norm scales and biases
    return jax.random.uniform(key, shape, jnp.float32, spec.init_value - 0.25,
                              spec.init_value + 0.25)
  std = 0.5 if spec is param_table.EMBEDDINGS else 1 / math.sqrt(shape[spec.fan_in_axis])
  return std * jax.random.normal(key, shape, jnp.float32)


def release_params(config: ModelConfig, seed: int = 0) -> dict[str, dict[str, object]]:
  """Random stacked params, int8 + bfloat16 scales where the release quantizes, float32
  elsewhere, on the default device."""
  key = jax.random.PRNGKey(seed)
  flat = {}
  for index, spec in enumerate(param_table.params_for(config)):
    shape = spec.stored_shape(config)
    leaf_key = jax.random.fold_in(key, index)
    flat[spec.path] = (quantized(leaf_key, shape, spec.blocks_for_rows(shape[-2]))
                       if spec.quantized else _float(leaf_key, spec, shape))
  return jax.block_until_ready(param_table.unflatten(flat))

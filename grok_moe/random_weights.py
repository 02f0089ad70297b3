"""Random weights in the release's storage, on the host: for benchmarks and demos.

`release_params(config, seed)` draws every tensor of the parameter table, in
the stacked form the model holds ({module: {param: leaf}}, per-layer tensors
[L, ...]), as numpy arrays stored as the release stores them:

- quantized matrices (the table's `row_blocks` is set): int8 uniform in
  [-127, 127] with bfloat16 scales [..., row_blocks, N] uniform in
  [0.5, 1.5] / (127 sqrt(fan_in)), so a unit-RMS input gives outputs of RMS
  about 0.58 (int8 uniform has RMS 127 / sqrt(3));
- embeddings: float32 normal with standard deviation 0.5;
- the router: float32 normal with standard deviation 1 / sqrt(D), so routing
  spreads over the experts;
- norm scales: float32 uniform in [0.75, 1.25].

`checkpoint.save_checkpoint(release_params(config), path, config)` writes a
release-format checkpoint of any config. Values are drawn tensor kind by
tensor kind in the table's order from one seeded generator, so the same
seed gives the same weights.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from grok_moe import params as param_table
from grok_moe.config import ModelConfig
from grok_moe.quant import QuantizedWeight


def _quantized(rng: np.random.Generator, shape, row_blocks: int) -> QuantizedWeight:
  """int8 [..., K, N] with bfloat16 scales [..., row_blocks, N] (see the module docstring)."""
  *batch, fan_in, fan_out = shape
  weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
  scales = rng.uniform(0.5, 1.5, size=(*batch, row_blocks, fan_out)) / (127 * math.sqrt(fan_in))
  return QuantizedWeight(weight=weight, scales=scales.astype(ml_dtypes.bfloat16))


def _float(rng: np.random.Generator, spec: param_table.ParamSpec, shape) -> np.ndarray:
  if spec.fan_in_axis is None:  # norm scales
    return rng.uniform(0.75, 1.25, size=shape).astype(np.float32)
  if spec is param_table.EMBEDDINGS:
    return rng.normal(0.0, 0.5, size=shape).astype(np.float32)
  fan_in = shape[spec.fan_in_axis]
  return rng.normal(0.0, 1 / math.sqrt(fan_in), size=shape).astype(np.float32)


def release_params(config: ModelConfig, seed: int = 0) -> dict[str, dict[str, object]]:
  """Random stacked params as numpy, int8 + bfloat16 scales where the release quantizes."""
  rng = np.random.default_rng(seed)
  flat = {}
  for spec in param_table.params_for(config):
    shape = spec.stored_shape(config)
    flat[spec.path] = (_quantized(rng, shape, spec.row_blocks) if spec.quantized
                       else _float(rng, spec, shape))
  return param_table.unflatten(flat)

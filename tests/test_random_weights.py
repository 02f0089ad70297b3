"""grok_moe.random_weights: release-format weights that the release's loader takes back."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from grok_moe import checkpoint, random_weights
from grok_moe import params as param_table
from grok_moe.config import TINY
from grok_moe.quant import QuantizedWeight


def test_release_params_have_the_release_storage_and_are_seeded():
  """Catches a tensor missing or of the wrong shape, a scale layout other than the table's
  row blocks, float weights where the release stores int8 (or the reverse), and draws
  that do not depend on the seed alone."""
  params = random_weights.release_params(TINY, seed=3)
  param_table.check_stacked(params, TINY)
  flat = param_table.flatten(params)
  for spec in param_table.params_for(TINY):
    leaf = flat[spec.path]
    if spec.quantized:
      assert isinstance(leaf, QuantizedWeight), spec.path
      assert leaf.weight.dtype == np.int8
      *lead, _, cols = spec.stored_shape(TINY)
      assert leaf.scales.shape == (*lead, spec.row_blocks, cols), spec.path
      assert leaf.scales.dtype == ml_dtypes.bfloat16
    else:
      assert leaf.dtype == np.float32, spec.path
  again = param_table.flatten(random_weights.release_params(TINY, seed=3))
  other = param_table.flatten(random_weights.release_params(TINY, seed=4))
  expert = param_table.EXPERT_OUT.path
  np.testing.assert_array_equal(again[expert].weight, flat[expert].weight)
  assert not np.array_equal(other[expert].weight, flat[expert].weight)


def test_release_params_save_and_load_unchanged(tmp_path):
  """Catches weights the release format cannot hold as drawn (save_checkpoint would
  requantize or refuse them), so that a benchmark would time other bytes than it wrote."""
  params = random_weights.release_params(TINY, seed=0)
  checkpoint.save_checkpoint(params, tmp_path, TINY, progress=False)
  loaded = param_table.flatten(checkpoint.load_checkpoint(tmp_path, progress=False))
  for path, leaf in param_table.flatten(params).items():
    for mine, theirs in zip(_parts(leaf), _parts(loaded[path])):
      np.testing.assert_array_equal(np.asarray(theirs), mine, err_msg=path)


def _parts(leaf):
  return (leaf.weight, leaf.scales) if isinstance(leaf, QuantizedWeight) else (leaf,)

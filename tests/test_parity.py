"""grok_moe.model.forward against the independent float64 NumPy oracle (tests/oracle.py).

The model is TINY with 11 layers, so that the release's file order (0, 1, 10,
2, 3, ...) differs from layer order, and the int8 parameters reach the model
through save_checkpoint and load_checkpoint, so that a file written or read
into the wrong layer's slot of the stacked arrays fails the comparison; the batch has rows with trailing pads, a
pad in the middle and pads at the start; weights are int8 with bfloat16 scales
in the release's layouts and in the swapped layouts, or float32.

Relative error is max|model - oracle| / max|oracle| over all logits.
Tolerance 1e-4: the model runs in float32 (unit roundoff 2**-24 ~ 6e-8) and
the oracle in float64, so the difference is float32 rounding accumulated over
11 layers of ~10 ops each, measured at ~1e-6; 1e-4 leaves room for that and
for summation-order changes, while any real mistake (a swapped axis, a wrong
scale block, a missing cap, a wrong mask) moves logits by O(1) relative.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import manifest, model
from grok_moe.checkpoint import load_checkpoint, save_checkpoint
from grok_moe.config import TINY
from tests import helpers, oracle

CONFIG = TINY.replace(num_layers=11)
LOGIT_TOLERANCE = 1e-4
# Gates are probabilities in [0, 1]: float32 routing of slightly different
# (float32-rounded) activations moves them by ~1e-7..1e-6; 1e-5 absolute.
# The gates are where renormalising them would show: rms_norm_3 right after
# the MoE removes any per-token scale, so the logits barely see it (~1e-3).
GATE_TOLERANCE = 1e-5
# A float32 router can only choose differently from the float64 oracle where
# two of the top-(k+1) probabilities are closer than its own error (~1e-6).
# The inputs are checked to keep every such gap above this, so the expert
# indices must then be equal exactly.
MIN_ROUTING_MARGIN = 1e-5


def _check_against_oracle(flat_params, seed=0, checkpoint_dir=None):
  """Logits and routing of model.forward (float32) against the oracle; returns its trace.

  With `checkpoint_dir`, the params are saved there in the release format and the
  model runs on what load_checkpoint reads back (stacked, in file order)."""
  config = CONFIG
  tokens = helpers.padded_tokens(config, seed)
  trace = {}
  expected, expected_routing = oracle.oracle_logits(
      flat_params, tokens, config, return_routing=True, trace=trace)
  params = manifest.unflatten(flat_params)
  if checkpoint_dir is not None:
    save_checkpoint(params, checkpoint_dir, config, progress=False)
    params = load_checkpoint(checkpoint_dir, progress=False)
  out = model.forward(params, tokens, config, dtype=jnp.float32,
                      token_valid=model.release_token_valid(tokens, config),
                      return_routing=True)
  logits = np.asarray(out.logits)
  assert logits.shape == expected.shape == (*tokens.shape, config.vocab_size)

  error = helpers.relative_error(logits, expected)
  assert error < LOGIT_TOLERANCE, f"float32 logits differ from the oracle by {error:.3g} (relative)"

  # Routing, layer by layer (only meaningful where no near-tie could flip it).
  assert trace["min_routing_margin"] > MIN_ROUTING_MARGIN, (
      f"inputs have a router near-tie ({trace['min_routing_margin']:.2g}); pick another seed")
  indices = np.asarray(out.routing.expert_indices)
  gates = np.asarray(out.routing.gates)
  k = config.num_selected_experts
  assert indices.shape == gates.shape == (config.num_layers, *tokens.shape, k)
  for layer, (expected_indices, expected_gates) in enumerate(expected_routing):
    np.testing.assert_array_equal(indices[layer], expected_indices, err_msg=f"layer {layer}")
    np.testing.assert_allclose(gates[layer], expected_gates, rtol=0, atol=GATE_TOLERANCE,
                               err_msg=f"layer {layer}")
  return trace, expected


@pytest.mark.parametrize("layout", helpers.LAYOUTS)
def test_logits_and_routing_match_oracle(layout, tmp_path):
  """float32 logits within 1e-4 of the oracle and routing equal, for float weights and
  int8 weights in both scale layouts (the int8 ones through a saved checkpoint)."""
  via = None if layout == "float" else tmp_path
  trace, expected = _check_against_oracle(helpers.random_params(CONFIG, layout, seed=1),
                                          checkpoint_dir=via)
  # The inputs reach the nonlinear parts: attention logits beyond the cap
  # (30 tanh(s/30) is 24% below s at s = 30), gelu inputs beyond 2, and logits
  # of order 1 and more rather than a near-zero output that would match anything.
  assert trace["max_abs_attn_logit"] > CONFIG.attn_logit_cap
  assert trace["max_abs_gelu_input"] > 2.0
  assert np.max(np.abs(expected)) > 3.0


def test_oracle_sees_layer_order():
  """The parity tests can fail on file order: exchanging layers 2 and 10 moves the logits."""
  flat = helpers.random_params(CONFIG, "release", seed=1)
  tokens = helpers.padded_tokens(CONFIG)
  swapped = dict(flat)
  for name in flat:
    if name.startswith("transformer/decoder_layer_2/"):
      other = name.replace("decoder_layer_2/", "decoder_layer_10/")
      swapped[name], swapped[other] = flat[other], flat[name]
  error = helpers.relative_error(oracle.oracle_logits(swapped, tokens, CONFIG),
                                 oracle.oracle_logits(flat, tokens, CONFIG))
  assert error > 100 * LOGIT_TOLERANCE


def test_oracle_dequantizes_row_blocks_by_hand():
  """Row block r of the weight uses scales row r, also when R = K/2 and per channel (R = 1)."""
  weight = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.int8)       # [K=4, N=2]
  blocked = SimpleNamespace(weight=weight, scales=np.array([[1, 10], [100, 1000]], np.float32))
  per_channel = SimpleNamespace(weight=weight, scales=np.array([[2, 3]], np.float32))
  np.testing.assert_array_equal(oracle.dense_weight(blocked),
                                [[1, 20], [3, 40], [500, 6000], [700, 8000]])
  np.testing.assert_array_equal(oracle.dense_weight(per_channel),
                                [[2, 6], [6, 12], [10, 18], [14, 24]])

"""Prints the parity errors the tests bound, as measured: python -m tests.parity_report

- float32 logits of grok_moe.forward against the float64 NumPy oracle
  (tests/oracle.py) on TINY with 11 layers and a padded batch, for float
  weights and int8 weights in the release's and the swapped scale layouts
  (the bound in tests/test_parity.py is 1e-4 relative);
- the largest gate difference from the oracle's routing, and whether every
  expert index is equal;
- bfloat16 against float32 logits, as tests/test_model.py measures them: the
  share of routing decisions that flip, and the norm ratio over the positions
  before a row's first flip.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from grok_moe import manifest, model
from tests import helpers, oracle
from tests.test_parity import CONFIG


def main() -> None:
  for layout in ("float", "release", "swapped"):
    for seed in range(3):
      flat = helpers.random_params(CONFIG, layout, seed=seed)
      tokens = helpers.padded_tokens(CONFIG, seed)
      expected, routing = oracle.oracle_logits(flat, tokens, CONFIG, return_routing=True)
      params = manifest.unflatten(flat)
      out = model.forward(params, tokens, CONFIG, dtype=jnp.float32, return_routing=True)
      error = helpers.relative_error(np.asarray(out.logits), expected)
      indices = np.stack([layer[0] for layer in routing])                     # [L, B, T, k]
      gates = np.stack([layer[1] for layer in routing])                       # [L, B, T, k]
      gate_error = np.abs(np.asarray(out.routing.gates) - gates).max()
      same = np.array_equal(np.asarray(out.routing.expert_indices), indices)
      low = model.forward(params, tokens, CONFIG, dtype=jnp.bfloat16, return_routing=True)
      flipped = np.asarray(out.routing.expert_indices) != np.asarray(low.routing.expert_indices)
      reachable = np.cumsum(np.any(flipped, axis=(0, 3)), axis=1) > 0            # [B, T]
      a = np.asarray(low.logits, np.float64)[~reachable]
      b = np.asarray(out.logits, np.float64)[~reachable]
      bf16 = np.linalg.norm(a - b) / np.linalg.norm(b)
      print(f"{layout:8s} seed {seed}: logits {error:.2e} relative, gates {gate_error:.2e}, "
            f"expert indices equal: {same}; bfloat16 vs float32 {bf16:.3f} "
            f"({flipped.mean():.1%} of routing decisions flip)")


if __name__ == "__main__":
  main()

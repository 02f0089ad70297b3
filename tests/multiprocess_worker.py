"""One process of test_sharding's two-process test (not a test module itself).

    python -m tests.multiprocess_worker PORT PROCESS_ID OUT_DIR

Run twice, with process ids 0 and 1 and XLA_FLAGS giving each 4 CPU devices:
the two join through jax.distributed on 127.0.0.1:PORT (gloo collectives),
build one 2x4 mesh over their 8 devices, and compute SHARDED's logits of
`tokens()` and a few greedy tokens, from the same seeded parameters. Process
0 writes them to OUT_DIR/logits.npy and OUT_DIR/generated.npy.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from grok_moe.config import TINY

# Heads, experts, hidden units and vocabulary divisible by 8 (and 4 KV heads,
# which an 8-way model axis cannot split, so they are copied there).
SHARDED = TINY.replace(vocab_size=104, num_q_heads=8, num_kv_heads=4, num_experts=8,
                       sequence_len=32)
MESH = (2, 4)
# Ragged prompts, 8 rows: the batch splits over a data axis of 2, 4 or 8.
PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [40], [70, 71, 72, 73, 74, 75], [3], [90, 91],
           [17, 18, 19], [33]]
NEW_TOKENS = 3


def tokens(config=SHARDED) -> np.ndarray:
  """[8, 9] tokens with pads at the end, in the middle and at the start of rows."""
  from tests import helpers
  return np.concatenate([helpers.padded_tokens(config, seed=0),
                         helpers.padded_tokens(config, seed=1)])


def params():
  from grok_moe import manifest
  from tests import helpers
  return manifest.unflatten(helpers.random_params(SHARDED, "release", seed=4))


def main(port: str, process_id: int, out_dir: str) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  import jax.numpy as jnp
  from grok_moe import model, sampling, sharding

  assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
  plan = sharding.ShardingPlan(SHARDED, sharding.make_mesh(*MESH), "tensor")
  placed = plan.shard_params(params())
  logits = sharding.fetch(model.forward(placed, tokens(), SHARDED, dtype=jnp.float32,
                                        token_valid=tokens() != SHARDED.pad_token,
                                        sharding=plan).logits)
  steps = sampling.generate(placed, SHARDED, PROMPTS,
                            sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0),
                            dtype=jnp.float32, sharding=plan)
  generated = np.stack([step.tokens for step in steps], axis=1)
  if process_id == 0:
    out = pathlib.Path(out_dir)
    np.save(out / "logits.npy", logits)
    np.save(out / "generated.npy", generated)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])

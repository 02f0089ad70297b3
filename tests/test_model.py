"""The model's parameter tree, configs and presets, bfloat16 accuracy and routing output."""

from __future__ import annotations

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import params as param_table
from grok_moe import manifest, model, quant
from grok_moe.config import BENCH, GROK_1, TINY, ModelConfig
from grok_moe.errors import ConfigError
from tests import helpers

# A copy of shared/grok1_manifest.json: [file index, name, shape] of every
# tensor of the released checkpoint, in file order.
MANIFEST = [(index, name, tuple(shape)) for index, name, shape in json.loads(
    (pathlib.Path(__file__).parent / "data" / "grok1_manifest.json").read_text())]
GROK_1_PARAMETERS = 315_684_820_992


def test_grok_1_parameter_tree_is_the_release_manifest():
  params = model.abstract_params(GROK_1)  # the Haiku modules' tree, shapes only
  flat = manifest.flatten(params)
  # The release's file order is the tree flattened with names sorted as strings.
  assert [(index, name, tuple(flat[name].shape)) for index, name in enumerate(sorted(flat))] \
      == MANIFEST
  assert len(flat) == 770
  assert sum(math.prod(leaf.shape) for leaf in flat.values()) == GROK_1_PARAMETERS
  assert all(leaf.dtype == jnp.float32 for leaf in flat.values())


def test_checkpoint_manifest_is_the_release_manifest():
  assert [tuple(entry) for entry in manifest.checkpoint_manifest(GROK_1)] == MANIFEST
  assert manifest.parameter_shapes(GROK_1) == {name: shape for _, name, shape in MANIFEST}


def test_row_blocks_follow_the_spec():
  for _, name, _ in MANIFEST:
    assert param_table.row_blocks_for(name) == helpers.release_row_blocks(name), name


def test_grok_1_values():
  c = GROK_1
  assert (c.vocab_size, c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads) == \
      (131072, 6144, 128, 48, 8)
  assert (c.num_layers, c.num_experts, c.num_selected_experts) == (64, 8, 2)
  assert (c.widening_factor, c.ffn_size, c.sequence_len) == (8, 32768, 8192)
  assert c.embedding_multiplier_scale == pytest.approx(78.38367176906169, rel=1e-15)
  assert c.output_multiplier_scale == pytest.approx(0.5773502691896257, rel=1e-15)
  assert c.attn_output_multiplier == pytest.approx(0.08838834764831845, rel=1e-15)
  assert (c.attn_logit_cap, c.rms_norm_eps, c.rope_base) == (30.0, 1e-5, 10000)
  assert (c.pad_token, c.bos_token, c.eos_token) == (0, 1, 2)


def test_bench_values():
  c = BENCH
  assert (c.vocab_size, c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads) == \
      (4096, 512, 64, 8, 2)
  assert (c.num_layers, c.num_experts, c.num_selected_experts) == (4, 8, 2)
  assert (c.widening_factor, c.sequence_len) == (8, 1024)
  assert c.embedding_multiplier_scale == pytest.approx(math.sqrt(512), rel=1e-15)
  assert c.attn_output_multiplier == pytest.approx(1 / math.sqrt(64), rel=1e-15)
  assert c.output_multiplier_scale == pytest.approx(1 / math.sqrt(3), rel=1e-15)


def test_tiny_values():
  c = TINY
  assert (c.vocab_size, c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads) == \
      (97, 40, 8, 6, 2)
  assert (c.num_layers, c.num_experts, c.num_selected_experts) == (2, 4, 2)
  assert (c.widening_factor, c.ffn_size, c.sequence_len) == (2.5, 72, 64)


@pytest.mark.parametrize("changes", [
    {"num_q_heads": 5},                 # 5 query heads over 2 KV heads
    {"num_kv_heads": 4},                # 6 query heads over 4 KV heads
    {"num_selected_experts": 5},        # k > E
    {"key_size": 7},                    # RoPE needs an even key size
    {"emb_size": 0},
    {"vocab_size": -1},
    {"num_layers": 0},
    {"num_experts": 0},
    {"widening_factor": 0},
])
def test_config_rejects_impossible_values(changes):
  with pytest.raises(ConfigError):
    TINY.replace(**changes)


def test_config_accepts_the_presets():
  for config in (GROK_1, BENCH, TINY):
    assert ModelConfig(**config.to_dict()) == config


# bfloat16 against float32 on the parity model (TINY, 11 layers, release layout).
#
# Reasoning: bfloat16 keeps 8 significant bits, so each rounding is off by up
# to 2**-9 relative. A layer rounds ~10 times on the way into the residual
# stream (norm outputs, q/k/v, attention weights and output, expert hidden and
# output, the residual adds), so 11 layers give ~110 roundings: about
# 2**-9 * sqrt(110) ~ 0.02 if they add like a random walk and 0.2 if they all
# line up. These weights give attention logits up to ~60 (to exercise the soft
# cap), where an error of 2**-8 in q.k is ~0.2 absolute, so somewhat more.
# Measured (norm ratio |bf16 - f32| / |f32| over the logits no routing flip can
# reach, 12 seeds): 0.018 .. 0.036. Tolerance 0.08: twice the worst seed, well
# below the O(1) error of a real mistake in the bfloat16 path.
BF16_TOLERANCE = 0.08
# A float32 router fed bfloat16 activations picks another expert where two
# router probabilities are closer than its input error: measured 0.5% .. 4.7%
# of decisions on these weights (4 experts, so gaps are often small). More than
# 10% would mean the router itself lost precision.
BF16_MAX_ROUTING_FLIPS = 0.10
BF16_CONFIG = TINY.replace(num_layers=11)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_logits_agree_with_float32(seed):
  params = manifest.unflatten(helpers.random_params(BF16_CONFIG, "release", seed=seed))
  tokens = helpers.padded_tokens(BF16_CONFIG, seed)
  f32 = model.forward(params, tokens, BF16_CONFIG, dtype=jnp.float32, return_routing=True)
  bf16 = model.forward(params, tokens, BF16_CONFIG, dtype=jnp.bfloat16, return_routing=True)
  assert bf16.logits.dtype == jnp.float32

  flipped = np.asarray(f32.routing.expert_indices) != np.asarray(bf16.routing.expert_indices)
  assert flipped.mean() < BF16_MAX_ROUTING_FLIPS
  # A flip at (layer, row, position t) changes that row from t on (through
  # attention, in later layers): compare only the positions before a row's
  # first flip. Those are the same computation up to rounding.
  reachable = np.cumsum(np.any(flipped, axis=(0, 3)), axis=1) > 0     # [B, T]
  assert (~reachable).mean() >= 0.2, "too few positions left to compare"
  a = np.asarray(bf16.logits, np.float64)[~reachable]
  b = np.asarray(f32.logits, np.float64)[~reachable]
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < BF16_TOLERANCE


def test_forward_returns_routing_only_when_asked():
  config = BF16_CONFIG  # the compile the bfloat16 and parity tests already made
  params = manifest.unflatten(helpers.random_params(config, "release", seed=0))
  tokens = helpers.padded_tokens(config)
  out = model.forward(params, tokens, config, dtype=jnp.float32, return_routing=True)
  L, (B, T), k = config.num_layers, tokens.shape, config.num_selected_experts
  assert out.logits.shape == (B, T, config.vocab_size) and out.logits.dtype == jnp.float32
  assert out.routing.expert_indices.shape == out.routing.gates.shape == (L, B, T, k)
  assert out.routing.expert_indices.dtype == jnp.int32
  assert out.routing.gates.dtype == jnp.float32
  assert out.cache is None

  tiny = manifest.unflatten(helpers.random_params(TINY, "float", seed=0))
  assert model.forward(tiny, helpers.padded_tokens(TINY), TINY, dtype=jnp.float32).routing is None

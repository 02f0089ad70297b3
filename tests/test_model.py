"""The model's parameter tree, configs and presets, bfloat16 accuracy and routing output."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import manifest, model
from grok_moe import params as param_table
from grok_moe.config import BENCH, GROK_1, TINY, ModelConfig
from grok_moe.errors import ConfigError
from tests import helpers

# A copy of shared/grok1_manifest.json: [file index, name, shape] of every
# tensor of the released checkpoint, in file order.
MANIFEST = [(index, name, tuple(shape)) for index, name, shape in json.loads(
    (pathlib.Path(__file__).parent / "data" / "grok1_manifest.json").read_text())]
GROK_1_PARAMETERS = 315_684_820_992


def test_stacked_parameter_tree_is_the_release_manifest():
  """The model's stacked tree, unstacked by layer, is the release's 770 tensors with
  their shapes and file order. Catches a tensor kind missing from or added to the
  table, a wrong shape formula, a per-layer tensor not stacked [L, ...], and a
  change in the release's name-sorted file order."""
  stacked = param_table.flatten(model.abstract_params(GROK_1))   # the Haiku model's tree
  assert len(stacked) == 14
  assert all(leaf.dtype == jnp.float32 for leaf in stacked.values())
  unstacked = {}
  for path, leaf in stacked.items():
    spec = param_table.BY_PATH[path]
    if spec.per_layer:
      assert leaf.shape[0] == GROK_1.num_layers, path
      for layer in range(GROK_1.num_layers):
        unstacked[spec.release_name(layer)] = tuple(leaf.shape[1:])
    else:
      unstacked[path] = tuple(leaf.shape)
  assert [(index, name, unstacked[name]) for index, name in enumerate(sorted(unstacked))] \
      == MANIFEST
  assert sum(math.prod(shape) for shape in unstacked.values()) == GROK_1_PARAMETERS


def test_haiku_init_creates_the_table():
  """hk.transform's init builds exactly the table's stacked tensors: the model reads
  every parameter from the table, under the names the loader writes."""
  config = TINY.replace(num_layers=3)
  tokens = jnp.zeros((1, 2), jnp.int32)
  created = model.transformed(config, "float32", None).init(
      jax.random.PRNGKey(0), tokens, jnp.ones((1, 2), bool))
  expected = param_table.flatten(model.abstract_params(config))
  got = param_table.flatten(created)
  assert {path: tuple(leaf.shape) for path, leaf in got.items()} == \
      {path: tuple(leaf.shape) for path, leaf in expected.items()}


def test_checkpoint_manifest_is_the_release_manifest():
  """checkpoint_manifest(GROK_1), derived from the table, is the release's file list."""
  assert [tuple(entry) for entry in manifest.checkpoint_manifest(GROK_1)] == MANIFEST
  assert manifest.parameter_shapes(GROK_1) == {name: shape for _, name, shape in MANIFEST}


def test_row_blocks_follow_the_spec():
  """The table's quantization layouts are the spec's (copied independently into
  tests/helpers.py): 8 row blocks for the two output projections, 1 for the others,
  float32 for embeddings, norms and router."""
  for _, name, _ in MANIFEST:
    assert param_table.row_blocks_for(name) == helpers.release_row_blocks(name), name


def test_stacking_round_trips_the_release_tensors():
  """stack_release then release_tensors gives back every release tensor unchanged,
  int8 weights and scales included: layer i of a stack is layer i's file."""
  config = TINY.replace(num_layers=3)
  flat = helpers.random_params(config, "release", seed=2)
  stacked = param_table.stack_release(flat, config)
  back = dict(param_table.release_tensors(stacked, config))
  assert sorted(back) == sorted(flat)
  for name, leaf in flat.items():
    for got, want in zip(jax.tree.leaves(back[name]), jax.tree.leaves(leaf)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_grok_1_values_follow_the_spec_formulas():
  """GROK_1's published sizes, and its derived constants computed by the spec's
  formulas from them (not restated): catches a preset built with a wrong formula."""
  c = GROK_1
  assert (c.vocab_size, c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads) == \
      (131072, 6144, 128, 48, 8)
  assert (c.num_layers, c.num_experts, c.num_selected_experts) == (64, 8, 2)
  assert (c.widening_factor, c.sequence_len) == (8, 8192)
  # ffn: int(8 * 6144) * 2 // 3 = 32768, already a multiple of 8
  assert c.ffn_size == int(c.widening_factor * c.emb_size) * 2 // 3 == 32768
  assert c.embedding_multiplier_scale == pytest.approx(math.sqrt(c.emb_size), rel=1e-15)
  assert c.output_multiplier_scale == pytest.approx(1 / math.sqrt(3), rel=1e-15)
  assert c.attn_output_multiplier == pytest.approx(1 / math.sqrt(c.key_size), rel=1e-15)
  assert (c.attn_logit_cap, c.rms_norm_eps, c.rope_base) == (30.0, 1e-5, 10000)
  assert (c.pad_token, c.bos_token, c.eos_token) == (0, 1, 2)


def test_bench_has_grok_1_proportions():
  """BENCH is Grok-1 at width 512: the same head width ratio, query/KV grouping,
  experts, top-k and widening, so its speed figures stand for Grok-1's shapes."""
  b, g = BENCH, GROK_1
  assert b.emb_size == 512 and b.num_layers == 4
  assert (b.num_experts, b.num_selected_experts, b.widening_factor) == \
      (g.num_experts, g.num_selected_experts, g.widening_factor)
  assert b.num_q_heads * b.key_size == b.emb_size and g.num_q_heads * g.key_size == g.emb_size
  assert b.num_q_heads // b.num_kv_heads == 4 and g.num_q_heads // g.num_kv_heads == 6
  assert b.embedding_multiplier_scale == pytest.approx(math.sqrt(512), rel=1e-15)
  assert b.attn_output_multiplier == pytest.approx(1 / math.sqrt(b.key_size), rel=1e-15)


def test_tiny_sizes_are_mutually_distinct():
  """TINY's axis sizes are all different (and its ffn size is rounded up to a multiple
  of 8 from 2.5 * 40 * 2 / 3 = 66), so a test that swaps two axes fails loudly. (The
  layer count is not an axis of any matrix; tests set it as they need.)"""
  c = TINY
  sizes = [c.vocab_size, c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads,
           c.num_experts, c.ffn_size, c.q_size, c.kv_size]
  assert len(set(sizes)) == len(sizes)
  assert c.ffn_size == 72


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


@pytest.mark.parametrize("name, published", [
    ("mixtral-8x7b", 46.7e9), ("qwen1.5-moe-a2.7b", 14.3e9), ("qwen3-30b-a3b", 30.5e9)])
def test_family_presets_have_their_published_parameter_counts(name, published):
  """Each family preset's tensors, counted from the parameter table with its switches
  (biases, q/k norms, shared expert, untied output projection), add up to the model's
  published size to its published precision (46.7 B, 14.3 B, 30.5 B): catches a preset
  size or a switch that adds or drops tensors."""
  from grok_moe.config import PRESETS
  count = param_table.parameter_count(PRESETS[name])
  assert abs(count - published) < 0.05e9, count

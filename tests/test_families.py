"""Mixtral, Qwen2-MoE and Qwen3-MoE from Hugging Face checkpoints against transformers.

tests/data/families/<family>/ holds a tiny random checkpoint saved by
transformers (config.json, safetensors; Mixtral's split over three files with
an index) and reference.npz, what transformers' own model computed from it
(scripts/build_family_fixtures.py; CI needs no torch): the float32 logits of a
right-padded batch, each layer's router logits, and each row's greedy
continuation with the logits of every step.

Tolerance: the issue's bound, 1e-4 of the reference logits' standard
deviation. Both sides compute in float32 in different orders (fused versus
per-expert products, another softmax), which moves logits by about 1e-6 of
their spread (measured 1.1e-6 .. 1.5e-6 for the three families' forward
passes, 9.7e-7 .. 1.8e-6 over every comparison below, sharded passes and
cached steps included); a wrong switch (SiLU for GELU, renormalised gates, a
missing bias, q/k norm or shared expert) moves them by a large fraction of it.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import hf_checkpoint, model, sampling, sharding
from grok_moe import params as param_table
from grok_moe.errors import CheckpointError
from tests import helpers

FAMILIES_DIR = pathlib.Path(__file__).parent / "data" / "families"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
TOLERANCE = 1e-4  # of the reference logits' standard deviation


@functools.lru_cache(maxsize=None)
def loaded(family: str):
  """(config, params, reference arrays) of a family's fixture."""
  config, params = hf_checkpoint.load(FAMILIES_DIR / family)
  reference = dict(np.load(FAMILIES_DIR / family / "reference.npz"))
  return config, params, reference


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_routing_equal_transformers(family):
  """The padded batch's logits at every real position within 1e-4 of the reference's
  spread, and each layer's chosen experts those of the reference router wherever its
  top-k is not a near-tie. Catches a wrong switch in the config, a tensor mapped or
  transposed wrongly from the Hugging Face names, and padding that is attended to."""
  config, params, ref = loaded(family)
  real = ref["attention_mask"].astype(bool)                                   # [B, T]
  out = model.forward(params, ref["input_ids"], config, dtype=jnp.float32, token_valid=real,
                      return_routing=True)
  assert helpers.scaled_error(np.asarray(out.logits)[real], ref["logits"][real]) < TOLERANCE

  batch, length = real.shape
  router_logits = ref["router_logits"].reshape(config.num_layers, batch, length, -1)  # [L, B, T, E]
  ordered = np.sort(router_logits, axis=-1)[..., ::-1]
  k = config.num_selected_experts
  clear = (ordered[..., k - 1] - ordered[..., k]) > 1e-3                     # no near-tie
  want = np.sort(np.argsort(-router_logits, axis=-1)[..., :k], axis=-1)
  got = np.sort(np.asarray(out.routing.expert_indices), axis=-1)
  checked = clear & real[None]
  assert checked.mean() > 0.5
  np.testing.assert_array_equal(got[checked], want[checked])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuations_and_cached_logits_equal_transformers(family):
  """The sampler (prefill, then cached decoding) continues each row's prompt with the
  reference's greedy tokens, and every step's logits equal the reference's step scores:
  cached decoding gives the full pass's logits, token for token."""
  config, params, ref = loaded(family)
  lengths = ref["attention_mask"].sum(axis=1)
  prompts = [row[:n].tolist() for row, n in zip(ref["input_ids"], lengths)]
  new_tokens = ref["greedy"].shape[1]
  steps = list(sampling.generate(params, config, prompts,
                                 sampling.SamplingConfig(max_new_tokens=new_tokens,
                                                         temperature=0),
                                 dtype=jnp.float32))
  tokens = np.stack([step.tokens for step in steps], axis=1)
  np.testing.assert_array_equal(tokens, ref["greedy"])
  for i, step in enumerate(steps):
    assert helpers.scaled_error(step.logits, ref["greedy_scores"][:, i]) < TOLERANCE, i


# (family, (data, model) mesh, MoE mode): every family in both modes. The model axis must
# divide the 4 query heads; the fixtures' expert FFN sizes (20, 14, 6) and Qwen2-MoE's shared
# FFN (26) divide it in tensor mode, their experts (8, 8, 16) in expert mode. A model axis of
# 4 copies the 2 KV heads, one of 2 splits them; the 2x2 and 2x4 meshes split the batch's 4
# rows over data as well.
SHARDED_CASES = [
    ("mixtral", (1, 4), "expert"), ("mixtral", (2, 4), "tensor"),
    ("qwen2_moe", (1, 2), "expert"), ("qwen2_moe", (2, 2), "tensor"),
    ("qwen3_moe", (2, 4), "expert"), ("qwen3_moe", (1, 2), "tensor"),
]


@functools.lru_cache(maxsize=None)
def loaded_sharded(family: str, mesh_shape: tuple[int, int], mode: str):
  """(plan, params) of a family's fixture loaded straight into the shards of a mesh."""
  config = loaded(family)[0]
  devices = jax.devices()[:math.prod(mesh_shape)]
  plan = sharding.ShardingPlan(config, sharding.make_mesh(*mesh_shape, devices=devices), mode)
  _, params = hf_checkpoint.load(FAMILIES_DIR / family, sharding=plan)
  return plan, params


@pytest.mark.parametrize("family, mesh_shape, mode", SHARDED_CASES,
                         ids=[f"{family}-{data}x{size}-{mode}"
                              for family, (data, size), mode in SHARDED_CASES])
def test_sharded_loading_and_forward_equal_transformers(family, mesh_shape, mode):
  """Loaded straight into the shards of a mesh (each device reading its slices of the
  safetensors files), the sharded forward pass gives the reference logits, in both MoE
  modes. The case's mesh must really split what its mode splits (the experts, or every
  expert's and the shared expert's hidden units, and the batch where there is a data
  axis), so a fixture size that stops dividing fails here instead of silently copying.
  Catches a shard given another device's slice of a fused or per-expert tensor, partial
  expert outputs summed wrongly, and a bias or q/k norm split with the wrong heads."""
  plan, params = loaded_sharded(family, mesh_shape, mode)
  config = plan.config
  _, _, ref = loaded(family)
  split = param_table.FFN if mode == "tensor" else param_table.EXPERTS
  assert plan.mesh_axis(split) == sharding.MODEL
  if config.shared_expert_ffn_size:
    assert plan.mesh_axis(param_table.SHARED_FFN) == sharding.MODEL
  real = ref["attention_mask"].astype(bool)                                   # [B, T]
  assert plan.batch_axis(real.shape[0]) == (sharding.DATA if mesh_shape[0] > 1 else None)
  for path, leaf in param_table.flatten(params).items():
    assert leaf.sharding.spec == plan.weight_spec(path), path
  logits = model.forward(params, ref["input_ids"], config, dtype=jnp.float32,
                         token_valid=real, sharding=plan).logits
  assert helpers.scaled_error(sharding.fetch(logits)[real], ref["logits"][real]) < TOLERANCE


def test_sharded_greedy_continuations_equal_transformers():
  """On a 2x2 mesh in tensor mode (cache rows split over data, KV heads and every
  expert's hidden units over model), the sampler's cached decoding continues each prompt
  with the reference's greedy tokens, each step's logits the reference's. Catches a
  sharded cache written or read at another device's rows or heads."""
  family = "qwen2_moe"
  plan, params = loaded_sharded(family, (2, 2), "tensor")
  assert plan.kv_heads_sharded
  _, _, ref = loaded(family)
  lengths = ref["attention_mask"].sum(axis=1)
  prompts = [row[:n].tolist() for row, n in zip(ref["input_ids"], lengths)]
  new_tokens = ref["greedy"].shape[1]
  steps = list(sampling.generate(params, plan.config, prompts,
                                 sampling.SamplingConfig(max_new_tokens=new_tokens,
                                                         temperature=0),
                                 dtype=jnp.float32, sharding=plan))
  tokens = np.stack([step.tokens for step in steps], axis=1)
  np.testing.assert_array_equal(tokens, ref["greedy"])
  for i, step in enumerate(steps):
    assert helpers.scaled_error(sharding.fetch(step.logits), ref["greedy_scores"][:, i]) < TOLERANCE, i


def test_config_mapping_sets_each_familys_switches():
  """The config.json fields that differ between the families reach the switches."""
  mixtral, qwen2, qwen3 = (hf_checkpoint.model_config(
      hf_checkpoint.read_hf_config(FAMILIES_DIR / family)) for family in FAMILIES)
  for config in (mixtral, qwen2, qwen3):
    assert config.expert_activation == "silu" and not config.post_norms
    assert not config.tie_embeddings and config.attn_logit_cap == 0
    assert config.embedding_multiplier_scale == config.output_multiplier_scale == 1
  assert mixtral.router_renormalize and not (mixtral.qkv_bias or mixtral.qk_norm)
  assert qwen2.qkv_bias and qwen2.shared_expert_ffn_size > 0 and qwen2.shared_expert_gate
  assert qwen3.qk_norm and not qwen3.shared_expert_ffn_size


def test_checkpoint_errors_name_the_file(tmp_path):
  """A missing shard, a tensor of the wrong shape and an unknown model_type get a
  CheckpointError naming the file or the type."""
  source = FAMILIES_DIR / "mixtral"
  for file in source.iterdir():
    (tmp_path / file.name).write_bytes(file.read_bytes())
  (tmp_path / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors is missing"):
    hf_checkpoint.load(tmp_path)
  with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
    hf_checkpoint.model_config({"model_type": "llama"})
  hf = hf_checkpoint.read_hf_config(source)
  hf["hidden_size"] = 44
  (tmp_path / "config.json").write_text(__import__("json").dumps(hf))
  (tmp_path / "model-00002-of-00003.safetensors").write_bytes(
      (source / "model-00002-of-00003.safetensors").read_bytes())
  with pytest.raises(CheckpointError, match=r"has shape .* the config needs"):
    hf_checkpoint.load(tmp_path)


@pytest.mark.parametrize("family", FAMILIES + ("grok2",))
def test_command_line_completes_text_with_each_family(family, capsys):
  """`grok-moe --checkpoint <fixture> --prompt ...` runs every family end to end: the Hugging
  Face directory is recognised (Grok-2's: its rank files), its tokenizer.json (Grok-2's
  tokenizer.tok.json) used, and the greedy text is what the token-level API gives for the
  same ids."""
  from grok_moe import cli
  from grok_moe.api import Model
  directory = FAMILIES_DIR / family
  code = cli.main(["--checkpoint", str(directory), "--prompt", "Hello", "--max-new-tokens", "4",
                   "--temperature", "0", "--compilation-cache", "off"])
  out = capsys.readouterr().out
  assert code == 0 and out.startswith("Hello")
  model = Model.from_checkpoint(directory, compilation_cache=False)
  expected = model.tokenizer.decode(model.generate_tokens(model.encode("Hello"),
                                                          max_new_tokens=4, temperature=0))
  assert out == "Hello" + expected + "\n"


def test_a_family_saves_in_the_release_format_and_loads_back(tmp_path):
  """save_checkpoint writes a Hugging Face-loaded model in the release's int8 format (its
  extra tensors, biases and the shared expert, included; config.json keeps the switches),
  and load_checkpoint reads it back to the same config and, up to int8 rounding, the same
  logits. Tolerance: per-channel int8 keeps each weight within half a scale step (under
  0.4% of the column's largest); through three layers of these small random matrices
  that moves the logits by 3.1% of their spread (measured); 0.1 leaves 3x room, while a
  tensor lost or misplaced moves them by O(1)."""
  from grok_moe import checkpoint
  config, params, ref = loaded("qwen2_moe")
  checkpoint.save_checkpoint(params, tmp_path, config, progress=False)
  assert checkpoint.checkpoint_config(tmp_path) == config
  reloaded = checkpoint.load_checkpoint(tmp_path, progress=False)
  real = ref["attention_mask"].astype(bool)
  logits = model.forward(reloaded, ref["input_ids"], config, dtype=jnp.float32,
                         token_valid=real).logits
  assert helpers.scaled_error(np.asarray(logits)[real], ref["logits"][real]) < 0.1


@pytest.mark.parametrize("mesh_shape, mode", [(None, None), ((1, 2), "tensor")])
def test_int8_on_the_way_in_stays_close_to_transformers(mesh_shape, mode):
  """quantize="int8" turns the quantizable matrices into int8 with bfloat16 scales in the
  release's layouts while loading (on one device, and straight into a mesh's shards),
  leaving the norms, biases, router and embeddings as stored; the logits stay within
  int8 rounding of the reference (measured 6.8e-2, 3.1e-2 and 2.7e-2 of the spread for
  the three families on one device, 2.7e-2 for Qwen3-MoE on the 1x2 mesh; the bound is the
  release-format round trip's).
  Catches scales taken over the wrong axis or shards given another device's columns."""
  family = "qwen3_moe"
  config, _, ref = loaded(family)
  plan = None
  if mesh_shape is not None:
    plan = sharding.ShardingPlan(config, sharding.make_mesh(
        *mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)]), mode)
  _, params = hf_checkpoint.load(FAMILIES_DIR / family, sharding=plan, quantize="int8")
  flat = param_table.flatten(params)
  for spec in param_table.params_for(config):
    leaf = flat[spec.path]
    if spec.quantized:
      assert leaf.weight.dtype == jnp.int8 and leaf.scales.dtype == jnp.bfloat16, spec.path
      blocks = spec.row_blocks if leaf.weight.shape[-2] % spec.row_blocks == 0 else 1
      assert leaf.scales.shape[-2] == blocks, spec.path
    else:
      assert leaf.dtype == jnp.float32, spec.path
  real = ref["attention_mask"].astype(bool)
  logits = model.forward(params, ref["input_ids"], config, dtype=jnp.float32, token_valid=real,
                         sharding=plan).logits
  assert helpers.scaled_error(sharding.fetch(logits)[real], ref["logits"][real]) < 0.1

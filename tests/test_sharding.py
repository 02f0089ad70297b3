"""The model on meshes of devices gives the single-device results.

conftest.py gives this session 8 CPU devices. Every sharded result is compared
with the same computation on one device, in float32, within 1e-4 relative: the
sharded pass does the same arithmetic but sums some partial products in
another order (the model axis's psum), which moves float32 logits by ~1e-7;
a wrong shard (a swapped block of scales, a head paired with the wrong KV
head, an expert counted twice) moves them by O(1).
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import grok_moe
from grok_moe import (attention, checkpoint, manifest, memory, model, moe, quant, sampling,
                      sharded_ops, sharding)
from grok_moe import params as param_table
from grok_moe.config import GROK_1, TINY
from grok_moe.errors import MeshError
from tests import helpers, multiprocess_worker
from tests.multiprocess_worker import SHARDED

REPO = pathlib.Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
PROMPTS = multiprocess_worker.PROMPTS
CACHE_LEN = 16


def setup_module():
  assert jax.device_count() >= 8, "tests/conftest.py should give 8 CPU devices"


@functools.lru_cache(maxsize=None)
def flat_params(config):
  return helpers.random_params(config, "release", seed=4)


def real_tokens(config) -> np.ndarray:
  """[8, 9] bool: which of multiprocess_worker.tokens are real (the pad id marks padding)."""
  return multiprocess_worker.tokens(config) != config.pad_token


@functools.lru_cache(maxsize=None)
def single_device_logits(config) -> np.ndarray:
  """Logits [8, 9, V] of one uncached pass over multiprocess_worker.tokens, on one device."""
  params = manifest.unflatten(flat_params(config))
  return np.asarray(model.forward(params, multiprocess_worker.tokens(config), config,
                                  token_valid=real_tokens(config), dtype=jnp.float32).logits)


@functools.lru_cache(maxsize=None)
def single_device_generation(config) -> np.ndarray:
  """Greedy tokens [8, NEW_TOKENS] for PROMPTS, on one device."""
  settings = sampling.SamplingConfig(max_new_tokens=multiprocess_worker.NEW_TOKENS,
                                     temperature=0)
  steps = sampling.generate(manifest.unflatten(flat_params(config)), config, PROMPTS, settings,
                            dtype=jnp.float32)
  return np.stack([step.tokens for step in steps], axis=1)


def decode_one_token_at_a_time(params, config, plan) -> np.ndarray:
  """Logits [8, 9, V] of feeding the tokens one position at a time through a sharded cache."""
  tokens, real = multiprocess_worker.tokens(config), real_tokens(config)
  batch, length = tokens.shape
  cache = plan.init_cache(batch, CACHE_LEN, jnp.float32)
  logits = []
  for position in range(length):
    out = model.forward(params, tokens[:, position:position + 1], config, dtype=jnp.float32,
                        token_valid=real[:, position:position + 1],
                        positions=np.full((batch, 1), position, np.int32), cache=cache,
                        sharding=plan)
    cache = out.cache
    logits.append(sharding.fetch(out.logits)[:, 0])
  return np.stack(logits, axis=1)


# --- The mesh and the table. ---

def test_make_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh().shape) == {"data": 1, "model": 8}
  assert dict(sharding.make_mesh(2).shape) == {"data": 2, "model": 4}
  assert dict(sharding.make_mesh(model=2).shape) == {"data": 4, "model": 2}
  assert dict(sharding.make_mesh(8, 1).shape) == {"data": 8, "model": 1}
  three = sharding.make_mesh(1, 3, devices=jax.devices()[:3])
  assert three.devices.size == 3
  with pytest.raises(MeshError, match="needs 6 devices.*1x8, 2x4, 4x2, 8x1"):
    sharding.make_mesh(2, 3)
  with pytest.raises(MeshError, match="do not split"):
    sharding.make_mesh(3)
  assert sharding.parse_mesh("2x4") == (2, 4)
  with pytest.raises(MeshError, match="DATAxMODEL"):
    sharding.parse_mesh("8")


def test_table_places_grok_1_as_the_plan_says():
  """The logical-axis rules give GROK_1 on 1x8 the layout the design says: heads and
  vocabulary over the model axis, experts' hidden units in tensor mode, whole experts
  in expert mode, scale blocks following split rows only where they divide."""
  plan = sharding.ShardingPlan(GROK_1, sharding.AbstractMesh((1, 8), sharding.AXES), "tensor")
  layer = "transformer/decoder_layer_7/"
  assert plan.weight_spec(layer + "multi_head_attention/query/w") == P(None, "model")
  assert plan.weight_spec(layer + "multi_head_attention/linear/w") == P("model", None)
  assert plan.weight_spec(layer + "moe/linear/w") == P(None, None, "model")
  assert plan.weight_spec(layer + "moe/linear_1/w") == P(None, "model", None)
  assert plan.weight_spec(layer + "router/w") == P(None, None)
  assert plan.weight_spec("language_model/in_out_embed/embeddings") == P("model", None)
  assert plan.kv_heads_sharded  # 8 KV heads over 8
  stacked = param_table.LAYERS_MODULE + "/"
  assert plan.weight_spec(stacked + "moe/linear/w") == P(None, None, None, "model")
  shapes = memory.memory_plan(GROK_1, (1, 8)).shard_shapes
  # The 8-row-block scales of linear_1 follow its rows: one block per device.
  assert shapes[stacked + "moe/linear_1/w"] == quant.QuantizedWeight(
      weight=(64, 8, 4096, 6144), scales=(64, 8, 1, 6144))
  assert shapes[stacked + "moe/linear/w"] == quant.QuantizedWeight(
      weight=(64, 8, 6144, 4096), scales=(64, 8, 1, 4096))
  expert = memory.memory_plan(GROK_1, (2, 4), moe_mode="expert").shard_shapes
  assert expert[stacked + "moe/linear_1/w"] == quant.QuantizedWeight(
      weight=(64, 2, 32768, 6144), scales=(64, 2, 8, 6144))
  # Six devices on the model axis: 6 does not divide the 8 scale blocks of
  # attention/linear, so every device keeps all 8 and uses its own rows' ones.
  six = memory.memory_plan(GROK_1.replace(widening_factor=9), (1, 6)).shard_shapes
  assert six[stacked + "multi_head_attention/linear/w"] == quant.QuantizedWeight(
      weight=(64, 1024, 6144), scales=(64, 8, 6144))


@pytest.mark.parametrize("config, mesh_shape, mode, message", [
    (TINY, (1, 4), "tensor", "num_q_heads = 6 does not split over the model axis of size 4"),
    (SHARDED, (1, 8), "expert", None),
    (SHARDED.replace(num_experts=6), (1, 4), "expert", "num_experts = 6"),
    (GROK_1, (1, 6), "tensor", "ffn_size = 32768"),
])
def test_plan_refuses_configs_the_mesh_cannot_split(config, mesh_shape, mode, message):
  """A mesh axis that does not divide the heads, experts or hidden units is refused
  with the config field named (or accepted where it divides)."""
  mesh = sharding.AbstractMesh(mesh_shape, sharding.AXES)
  if message is None:
    sharding.ShardingPlan(config, mesh, mode)
    return
  with pytest.raises(MeshError, match=message):
    sharding.ShardingPlan(config, mesh, mode)


# --- Sharded results equal the single-device ones. ---

CASES = [
    (SHARDED, (1, 8), "tensor"),   # KV heads copied (4 over 8), one scale block per device
    (SHARDED, (2, 4), "tensor"),   # KV heads split, batch split
    (SHARDED, (8, 1), "tensor"),   # data parallel only
    (SHARDED, (2, 4), "expert"),   # 2 experts per device
]


@pytest.mark.parametrize("config, mesh_shape, mode", CASES,
                         ids=[f"{m[0]}x{m[1]}-{mode}-{'tiny' if c is TINY else 'sharded'}"
                              for c, m, mode in CASES])
def test_sharded_forward_and_cached_decoding_equal_one_device(config, mesh_shape, mode):
  """Every leaf lies as the rules say, and the sharded forward pass and token-by-token
  cached decoding give the single-device logits: catches a wrong shard of weights,
  scales, heads or experts, and a cache written to the wrong device's slots."""
  expected = single_device_logits(config)
  devices = jax.devices()[:math.prod(mesh_shape)]
  plan = sharding.ShardingPlan(config, sharding.make_mesh(*mesh_shape, devices=devices), mode)
  params = plan.shard_params(flat_params(config))
  for name, leaf in manifest.flatten(params).items():  # each leaf lies as the table says
    assert jax.tree.map(lambda a: a.sharding.spec, leaf) == plan.leaf_spec(name, leaf), name

  logits = model.forward(params, multiprocess_worker.tokens(config), config, dtype=jnp.float32,
                         token_valid=real_tokens(config), sharding=plan).logits
  assert helpers.relative_error(sharding.fetch(logits), expected) < TOLERANCE

  # Token by token through the cache: the same logits wherever the query is a
  # real token (a pad query with no real key before it attends to whatever is
  # unmasked, which differs between a cache and a full pass).
  real = real_tokens(config)
  decoded = decode_one_token_at_a_time(params, config, plan)
  assert helpers.relative_error(decoded[real], expected[real]) < TOLERANCE


@pytest.mark.parametrize("config, mesh_shape", [(SHARDED, (2, 4)), (SHARDED, (1, 8)),
                                                (TINY, (1, 3))])
def test_sharded_attention_reads_one_layer_of_the_whole_cache(config, mesh_shape):
  """sharded_ops.attend on [L, B, S, K, d] with a traced `layer` equals attention.attend on
  that layer's [B, S, K, d] (1024 slots, so the chunked reading runs too)."""
  plan = sharding.ShardingPlan(config, sharding.make_mesh(
      *mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)]))
  rng = np.random.default_rng(0)
  batch, num_new, slots, layers = 4, 3, 1024, 2
  q = rng.normal(size=(batch, num_new, config.num_q_heads, config.key_size)).astype(np.float32)
  keys, values = rng.normal(size=(2, layers, batch, slots, config.num_kv_heads,
                                  config.key_size)).astype(np.float32)
  mask = rng.random((batch, num_new, slots)) < 0.02
  mask[:, :, slots // 2:] = False  # the second half of the cache is empty
  expected = attention.attend(q, keys[1], values[1], mask, config)
  got = jax.jit(lambda q, keys, values, mask, layer: sharded_ops.attend(
      q, keys, values, mask, config, plan, layer=layer))(q, keys, values, mask, jnp.int32(1))
  assert helpers.relative_error(got, expected) < TOLERANCE


def test_row_split_weights_whose_scale_blocks_straddle_the_shards():
  """TINY on 3 devices: attention/linear (48 rows, 8 blocks of 6) and moe/linear_1 (72 rows,
  8 blocks of 9) split into 16 and 24 rows a device, so blocks straddle shards and every
  device keeps all 8 scale rows and picks its own."""
  config = TINY
  plan = sharding.ShardingPlan(config, sharding.make_mesh(1, 3, devices=jax.devices()[:3]))
  stacked = param_table.flatten(param_table.stack_release(flat_params(config), config))
  placed = param_table.flatten(plan.shard_params(stacked))
  layer = jnp.int32(1)
  path = param_table.ATTENTION_OUT.path
  assert plan.leaf_spec(path, stacked[path]).scales == P(None, None, None)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 5, config.q_size)), jnp.float32)
  got = jax.jit(lambda x, w, layer: sharded_ops.matmul(x, w, param_table.ATTENTION_OUT, plan,
                                                       layer))(x, placed[path], layer)
  assert helpers.relative_error(got, quant.matmul(x, stacked[path], index=1)) < TOLERANCE

  experts = (param_table.EXPERT_IN, param_table.EXPERT_GATE, param_table.EXPERT_OUT)
  tokens = jnp.asarray(rng.normal(size=(20, config.emb_size)), jnp.float32)
  gates, indices = moe.route(tokens, stacked[param_table.ROUTER.path][1],
                             config.num_selected_experts)
  got = jax.jit(lambda *args: sharded_ops.sparse_moe(*args[:6], experts, plan, layer=args[6]))(
      tokens, gates, indices, *(placed[p.path] for p in experts), layer)
  expected = jax.jit(lambda *args: moe.sparse_moe(*args[:6], layer=args[6]))(
      tokens, gates, indices, *(stacked[p.path] for p in experts), layer)
  assert helpers.relative_error(got, expected) < TOLERANCE


def test_checkpoint_loads_into_shards_and_model_api_runs_on_the_mesh(tmp_path):
  """A checkpoint loads layer by layer straight into the stacked, sharded arrays, and the
  Model API on the mesh gives the single-device logits and greedy tokens."""
  config = SHARDED
  checkpoint.save_checkpoint(manifest.unflatten(flat_params(config)), tmp_path, config,
                             progress=False)
  mesh = sharding.make_mesh(2, 4)
  grok = grok_moe.Model.from_checkpoint(tmp_path, mesh=mesh, moe_sharding="tensor",
                                        dtype="float32", progress=False)
  plan = grok.sharding
  assert plan == sharding.ShardingPlan(config, mesh, "tensor")
  expected_shardings = manifest.flatten(plan.param_shardings(grok.params))
  for name, leaf in manifest.flatten(grok.params).items():  # loaded straight into the shards
    assert jax.tree.map(lambda a: a.sharding, leaf) == expected_shardings[name], name

  tokens = multiprocess_worker.tokens(config)
  expected = model.forward(manifest.unflatten(flat_params(config)), tokens, config,
                           dtype=jnp.float32).logits  # Model.logits: every token is real
  assert helpers.relative_error(grok.logits(tokens), np.asarray(expected)) < TOLERANCE
  # One new token: the prefill (the two-process test decodes further).
  generated = grok.generate_tokens(PROMPTS, max_new_tokens=1, temperature=0)
  assert generated == single_device_generation(config)[:, :1].tolist()


# --- Grok-1 without weights: the plan and the lowered program agree. ---

def test_grok_1_memory_plan_fits_eight_80_gb_devices_with_a_full_cache():
  """The analytic plan: the release's bytes divided over 8 devices (the replicated norms
  and router whole), the KV cache split by heads; 40 GB a device fits 80 GB, 2x4 not."""
  plan = memory.memory_plan(GROK_1, (1, 8), batch_size=1, cache_len=8192)
  release_bytes = sum(
      math.prod(s.shape) * s.dtype.itemsize
      for s in jax.tree.leaves(memory.release_abstract_params(GROK_1)))
  replicated = plan.weight_bytes["norms and router"]
  assert plan.weights_total == pytest.approx((release_bytes - replicated) / 8 + replicated,
                                             rel=1e-9)
  assert plan.cache_bytes == (grok_moe.kv_cache.cache_bytes(GROK_1, 1, 8192) // 8
                              + 8192 + 4)  # keys/values split by KV head; valid, lengths copied
  assert 39e9 < plan.total < 41e9 and plan.fits(80e9)
  assert "fits 8 x 80 GB" in plan.format()
  # 2x4 holds two copies of the model, each on 4 devices: 80.1 GB a device.
  assert not memory.memory_plan(GROK_1, (2, 4), cache_len=8192).fits(80e9)


def test_grok_1_sharded_forward_lowers_with_the_planned_shards():
  """GROK_1 with 2 of its 64 layers (the full model lowers too, in ~10 s; see the report),
  lowered and compiled for a 1x8 mesh from shapes alone, with an 8192-token cache."""
  config = GROK_1.replace(num_layers=2)
  plan = sharding.ShardingPlan(config, sharding.make_mesh(1, 8), "tensor")
  planned = memory.memory_plan(config, (1, 8), batch_size=1, cache_len=8192)
  compiled = memory.lower_forward(plan, batch_size=1, num_tokens=4, cache_len=8192).compile()
  params_in = compiled.input_shardings[0][0]
  abstract = manifest.flatten(memory.release_abstract_params(config))
  for name, shardings in manifest.flatten(params_in).items():
    shapes = jax.tree.map(lambda s, sh: sh.shard_shape(s.shape), abstract[name], shardings)
    assert shapes == planned.shard_shapes[name], name
  # XLA's own count of the bytes each device gets: the plan's, plus the [1, 4] int32
  # tokens and their [1, 4] bool validity.
  assert compiled.memory_analysis().argument_size_in_bytes == planned.total + 4 * 4 + 4


def test_run_py_prints_the_plan_without_loading_weights():
  result = subprocess.run([sys.executable, str(REPO / "run.py"), "--plan", "--config", "grok-1",
                           "--mesh", "1x8"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr
  assert "1x8 mesh" in result.stdout and "fits 8 x 80 GB" in result.stdout
  assert "8192 tokens" in result.stdout


# --- Two processes on this host, 4 devices each. ---

def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_give_the_single_process_results(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  port = _free_port()
  workers = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(port),
                               str(process_id), str(tmp_path)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for process_id in (0, 1)]
  outputs = []
  deadline = time.monotonic() + 240
  try:
    for worker in workers:
      output, _ = worker.communicate(timeout=max(1, deadline - time.monotonic()))
      outputs.append(output)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]

  logits = np.load(tmp_path / "logits.npy")
  assert helpers.relative_error(logits, single_device_logits(SHARDED)) < TOLERANCE
  np.testing.assert_array_equal(np.load(tmp_path / "generated.npy"),
                                single_device_generation(SHARDED))

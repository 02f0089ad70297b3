"""Bytes per device without loading anything: the memory plan, from the parameter table.

`memory_plan` counts the weights (as the release stores them) and the KV
cache each device holds on a mesh, from the same table and rules the loader
places by. `lower_forward` lowers the model from shapes alone, so XLA can
compile it and report its own per-device memory (`grok_moe.compiled_plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from grok_moe import model
from grok_moe import params as param_table
from grok_moe.config import PRESETS, ModelConfig
from grok_moe.kv_cache import init_cache
from grok_moe.sharding import AXES, DATA, MODEL, ShardingPlan

GB = 1e9


def release_abstract_params(config: ModelConfig, plan: ShardingPlan | None = None):
  """The stacked parameter tree as the release stores its tensors, as ShapeDtypeStructs
  (int8 + bfloat16 scales, float32 embeddings, norms and router), with the plan's
  shardings when given."""
  params = param_table.abstract_params(config, "release")
  if plan is None:
    return params
  flat = {}
  for name, leaf in param_table.flatten(params).items():
    flat[name] = jax.tree.map(
        lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=plan.sharding(spec)),
        leaf, plan.leaf_spec(name, leaf))
  return param_table.unflatten(flat)


def shard_shape(shape, spec: P, mesh) -> tuple[int, ...]:
  """The shape one device holds of an array of `shape` placed by `spec` on `mesh`."""
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  out = []
  for size, axes in zip(shape, entries):
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None:
        size //= mesh.shape[axis]
    out.append(size)
  return tuple(out)


def config_name(config: ModelConfig) -> str:
  """The preset's name, or a description of a custom config by its size."""
  for name, preset in PRESETS.items():
    if preset == config:
      return name
  count = param_table.parameter_count(config)
  size = f"{count / 1e9:.1f} B" if count >= 1e8 else f"{count / 1e6:.1f} M"
  return f"a custom config of {size} parameters"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes one device holds for a config on a mesh, without loading anything.

  Weights as the release stores them (int8 with bfloat16 scales; float32
  embeddings, norms and router); the KV cache in `cache_dtype`. Every device
  holds the same amount (the rules split evenly).
  """

  config: ModelConfig
  mesh_shape: tuple[int, int]
  moe_mode: str
  batch_size: int
  cache_len: int
  cache_dtype: str
  weight_bytes: dict[str, int]               # per device, by table group
  cache_bytes: int                           # per device: keys, values, valid, lengths
  shard_shapes: dict[str, Any]               # in-memory name -> per-device shape(s)
  batch_split: bool
  kv_heads_split: bool
  expert_working_bytes: int                  # one expert's weights dequantized (bfloat16)

  @property
  def weights_total(self) -> int:
    return sum(self.weight_bytes.values())

  @property
  def total(self) -> int:
    return self.weights_total + self.cache_bytes

  def fits(self, device_bytes: float) -> bool:
    return self.total <= device_bytes

  def format(self, device_bytes: float = 80 * GB) -> str:
    data, model_size = self.mesh_shape
    c = self.config
    name = config_name(c)
    params = param_table.parameter_count(c)
    lines = [
        f"memory plan: {name} ({params / 1e9:.1f} B parameters, {c.num_layers} layers) on a "
        f"{data}x{model_size} mesh (data x model) of {data * model_size} devices, "
        f"MoE sharding: {self.moe_mode}",
        f"batch {self.batch_size} (split over data: {'yes' if self.batch_split else 'no'}), "
        f"KV cache {self.cache_len} tokens in {self.cache_dtype} (KV heads split over model: "
        f"{'yes' if self.kv_heads_split else 'no, copied'})",
        "per device (GB = 1e9 bytes):",
    ]
    for group, size in self.weight_bytes.items():
      lines.append(f"  {group:<22}{size / GB:10.3f} GB")
    lines += [
        f"  {'weights':<22}{self.weights_total / GB:10.3f} GB  (int8 + bfloat16 scales; "
        "float32 embeddings, norms, router)",
        f"  {'KV cache':<22}{self.cache_bytes / GB:10.3f} GB",
        f"  {'total':<22}{self.total / GB:10.3f} GB",
    ]
    left = device_bytes - self.total
    verdict = (f"fits {data * model_size} x {device_bytes / GB:g} GB: {left / GB:.1f} GB per "
               "device left for activations and XLA's buffers" if left >= 0 else
               f"does NOT fit {data * model_size} x {device_bytes / GB:g} GB: "
               f"{-left / GB:.1f} GB per device over")
    lines += [
        verdict,
        f"not counted: activations, logits, and the working copy of the expert weights "
        f"being used (one expert dequantized to bfloat16: {self.expert_working_bytes / GB:.3f} GB)",
    ]
    return "\n".join(lines)


def mesh_shape_of(mesh_shape) -> tuple[int, int]:
  if isinstance(mesh_shape, (Mesh, AbstractMesh)):
    return mesh_shape.shape[DATA], mesh_shape.shape[MODEL]
  data, model_size = mesh_shape
  return data, model_size


def memory_plan(config: ModelConfig, mesh_shape, batch_size: int = 1,
                cache_len: int | None = None, moe_mode: str = "tensor",
                cache_dtype=jnp.bfloat16) -> MemoryPlan:
  """Per-device bytes of the weights and the KV cache (see MemoryPlan), from shapes alone.

  `mesh_shape` is (data, model) or a mesh. Uses the same table and rules as
  the loader, so the numbers are what loading puts on each device.
  """
  data, model_size = mesh_shape_of(mesh_shape)
  cache_len = cache_len or config.sequence_len
  plan = ShardingPlan(config, AbstractMesh((data, model_size), AXES), moe_mode)
  weight_bytes = {group: 0 for group in param_table.GROUPS}
  shard_shapes = {}
  is_shape = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
  for name, leaf in param_table.flatten(release_abstract_params(config)).items():
    shapes = jax.tree.map(lambda s, spec: shard_shape(s.shape, spec, plan.mesh),
                          leaf, plan.leaf_spec(name, leaf), is_leaf=is_shape)
    shard_shapes[name] = shapes
    sizes = jax.tree.map(lambda s, shape: math.prod(shape) * s.dtype.itemsize, leaf, shapes,
                         is_leaf=is_shape)
    weight_bytes[param_table.BY_PATH[name].group] += sum(jax.tree.leaves(sizes))
  cache_shapes = jax.eval_shape(functools.partial(init_cache, config, batch_size, cache_len,
                                                  cache_dtype))
  cache_sizes = jax.tree.map(
      lambda s, spec: math.prod(shard_shape(s.shape, spec, plan.mesh)) * s.dtype.itemsize,
      cache_shapes, plan.cache_specs(batch_size))
  local_ffn = config.ffn_size // (model_size if moe_mode == "tensor" else 1)
  return MemoryPlan(
      config=config, mesh_shape=(data, model_size), moe_mode=moe_mode, batch_size=batch_size,
      cache_len=cache_len, cache_dtype=jnp.dtype(cache_dtype).name, weight_bytes=weight_bytes,
      cache_bytes=sum(jax.tree.leaves(cache_sizes)), shard_shapes=shard_shapes,
      batch_split=plan.batch_axis(batch_size) is not None,
      kv_heads_split=plan.kv_heads_sharded,
      expert_working_bytes=3 * config.emb_size * local_ffn * 2)


def abstract_cache(plan: ShardingPlan, batch_size: int, cache_len: int, dtype):
  """The KV cache as ShapeDtypeStructs in the plan's shardings."""
  shapes = jax.eval_shape(functools.partial(init_cache, plan.config, batch_size, cache_len,
                                            dtype))
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                               sharding=sharding),
                      shapes, plan.cache_shardings(batch_size))


def lower_forward(plan: ShardingPlan, batch_size: int, num_tokens: int,
                  cache_len: int | None = None, dtype=jnp.bfloat16):
  """jit(model.forward).lower(...) from shapes alone: checks that a config runs on a mesh
  (and lets XLA report its memory) without any weights. With `cache_len`, the
  forward pass writes a KV cache of that length."""
  config = plan.config
  params = release_abstract_params(config, plan)
  batch = plan.sharding(P(plan.batch_axis(batch_size), None))
  tokens = jax.ShapeDtypeStruct((batch_size, num_tokens), jnp.int32, sharding=batch)
  token_valid = jax.ShapeDtypeStruct((batch_size, num_tokens), bool, sharding=batch)
  cache = None if cache_len is None else abstract_cache(plan, batch_size, cache_len, dtype)

  def run(params, tokens, token_valid, cache):
    return model.apply(params, tokens, token_valid, None, cache, None, config=config,
                       dtype=dtype, return_routing=False, sharding=plan)

  return jax.jit(run).lower(params, tokens, token_valid, cache)

"""One model on many devices: the mesh, the logical-axis rules, and placement.

A 2-D mesh of devices with the axes "data" and "model":

    data    splits the batch (rows of tokens, the KV cache's rows);
    model   splits the attention heads, the vocabulary, and the experts: in
            "tensor" mode each expert's hidden width F (every device holds a
            slice of every expert), in "expert" mode the experts themselves
            (every device holds E/n whole experts).

Every tensor's logical axes come from the parameter table (`grok_moe.params`);
`AXIS_RULES` maps each logical axis to a mesh axis, per MoE mode, and says
what happens when the mesh axis does not divide it (an error, or the tensor
is copied instead). `ShardingPlan` resolves the rules for one config on one
mesh: the PartitionSpec of every weight, of the KV cache and of the batch.
It is data: the model reads specs from it (`grok_moe.sharded_ops` runs the
shard_map kernels), and nothing here calls the model.

Axis letters as in grok_moe.model; n is the size of the "model" axis, m of "data".
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from grok_moe import params as param_table
from grok_moe import quant
from grok_moe.config import ModelConfig
from grok_moe.errors import ConfigError, MeshError
from grok_moe.kv_cache import KVCache, init_cache
from grok_moe.params import DENSE_FFN, EXPERTS, FFN, KV_HEADS, Q_HEADS, SHARED_FFN, VOCAB

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)
MOE_MODES = ("tensor", "expert")


# --- The mesh. ---

def _ordered_devices(devices) -> list:
  """Devices grouped by host (process), so a model axis within one host stays on it."""
  return sorted(devices, key=lambda device: (device.process_index, device.id))


def make_mesh(data: int | None = None, model: int | None = None, *, devices=None) -> Mesh:
  """A ("data", "model") mesh of `devices` (default: all devices, on every host).

  Give either size and the other is the device count divided by it; give
  neither for 1 x count (everything on the model axis). The product must be
  the device count. On one host jax.make_mesh orders the devices for the
  interconnect; across hosts the model axis runs over consecutive devices of
  a host and the data axis across hosts.

  Example:
    >>> mesh = make_mesh(2, 4)          # 8 devices: batch in 2, model in 4
  """
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  for axis, size in ((DATA, data), (MODEL, model)):
    if size is not None and (not isinstance(size, int) or size < 1):
      raise MeshError(f"the {axis} axis size must be a positive integer, got {size!r}")
  if data is None and model is None:
    data, model = 1, count
  elif data is None or model is None:
    given = data if model is None else model
    if count % given:
      raise MeshError(f"{count} devices do not split into groups of {given}; "
                      f"choose a size dividing {count}")
    data, model = (data, count // data) if model is None else (count // model, model)
  if data * model != count:
    shapes = ", ".join(f"{d}x{count // d}" for d in range(1, count + 1) if count % d == 0)
    raise MeshError(f"a {data}x{model} mesh needs {data * model} devices, but there are "
                    f"{count}; use DATAxMODEL with product {count}: {shapes}")
  axis_types = (AxisType.Auto, AxisType.Auto)
  if len({device.process_index for device in devices}) > 1:
    grid = np.array(_ordered_devices(devices), dtype=object).reshape(data, model)
    return Mesh(grid, AXES, axis_types=axis_types)
  return jax.make_mesh((data, model), AXES, axis_types=axis_types, devices=devices)


def parse_mesh(text: str) -> tuple[int, int]:
  """'2x4' -> (2, 4): DATAxMODEL as run.py's --mesh takes it."""
  match = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", text)
  if not match or 0 in (int(match[1]), int(match[2])):
    raise MeshError(f"--mesh must be DATAxMODEL with positive sizes, like 1x8 or 2x4; "
                    f"got {text!r}")
  return int(match[1]), int(match[2])


# --- The logical-axis rules. ---

REPLICATE = "replicate"
ERROR = "error"


@dataclasses.dataclass(frozen=True)
class AxisRule:
  """Logical axis `axis` is split over mesh axis `mesh_axis`; `unit` names the config
  field counting its pieces (heads, experts, hidden units, vocabulary entries). A
  mesh axis that does not divide the unit is an error, or, where `indivisible` is
  REPLICATE, the axis is not split and the tensor is copied instead."""

  axis: str
  mesh_axis: str
  unit: str
  indivisible: str = ERROR


_SHARED_RULES = (
    # vocabulary-parallel embeddings [V, D]: lookup and logits split over V
    AxisRule(VOCAB, MODEL, "vocab_size", REPLICATE),
    # attention split by heads: query, key, value by columns, the output by rows
    AxisRule(Q_HEADS, MODEL, "num_q_heads"),
    AxisRule(KV_HEADS, MODEL, "num_kv_heads", REPLICATE),
    # a shared expert's hidden units, as the routed experts' in tensor mode
    AxisRule(SHARED_FFN, MODEL, "shared_expert_ffn_size", REPLICATE),
    # Grok-2's dense MLP: hidden units split, its output summed over the model axis
    AxisRule(DENSE_FFN, MODEL, "dense_ffn_size", REPLICATE),
)

AXIS_RULES: dict[str, tuple[AxisRule, ...]] = {
    # each expert's hidden units F split over the model axis; partial outputs summed
    "tensor": _SHARED_RULES + (AxisRule(FFN, MODEL, "ffn_size"),),
    # whole experts split over the model axis
    "expert": _SHARED_RULES + (AxisRule(EXPERTS, MODEL, "num_experts"),),
}


def _is_tracer(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def put_array(value, sharding: NamedSharding):
  """`value` (numpy or jax) as a global array with `sharding`, only its local shards copied."""
  if _is_tracer(value):
    return jax.lax.with_sharding_constraint(value, sharding)
  if isinstance(value, jax.Array):
    if value.sharding == sharding:
      return value
    if not value.is_fully_addressable or sharding.is_fully_addressable:
      return jax.device_put(value, sharding)  # a reshard within the devices it spans
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """How one model config runs on one mesh: the logical axes resolved to mesh axes.

  Hashable, so it is a static argument of the jitted forward pass. `mesh`
  may be an AbstractMesh (shapes only) for planning and lowering.

  Example:
    >>> plan = ShardingPlan(GROK_1, make_mesh(1, 8), moe_mode="tensor")
    >>> params = plan.shard_params(params)      # or load_checkpoint(..., sharding=plan)
    >>> out = grok_moe.forward(params, tokens, GROK_1, sharding=plan)
  """

  config: ModelConfig
  mesh: Mesh | AbstractMesh
  moe_mode: str = "tensor"

  def __post_init__(self):
    if self.moe_mode not in MOE_MODES:
      raise MeshError(f"moe_mode must be one of {MOE_MODES}, got {self.moe_mode!r}")
    if tuple(self.mesh.axis_names) != AXES:
      raise MeshError(f"the mesh must have the axes {AXES} (grok_moe.make_mesh builds one), "
                      f"got {tuple(self.mesh.axis_names)}")
    self.axis_map  # raises MeshError for a config the mesh cannot split

  def check_config(self, config: ModelConfig) -> None:
    """Raises ConfigError unless this plan was made for `config`."""
    if config != self.config:
      raise ConfigError("the sharding plan was made for another config; build it with "
                        "ShardingPlan(config, mesh) for this one")

  # --- Sizes. ---

  @property
  def data_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def model_size(self) -> int:
    return self.mesh.shape[MODEL]

  @property
  def kv_heads_sharded(self) -> bool:
    """Whether the KV heads (and the cache) are split over the model axis, or copied."""
    return self.mesh_axis(KV_HEADS) is not None

  def batch_axis(self, batch_size: int) -> str | None:
    """The mesh axis of a batch of this many rows: data, or none if it does not divide."""
    return DATA if self.data_size > 1 and batch_size % self.data_size == 0 else None

  # --- The rules, resolved. ---

  @functools.cached_property
  def axis_map(self) -> dict[str, str | None]:
    """{logical axis: mesh axis or None} for this config and mesh."""
    resolved = {}
    for rule in AXIS_RULES[self.moe_mode]:
      size = self.mesh.shape[rule.mesh_axis]
      units = getattr(self.config, rule.unit)
      if size == 1 or units % size == 0:
        resolved[rule.axis] = rule.mesh_axis if size > 1 else None
      elif rule.indivisible == REPLICATE:
        resolved[rule.axis] = None
      else:
        other = " or the other MoE mode" if rule.axis in (FFN, EXPERTS) else ""
        raise MeshError(
            f"{rule.unit} = {units} does not split over the {rule.mesh_axis} axis of size "
            f"{size} (mesh {self.data_size}x{self.model_size}, moe mode {self.moe_mode}); "
            f"choose a {rule.mesh_axis} axis size dividing {units}{other}")
    return resolved

  def mesh_axis(self, logical_axis: str | None) -> str | None:
    return self.axis_map.get(logical_axis) if logical_axis is not None else None

  def spec(self, logical_axes) -> P:
    """The PartitionSpec of an array with these logical axes."""
    return P(*(self.mesh_axis(axis) for axis in logical_axes))

  def weight_spec(self, name: str) -> P:
    """The PartitionSpec of the weight (not its scales) of the tensor `name`: a release
    name gives one layer's spec, an in-memory (stacked) name the [L, ...] spec."""
    spec = param_table.BY_PATH.get(name)
    if spec is not None:
      return self.spec(spec.stored_axes())
    try:
      spec, _ = param_table.spec_for_release_name(name)
    except KeyError:
      raise MeshError(f"no parameter is named {name}") from None
    return self.spec(spec.axes)

  def leaf_spec(self, name: str, leaf):
    """Spec of a parameter leaf: a P, or a QuantizedWeight of specs for weight and scales.

    Scales [..., R, N] follow the weight's leading axes and N. Their row
    blocks R follow the weight's rows K when those are split n ways and n
    divides R; otherwise every device keeps all R rows and uses those of its
    own rows (`sharded_ops.local_scales`).
    """
    spec = self.weight_spec(name)
    if not isinstance(leaf, quant.QuantizedWeight):
      return spec
    return quant.QuantizedWeight(weight=spec, scales=self.scales_spec(spec, leaf.scales.shape[-2]))

  def scales_spec(self, weight_spec: P, row_blocks: int) -> P:
    *lead, rows_axis, cols_axis = tuple(weight_spec)
    if rows_axis is not None and row_blocks % self.mesh.shape[rows_axis]:
      rows_axis = None
    return P(*lead, rows_axis, cols_axis)

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def param_shardings(self, params):
    """NamedShardings for a parameter tree (arrays, numpy, or ShapeDtypeStructs)."""
    flat = {name: jax.tree.map(self.sharding, self.leaf_spec(name, leaf))
            for name, leaf in param_table.flatten(params).items()}
    return param_table.unflatten(flat)

  def place(self, name: str, leaf):
    """Puts one parameter straight into its shards: only the parts of the host array
    each local device holds are copied."""
    shardings = jax.tree.map(self.sharding, self.leaf_spec(name, leaf))
    return jax.block_until_ready(jax.tree.map(put_array, leaf, shardings))

  def shard_params(self, params):
    """Stacked params (or release-named ones, stacked first) placed by the rules; leaves
    already placed are kept."""
    flat = {name: self.place(name, leaf) for name, leaf in
            param_table.flatten(param_table.as_stacked(params, self.config)).items()}
    return param_table.unflatten(flat)

  # --- The KV cache and small inputs. ---

  def cache_specs(self, batch_size: int) -> KVCache:
    """Cache rows over data (when they divide), KV heads over model (when they divide)."""
    rows = self.batch_axis(batch_size)
    heads = self.mesh_axis(KV_HEADS)
    return KVCache(keys=P(None, rows, None, heads, None), values=P(None, rows, None, heads, None),
                   valid=P(rows, None), lengths=P(rows))

  def cache_shardings(self, batch_size: int) -> KVCache:
    return jax.tree.map(self.sharding, self.cache_specs(batch_size))

  def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache created directly in its shards."""
    return _cache_maker(self, batch_size, max_len, jnp.dtype(dtype).name)()

  def shard_cache(self, cache: KVCache) -> KVCache:
    return jax.tree.map(put_array, cache, self.cache_shardings(cache.batch_size))

  def put(self, tree, spec: P = P()):
    """Host values (the same on every process) as global arrays, replicated by default."""
    return jax.tree.map(lambda value: put_array(value, self.sharding(spec)), tree)

  def put_batch(self, value):
    """An array whose leading axis is the batch, split over data when it divides."""
    value = value if isinstance(value, jax.Array) else np.asarray(value)
    spec = P(self.batch_axis(value.shape[0]), *([None] * (value.ndim - 1)))
    return self.put(value, spec)

  def constrain(self, x, logical_axes):
    """Inside jit: `x` laid out by its logical axes ("batch" is the data axis when it divides)."""
    entries = [self.batch_axis(x.shape[0]) if axis == "batch" else self.mesh_axis(axis)
               for axis in logical_axes]
    return jax.lax.with_sharding_constraint(x, self.sharding(P(*entries)))

  def replicated(self, tree):
    """Inside jit: `tree` copied to every device, so any process can read it."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.sharding(P())), tree)


@functools.lru_cache(maxsize=None)
def _cache_maker(plan: ShardingPlan, batch_size: int, max_len: int | None, dtype_name: str):
  """A jitted function that builds an empty cache in the plan's shards (compiled once)."""
  make = functools.partial(init_cache, plan.config, batch_size, max_len, dtype_name)
  return jax.jit(make, out_shardings=plan.cache_shardings(batch_size))


def fetch(array) -> np.ndarray:
  """An array as numpy on this process, gathered from every host when it spans several."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


__all__ = ["AXIS_RULES", "DATA", "MODEL", "MOE_MODES", "AxisRule", "ShardingPlan", "fetch",
           "make_mesh", "parse_mesh"]

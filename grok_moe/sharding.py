"""One model on many devices: the mesh, the partition table, shard_map dispatch, the memory plan.

A 2-D mesh of devices with the axes "data" and "model":

    data    splits the batch (rows of tokens, the KV cache's rows);
    model   splits the attention heads, the vocabulary, and the experts: in
            "tensor" mode each expert's hidden width F (every device holds a
            slice of every expert), in "expert" mode the experts themselves
            (every device holds E/n whole experts).

`PARTITION_RULES` is the one table from parameter name to `PartitionSpec`; the
parameters, the loader (`ShardingPlan.place`), the KV cache and the memory
plan all read it. The int8 matmuls, the attention core and the mixture of
experts run under `jax.shard_map` with explicit specs (`ShardingPlan.matmul`,
`.attend`, `.sparse_moe`, which grok_moe.model calls when it is given a plan);
the glue between them (embedding lookup, RoPE, norms, routing, cache writes,
logits) is left to XLA's partitioner under `jit`. Every device computes
exactly what one device would, so the logits equal the single-device ones up
to float rounding of the summation order.

Axis letters as in grok_moe.model; n is the size of the "model" axis, m of "data".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from grok_moe import manifest, model, moe, quant
from grok_moe.config import ModelConfig
from grok_moe.errors import ConfigError, MeshError
from grok_moe.kv_cache import KVCache, init_cache

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


# --- The partition table. ---

REPLICATE = "replicate"
ERROR = "error"


@dataclasses.dataclass(frozen=True)
class Rule:
  """Parameters whose release name matches `pattern` are placed by `spec`.

  `unit` names the config field counting the pieces the sharded axis may be
  cut into (heads, experts, hidden units, vocabulary entries): a mesh axis
  that does not divide it is an error, or, where `indivisible` is
  "replicate", that axis is dropped and the parameter copied instead.
  """

  pattern: str
  spec: P
  unit: str | None = None
  indivisible: str = ERROR


_SHARED_RULES = (
    # vocabulary-parallel embeddings [V, D]: lookup and logits split over V
    Rule(r"in_out_embed/embeddings$", P(MODEL, None), "vocab_size", REPLICATE),
    Rule(r"rms_norm(_\d+)?/scale$", P(None)),                                       # [D]
    Rule(r"router/w$", P(None, None)),                                              # [D, E]
    # attention: query/key/value split by heads (columns), the output by heads (rows)
    Rule(r"multi_head_attention/query/w$", P(None, MODEL), "num_q_heads"),           # [D, H*d]
    Rule(r"multi_head_attention/(key|value)/w$", P(None, MODEL), "num_kv_heads",     # [D, K*d]
         REPLICATE),
    Rule(r"multi_head_attention/linear/w$", P(MODEL, None), "num_q_heads"),          # [H*d, D]
)

PARTITION_RULES: dict[str, tuple[Rule, ...]] = {
    # each expert's hidden units F split over the model axis; partial outputs summed
    "tensor": _SHARED_RULES + (
        Rule(r"moe/linear(_v)?/w$", P(None, None, MODEL), "ffn_size"),               # [E, D, F]
        Rule(r"moe/linear_1/w$", P(None, MODEL, None), "ffn_size"),                  # [E, F, D]
    ),
    # whole experts split over the model axis
    "expert": _SHARED_RULES + (
        Rule(r"moe/linear(_v|_1)?/w$", P(MODEL, None, None), "num_experts"),        # [E, ., .]
    ),
}


def _is_tracer(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def _put(value, sharding: NamedSharding):
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
  """How one model config runs on one mesh: the parameter specs and the sharded dispatch.

  Hashable, so it is a static argument of the jitted forward pass. `mesh`
  may be an AbstractMesh (shapes only) for planning and lowering.

  Example:
    >>> plan = ShardingPlan(GROK_1, make_mesh(1, 8), moe_mode="tensor")
    >>> params = plan.shard_params(params)      # or load_checkpoint(..., place=plan.place)
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
    for name in manifest.parameter_shapes(self.config.replace(num_layers=1)):
      self.weight_spec(name)  # raises MeshError for a config the mesh cannot split

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
    return self.weight_spec("multi_head_attention/key/w")[1] == MODEL

  def batch_axis(self, batch_size: int) -> str | None:
    """The mesh axis of a batch of this many rows: data, or none if it does not divide."""
    return DATA if self.data_size > 1 and batch_size % self.data_size == 0 else None

  # --- The table, resolved. ---

  @functools.lru_cache(maxsize=None)
  def _rule_spec(self, generic_name: str) -> P:
    for rule in PARTITION_RULES[self.moe_mode]:
      if re.search(rule.pattern, generic_name):
        break
    else:
      raise MeshError(f"no partition rule matches the parameter {generic_name}")
    entries = list(rule.spec)
    for position, axis in enumerate(entries):
      size = self.mesh.shape[axis] if axis is not None else 1
      if size == 1:
        continue
      units = getattr(self.config, rule.unit)
      if units % size == 0:
        continue
      if rule.indivisible == REPLICATE:
        entries[position] = None
        continue
      raise MeshError(
          f"{generic_name}: {rule.unit} = {units} does not split over the {axis} axis of "
          f"size {size} (mesh {self.data_size}x{self.model_size}, moe mode "
          f"{self.moe_mode}); choose a {axis} axis size dividing {units}"
          + (" or the other moe mode" if "moe/" in generic_name else ""))
    return P(*entries)

  def weight_spec(self, name: str) -> P:
    """The PartitionSpec of the weight (not its scales) of the parameter `name`."""
    return self._rule_spec(re.sub(r"^transformer/decoder_layer_\d+/", "", name))

  def leaf_spec(self, name: str, leaf):
    """Spec of a parameter leaf: a P, or a QuantizedWeight of specs for weight and scales.

    Scales [..., R, N] follow the weight's leading axes and N. Their row
    blocks R follow the weight's rows K when those are split n ways and n
    divides R; otherwise every device keeps all R rows and uses those of its
    own rows (`_local_scales`).
    """
    spec = self.weight_spec(name)
    if not isinstance(leaf, quant.QuantizedWeight):
      return spec
    *lead, rows_axis, cols_axis = tuple(spec)
    blocks = leaf.scales.shape[-2]
    if rows_axis is not None and blocks % self.mesh.shape[rows_axis]:
      rows_axis = None
    return quant.QuantizedWeight(weight=spec, scales=P(*lead, rows_axis, cols_axis))

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def param_shardings(self, params):
    """NamedShardings for a parameter tree (arrays, numpy, or ShapeDtypeStructs)."""
    flat = {name: jax.tree.map(self.sharding, self.leaf_spec(name, leaf))
            for name, leaf in manifest.flatten(_nested(params)).items()}
    return manifest.unflatten(flat)

  def place(self, name: str, leaf):
    """Puts one parameter straight into its shards: the `place` of checkpoint.load_checkpoint.

    Only the parts of the host array each local device holds are copied.
    """
    shardings = jax.tree.map(self.sharding, self.leaf_spec(name, leaf))
    return jax.block_until_ready(jax.tree.map(_put, leaf, shardings))

  def shard_params(self, params):
    """Params (Haiku tree or flat {name: leaf}) placed by the table; placed leaves are kept."""
    flat = {name: self.place(name, leaf)
            for name, leaf in manifest.flatten(_nested(params)).items()}
    return manifest.unflatten(flat)

  # --- The KV cache and small inputs. ---

  def cache_specs(self, batch_size: int) -> KVCache:
    """Cache rows over data (when they divide), KV heads over model (when they divide)."""
    rows = self.batch_axis(batch_size)
    heads = MODEL if self.kv_heads_sharded else None
    return KVCache(keys=P(None, rows, None, heads, None), values=P(None, rows, None, heads, None),
                   valid=P(rows, None), lengths=P(rows))

  def cache_shardings(self, batch_size: int) -> KVCache:
    return jax.tree.map(self.sharding, self.cache_specs(batch_size))

  def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache created directly in its shards."""
    return _cache_maker(self, batch_size, max_len, jnp.dtype(dtype).name)()

  def shard_cache(self, cache: KVCache) -> KVCache:
    return jax.tree.map(_put, cache, self.cache_shardings(cache.batch_size))

  def put(self, tree, spec: P = P()):
    """Host values (the same on every process) as global arrays, replicated by default."""
    return jax.tree.map(lambda value: _put(value, self.sharding(spec)), tree)

  def put_batch(self, value):
    """An array whose leading axis is the batch, split over data when it divides."""
    value = value if isinstance(value, jax.Array) else np.asarray(value)
    spec = P(self.batch_axis(value.shape[0]), *([None] * (value.ndim - 1)))
    return self.put(value, spec)

  def put_inputs(self, params, tokens, positions, cache):
    """model.forward's arguments in their shardings (tracers are left to jit)."""
    if not any(_is_tracer(leaf) for leaf in jax.tree.leaves(params)):
      params = self.shard_params(params)
    if not _is_tracer(tokens):
      tokens = self.put_batch(tokens)
    if positions is not None and not _is_tracer(positions):
      positions = self.put_batch(positions)
    if cache is not None and not any(_is_tracer(leaf) for leaf in jax.tree.leaves(cache)):
      cache = self.shard_cache(cache)
    return params, tokens, positions, cache

  def replicated(self, tree):
    """Inside jit: `tree` copied to every device, so any process can read it."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.sharding(P())), tree)

  # --- The sharded computations grok_moe.model calls. ---

  def _shard_map(self, body, in_specs, out_specs):
    """jax.shard_map over the plan's mesh.

    The varying-across-devices type check is off: the kernels of quant and
    moe run loops (lax.scan) whose carries start as zeros that do not vary,
    which that check rejects; every output below is psum-med or split as its
    out spec says.
    """
    if not isinstance(self.mesh, Mesh):
      raise MeshError("running needs a mesh of devices, not an AbstractMesh")
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  def _local_scales(self, w: quant.Weight, spec, total_rows: int) -> quant.Weight:
    """Inside shard_map: a weight whose rows are split but whose scales are whole.

    This device holds rows [i*K', (i+1)*K') of K; block b of the R scale rows
    covers rows [b*K/R, (b+1)*K/R). Cut the local rows into pieces of
    g = gcd(K/R, K') rows, which never straddle a block, and give each piece
    its block's scales: a QuantizedWeight with K'/g blocks.
    """
    if not isinstance(w, quant.QuantizedWeight):
      return w
    rows_axis = tuple(spec.weight)[-2]
    if rows_axis is None or tuple(spec.scales)[-2] is not None or w.row_blocks == 1:
      return w
    local_rows = w.weight.shape[-2]
    block_rows = total_rows // w.row_blocks
    piece = math.gcd(block_rows, local_rows)
    first_row = jax.lax.axis_index(rows_axis) * local_rows
    blocks = (first_row + jnp.arange(local_rows // piece) * piece) // block_rows    # [K'/g]
    return quant.QuantizedWeight(w.weight, jnp.take(w.scales, blocks, axis=-2))

  def matmul(self, x: jax.Array, w: quant.Weight, name: str) -> jax.Array:
    """x [B, ..., K] @ w [K, N] with w placed as `name` says; the Linear layers' matmul.

    Column-split w (P(None, model)): x whole, the output split on N.
    Row-split w (P(model, None)): x split on K, partial products summed over
    the model axis. Unsplit w: a plain matmul. The batch is split over data
    throughout. Each device multiplies with quant.matmul.
    """
    spec = self.leaf_spec(name, w)
    rows_axis, cols_axis = tuple(self.weight_spec(name))
    lead = (self.batch_axis(x.shape[0]),) + (None,) * (x.ndim - 2)
    total_rows = x.shape[-1]
    if rows_axis is not None:
      def body(x, w):
        w = self._local_scales(w, spec, total_rows)
        return jax.lax.psum(quant.matmul(x, w), rows_axis)                           # [B, ..., N]
      in_x, out = P(*lead, rows_axis), P(*lead, None)
    else:
      body = quant.matmul
      in_x, out = P(*lead, None), P(*lead, cols_axis)
    return self._shard_map(body, (in_x, spec), out)(x, w)

  def attend(self, q, keys, values, mask, config: ModelConfig, *, layer: int | None = None):
    """model.attend with the query heads split over the model axis.

    q [B, T, H, d]; keys, values [B, S, K, d] (or the whole cache
    [L, B, S, K, d] and the `layer` to read); mask [B, T, S] -> [B, T, H*d],
    split on the heads. Each device holds H/n query heads. When n divides K
    it holds their K/n KV heads; otherwise the KV heads are copied and each
    device takes the ones its query heads use (head j uses KV head j // G).
    """
    if layer is not None and not self.kv_heads_sharded:
      keys, values, layer = keys[layer], values[layer], None                     # [B, S, K, d]
    n, heads, groups = self.model_size, config.num_q_heads, config.num_kv_groups
    local_heads = heads // n
    rows = self.batch_axis(q.shape[0])
    kv_spec = P(rows, None, MODEL if self.kv_heads_sharded else None, None)
    if layer is not None:
      kv_spec = P(None, *kv_spec)                                                # [L, B, S, K, d]

    def body(q, keys, values, mask):
      if self.kv_heads_sharded:
        local_kv = keys.shape[-2]
      else:
        first_head = jax.lax.axis_index(MODEL) * local_heads
        if groups % local_heads == 0:  # this device's heads all use one KV head
          local_kv = 1
          keys, values = (jax.lax.dynamic_slice_in_dim(a, first_head // groups, 1, axis=2)
                          for a in (keys, values))                               # [B, S, 1, d]
        else:  # one KV head per local query head
          local_kv = local_heads
          kv_index = (first_head + jnp.arange(local_heads)) // groups            # [H/n]
          keys, values = (jnp.take(a, kv_index, axis=2) for a in (keys, values))  # [B, S, H/n, d]
      local = config.replace(num_q_heads=local_heads, num_kv_heads=local_kv)
      if layer is None:
        return model.attend(q, keys, values, mask, local)                        # [B, T, H/n*d]
      return model.attend(q, keys, values, mask, local, layer=layer)

    return self._shard_map(
        body, (P(rows, None, MODEL, None), kv_spec, kv_spec, P(rows, None, None)),
        P(rows, None, MODEL))(q, keys, values, mask)

  def sparse_moe(self, x, gates, expert_indices, w_in, w_v, w_out, *, tile_size=None):
    """moe.sparse_moe over the mesh; x [N, D], gates and expert_indices [N, k] -> [N, D].

    Routing is computed before, identically on every device. The tokens are
    split over data; within a data group every device sees all of them.
      tensor mode: each device runs every expert on its slice of F
        (gelu(x W) * (x V) is elementwise in F, so a slice of the hidden
        units gives a partial output) and the partial outputs are summed
        over the model axis.
      expert mode: device i holds experts [i*E/n, (i+1)*E/n) and runs only
        the assignments to them (the others get expert index E/n, outside
        its range, and gate 0, so sparse_moe leaves them out); the outputs
        are summed over the model axis, which brings every token its
        experts' results (an all-gather/psum form of dispatch and return).
    """
    names = ("moe/linear/w", "moe/linear_v/w", "moe/linear_1/w")
    weights = (w_in, w_v, w_out)
    specs = tuple(self.leaf_spec(name, w) for name, w in zip(names, weights))
    rows = self.batch_axis(x.shape[0])
    per_local_expert = w_in.shape[0] // self.model_size
    expert_mode = self.moe_mode == "expert"

    def body(x, gates, expert_indices, w_in, w_v, w_out):
      w_out = self._local_scales(w_out, specs[2], self.config.ffn_size)
      if expert_mode:
        first = jax.lax.axis_index(MODEL) * per_local_expert
        local = (expert_indices >= first) & (expert_indices < first + per_local_expert)
        expert_indices = jnp.where(local, expert_indices - first, per_local_expert)
        gates = jnp.where(local, gates, 0.0)
      partial = moe.sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, tile_size=tile_size)
      return jax.lax.psum(partial, MODEL)                                          # [N', D]

    return self._shard_map(
        body, (P(rows, None), P(rows, None), P(rows, None)) + specs,
        P(rows, None))(x, gates, expert_indices, *weights)


@functools.lru_cache(maxsize=None)
def _cache_maker(plan: ShardingPlan, batch_size: int, max_len: int | None, dtype_name: str):
  """A jitted function that builds an empty cache in the plan's shards (compiled once)."""
  make = functools.partial(init_cache, plan.config, batch_size, max_len, dtype_name)
  return jax.jit(make, out_shardings=plan.cache_shardings(batch_size))


def _nested(params):
  """A Haiku tree {module: {param: leaf}} from itself or from a flat {name: leaf}."""
  if params and all(not isinstance(value, dict) for value in params.values()):
    return manifest.unflatten(params)
  return params


def fetch(array) -> np.ndarray:
  """An array as numpy on this process, gathered from every host when it spans several."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


# --- Shapes without weights: abstract parameters and the memory plan. ---

def release_abstract_params(config: ModelConfig, plan: ShardingPlan | None = None):
  """The release-format parameter tree as ShapeDtypeStructs (int8 + bfloat16 scales,
  float32 embeddings, norms and router), with the plan's shardings when given."""
  flat = {}
  for name, shape in manifest.parameter_shapes(config).items():
    blocks = quant.row_blocks_for(name)
    if blocks is None:
      leaf = jax.ShapeDtypeStruct(shape, jnp.float32)
    else:
      *lead, _, cols = shape
      leaf = quant.QuantizedWeight(
          weight=jax.ShapeDtypeStruct(shape, jnp.int8),
          scales=jax.ShapeDtypeStruct((*lead, blocks, cols), jnp.bfloat16))
    if plan is not None:
      leaf = jax.tree.map(lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                               sharding=plan.sharding(spec)),
                          leaf, plan.leaf_spec(name, leaf))
    flat[name] = leaf
  return manifest.unflatten(flat)


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


def _group(name: str) -> str:
  if "moe/" in name:
    return "experts"
  if "multi_head_attention/" in name:
    return "attention"
  if "in_out_embed" in name:
    return "embeddings"
  return "norms and router"


GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes one device holds for a config on a mesh, without loading anything.

  Weights as the release stores them (int8 with bfloat16 scales; float32
  embeddings, norms and router); the KV cache in `cache_dtype`. Every device
  holds the same amount (the table splits evenly).
  """

  config: ModelConfig
  mesh_shape: tuple[int, int]
  moe_mode: str
  batch_size: int
  cache_len: int
  cache_dtype: str
  weight_bytes: dict[str, int]               # per device, by group
  cache_bytes: int                           # per device: keys, values, valid, lengths
  shard_shapes: dict[str, Any]               # parameter name -> per-device shape(s)
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
    name = next((key for key, preset in _preset_names().items() if preset == c), "custom config")
    params = sum(math.prod(s) for s in manifest.parameter_shapes(c).values())
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


def _preset_names():
  from grok_moe.config import PRESETS
  return PRESETS


def memory_plan(config: ModelConfig, mesh_shape, batch_size: int = 1,
                cache_len: int | None = None, moe_mode: str = "tensor",
                cache_dtype=jnp.bfloat16) -> MemoryPlan:
  """Per-device bytes of the weights and the KV cache (see MemoryPlan), from shapes alone.

  `mesh_shape` is (data, model) or a mesh. Uses the same table as the
  loader, so the numbers are what `ShardingPlan.place` puts on each device.
  """
  if isinstance(mesh_shape, (Mesh, AbstractMesh)):
    mesh_shape = (mesh_shape.shape[DATA], mesh_shape.shape[MODEL])
  data, model_size = mesh_shape
  cache_len = cache_len or config.sequence_len
  plan = ShardingPlan(config, AbstractMesh((data, model_size), AXES), moe_mode)
  weight_bytes = {"experts": 0, "attention": 0, "embeddings": 0, "norms and router": 0}
  shard_shapes = {}
  for name, leaf in manifest.flatten(release_abstract_params(config)).items():
    shapes = jax.tree.map(lambda s, spec: shard_shape(s.shape, spec, plan.mesh),
                          leaf, plan.leaf_spec(name, leaf),
                          is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shard_shapes[name] = shapes
    sizes = jax.tree.map(lambda s, shape: math.prod(shape) * s.dtype.itemsize, leaf, shapes,
                         is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    weight_bytes[_group(name)] += sum(jax.tree.leaves(sizes))
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


def lower_forward(plan: ShardingPlan, batch_size: int, num_tokens: int,
                  cache_len: int | None = None, dtype=jnp.bfloat16):
  """jit(model.forward).lower(...) from shapes alone: checks that a config runs on a mesh
  (and lets XLA report its memory) without any weights. With `cache_len`, the
  forward pass writes a KV cache of that length."""
  config = plan.config
  params = release_abstract_params(config, plan)
  tokens = jax.ShapeDtypeStruct((batch_size, num_tokens), jnp.int32,
                                sharding=plan.sharding(P(plan.batch_axis(batch_size), None)))
  cache = None
  if cache_len is not None:
    shapes = jax.eval_shape(functools.partial(init_cache, config, batch_size, cache_len, dtype))
    cache = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                  sharding=sharding),
                         shapes, plan.cache_shardings(batch_size))

  def run(params, tokens, cache):
    return model.forward(params, tokens, config, dtype=dtype, cache=cache, sharding=plan)

  return jax.jit(run).lower(params, tokens, cache)


__all__ = ["DATA", "MODEL", "MOE_MODES", "PARTITION_RULES", "MemoryPlan", "Rule",
           "ShardingPlan", "fetch", "lower_forward", "make_mesh", "memory_plan", "parse_mesh",
           "release_abstract_params", "shard_shape"]

"""The model's kernels over a mesh: shard_map where the layout needs explicit code.

Three computations run under `jax.shard_map` with specs from the plan's
logical-axis rules; everything between them (embedding lookup, RoPE, norms,
routing, cache writes, logits) is left to XLA's partitioner under `jit`:

    matmul      a row-split Linear layer (the attention output): a local
                product summed over the model axis, with the row-blocked
                scales cut to the local rows (`local_scales`); column-split
                ones (query, key, value) are plain products, partitioned by XLA;
    attend      the attention core, each device its query heads and the KV
                heads they use, reading its part of the cache in place;
    sparse_moe  the expert dispatch: each device runs its slice of every
                expert (tensor mode) or its whole experts (expert mode) on
                the tokens of its data group, and the outputs are summed over
                the model axis.

Every device computes exactly what one device would, so the results equal
the single-device ones up to float rounding of the summation order. Axis
letters as in grok_moe.model; n is the size of the "model" axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from grok_moe import attention, moe, quant
from grok_moe.config import ModelConfig
from grok_moe.errors import MeshError
from grok_moe.params import ParamSpec
from grok_moe.sharding import MODEL, ShardingPlan


def _shard_map(plan: ShardingPlan, body, in_specs, out_specs):
  """jax.shard_map over the plan's mesh.

  The varying-across-devices type check is off: the kernels of quant and
  moe run loops (lax.scan) whose carries start as zeros that do not vary,
  which that check rejects; every output below is psum-med or split as its
  out spec says.
  """
  if not isinstance(plan.mesh, Mesh):
    raise MeshError("running needs a mesh of devices, not an AbstractMesh")
  return jax.shard_map(body, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def local_scales(w: quant.Weight, spec, total_rows: int) -> quant.Weight:
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


def _stacked_leaf_spec(plan: ShardingPlan, param: ParamSpec, w):
  """The spec of the stacked weight `w` [L, ...] of the tensor kind `param`."""
  spec = plan.spec(param.stored_axes())
  if isinstance(w, quant.QuantizedWeight):
    return quant.QuantizedWeight(weight=spec, scales=plan.scales_spec(spec, w.row_blocks))
  return spec


def matmul(x: jax.Array, w: quant.Weight, param: ParamSpec, plan: ShardingPlan,
           layer) -> jax.Array:
  """x [B, ..., K] @ w[layer], w the stack [L, K, N] laid out by its logical axes; a
  Linear layer's matmul. `layer` is a traced index.

  Both under shard_map, each device multiplying by its own slice of w (the
  native kernel is a custom call that XLA's partitioner cannot split: left to
  the partitioner, it would gather the whole stack onto every device):
  column-split or unsplit w: each device computes its columns from the whole
  x. Row-split w (the attention output): x split on K and the partial
  products summed over the model axis; the row-blocked scales may need
  cutting to each device's rows (`local_scales`).
  """
  rows_axis, cols_axis = (plan.mesh_axis(axis) for axis in param.axes)
  lead = (plan.batch_axis(x.shape[0]),) + (None,) * (x.ndim - 2)
  spec = _stacked_leaf_spec(plan, param, w)
  if rows_axis is None:
    return _shard_map(plan, lambda x, w, layer: quant.matmul(x, w, index=layer),
                      (P(*lead, None), spec, P()), P(*lead, cols_axis))(x, w, layer)
  total_rows = x.shape[-1]

  def body(x, w, layer):
    w = local_scales(w, spec, total_rows)
    return jax.lax.psum(quant.matmul(x, w, index=layer), rows_axis)              # [B, ..., N]

  return _shard_map(plan, body, (P(*lead, rows_axis), spec, P()), P(*lead, None))(x, w, layer)


def attend(q, keys, values, mask, config: ModelConfig, plan: ShardingPlan, *, layer=None,
           temperature=None, chunk: int = attention.DEFAULT_ATTENTION_CHUNK):
  """attention.attend with the query heads split over the model axis.

  q [B, T, H, d]; keys, values [B, S, K, d] (or the whole cache
  [L, B, S, K, d] and the `layer` to read, a traced index); mask [B, T, S]
  -> [B, T, H*d], split on the heads; temperature [B, T] or None and the
  cache's read `chunk`, as in `attention.attend`. Each device holds H/n query heads.
  When n divides K it holds their K/n KV heads; otherwise the KV heads are
  copied and each device takes the ones its query heads use (head j uses
  KV head j // G).
  """
  if layer is not None and not plan.kv_heads_sharded:
    keys, values, layer = keys[layer], values[layer], None                       # [B, S, K, d]
  n, heads, groups = plan.model_size, config.num_q_heads, config.num_kv_groups
  local_heads = heads // n
  rows = plan.batch_axis(q.shape[0])
  kv_spec = P(rows, None, MODEL if plan.kv_heads_sharded else None, None)
  if layer is not None:
    kv_spec = P(None, *kv_spec)                                                  # [L, B, S, K, d]

  read_layer = layer is not None  # else keys, values are [B, S, K, d] and `layer` unused

  def body(q, keys, values, mask, layer, temperature):
    if plan.kv_heads_sharded:
      local_kv = keys.shape[-2]
    else:
      first_head = jax.lax.axis_index(MODEL) * local_heads
      if groups % local_heads == 0:  # this device's heads all use one KV head
        local_kv = 1
        keys, values = (jax.lax.dynamic_slice_in_dim(a, first_head // groups, 1, axis=2)
                        for a in (keys, values))                                 # [B, S, 1, d]
      else:  # one KV head per local query head
        local_kv = local_heads
        kv_index = (first_head + jnp.arange(local_heads)) // groups              # [H/n]
        keys, values = (jnp.take(a, kv_index, axis=2) for a in (keys, values))   # [B, S, H/n, d]
    local = config.replace(num_q_heads=local_heads, num_kv_heads=local_kv)
    return attention.attend(q, keys, values, mask, local, layer=layer if read_layer else None,
                            temperature=temperature, chunk=chunk)          # [B, T, H/n*d]

  in_specs = (P(rows, None, MODEL, None), kv_spec, kv_spec, P(rows, None, None), P(),
              None if temperature is None else P(rows, None))
  return _shard_map(plan, body, in_specs, P(rows, None, MODEL))(
      q, keys, values, mask, jnp.int32(0) if layer is None else layer, temperature)


def sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, params: tuple[ParamSpec, ...],
               plan: ShardingPlan, *, layer, tile_size=None, activation: str = "gelu"):
  """moe.sparse_moe over the mesh; x [N, D], gates and expert_indices [N, k] -> [N, D].

  w_in, w_v, w_out are every layer's stacks [L, E, ...], of which `layer` (a
  traced index) is used; `params` are their table entries. Routing is computed
  before, identically on every device. The tokens are split over data;
  within a data group every device sees all of them.
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
  weights = (w_in, w_v, w_out)
  specs = tuple(_stacked_leaf_spec(plan, param, w) for param, w in zip(params, weights))
  rows = plan.batch_axis(x.shape[0])
  experts_split = plan.mesh_axis(params[0].axes[0]) is not None
  per_local_expert = w_in.shape[-3] // (plan.model_size if experts_split else 1)
  ffn_size = w_out.shape[-2]

  def body(x, gates, expert_indices, layer, w_in, w_v, w_out):
    w_out = local_scales(w_out, specs[2], ffn_size)
    if experts_split:
      first = jax.lax.axis_index(MODEL) * per_local_expert
      local = (expert_indices >= first) & (expert_indices < first + per_local_expert)
      expert_indices = jnp.where(local, expert_indices - first, per_local_expert)
      gates = jnp.where(local, gates, 0.0)
    partial = moe.sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, tile_size=tile_size,
                             layer=layer, activation=activation)
    return jax.lax.psum(partial, MODEL)                                          # [N', D]

  return _shard_map(
      plan, body, (P(rows, None), P(rows, None), P(rows, None), P()) + specs,
      P(rows, None))(x, gates, expert_indices, layer, *weights)

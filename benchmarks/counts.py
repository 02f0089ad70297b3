"""What one token costs by counting: active parameters and the bytes of weights it reads.

Per decoder layer a token uses the attention projections query, key, value
and linear (the output projection), the router, k of the E experts' three
matrices, the shared expert and the dense MLP where the config has them, and
its RMSNorm scales; after the layers, the final norm scale and the output
projection [V, D]: the embedding table when tied (the input lookup reads one
row of it), else lm_head.

- Active parameters (for FLOPs) count the matrix weights a token is
  multiplied by: attention 4 matrices, router, k experts x 3 matrices, the
  shared expert and dense MLP where present, and the V x D output projection. Each costs 2 FLOPs per token (multiply, add).
  Norm scales, RoPE, the softmax and the attention scores over the cache are
  not counted (scores: 4 * S * H * d FLOPs a layer, under 1% at S = 256 here).
- Bytes per decoded token (batch 1) count every weight byte the token reads,
  as the weights are stored: int8 values plus their bfloat16 scales, float32
  router, norm scales and embeddings (V x D for a tied output projection plus
  one row for the input; one row alone when lm_head is the output
  projection), for k experts a layer. The KV cache is not a weight
  and is reported on its own (`cache_bytes_read`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grok_moe import params as param_table
from grok_moe import quant
from grok_moe.config import ModelConfig


def active_parameters(config: ModelConfig) -> dict[str, int]:
  """Matrix weights one token is multiplied by, by part, and their sum ("total")."""
  D, V, F = config.emb_size, config.vocab_size, config.ffn_size
  attention = D * config.q_size + 2 * D * config.kv_size + config.q_size * D
  router = D * config.num_experts
  experts = config.num_selected_experts * 3 * D * F + 3 * D * config.shared_expert_ffn_size
  parts = {"attention": config.num_layers * attention,
           "router": config.num_layers * router,
           "experts": config.num_layers * experts,
           "dense_mlp": config.num_layers * 3 * D * config.dense_ffn_size,
           "output_projection": V * D}
  parts["total"] = sum(parts.values())
  return parts


def _leaf_bytes(leaf, fraction_of_axis: tuple[int, int] | None = None) -> int:
  """Bytes of a leaf, or of `count` entries of axis `axis` of it (fraction_of_axis =
  (axis, count)): k experts of a stacked expert weight."""
  leaves = [leaf.weight, leaf.scales] if isinstance(leaf, quant.QuantizedWeight) else [leaf]
  total = 0
  for array in leaves:
    size = math.prod(array.shape)
    if fraction_of_axis is not None:
      axis, count = fraction_of_axis
      size = size // array.shape[axis] * count
    total += size * jnp.dtype(array.dtype).itemsize
  return total


_PARTS = {"experts": "experts", "dense mlp": "dense_mlp", "attention": "attention",
          "embeddings": "embeddings",
          "norms and router": "router_and_norms"}


def bytes_per_token(params, config: ModelConfig) -> dict[str, int]:
  """Bytes of weights one decoded token (batch 1) reads, by part, as `params` (the stacked
  tree) hold them: k of the E experts of every layer, everything else whole, plus one
  embedding row for the input lookup (the embedding table is read whole only when it is
  also the output projection)."""
  parts = {part: 0 for part in _PARTS.values()}
  flat = param_table.flatten(params)
  for spec in param_table.params_for(config):
    leaf = flat[spec.path]
    part = _PARTS[spec.group]
    if param_table.EXPERTS in spec.axes:
      expert_axis = spec.stored_axes().index(param_table.EXPERTS)
      parts[part] += _leaf_bytes(leaf, (expert_axis, config.num_selected_experts))
    elif spec is param_table.EMBEDDINGS:
      one_row = config.emb_size * jnp.dtype(leaf.dtype).itemsize
      # tied: the whole table for the logits and one row for the input; untied
      # (the logits from LM_HEAD): the input row alone
      parts[part] += (_leaf_bytes(leaf) if config.tie_embeddings else 0) + one_row
    else:
      parts[part] += _leaf_bytes(leaf)
  parts["total"] = sum(parts.values())
  return parts


def weight_bytes(params) -> int:
  """Bytes of all weights as they are held (int8 + scales, or dense float)."""
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def cache_bytes_read(config: ModelConfig, length: int, dtype) -> int:
  """Bytes of keys and values a decoded token reads from a cache holding `length` tokens."""
  return (2 * config.num_layers * length * config.num_kv_heads * config.key_size
          * jnp.dtype(dtype).itemsize)

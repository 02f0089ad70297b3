"""What one token costs by counting: active parameters and the bytes of weights it reads.

Per decoder layer a token uses the attention projections query, key, value
and linear (the output projection), the router, k of the E experts' three
matrices, and four RMSNorm scales; after the layers, the final norm scale and
the output projection, which multiplies by the whole embedding table [V, D]
(the input lookup reads one row of it).

- Active parameters (for FLOPs) count the matrix weights a token is
  multiplied by: attention 4 matrices, router, k experts x 3 matrices, and the
  V x D output projection. Each costs 2 FLOPs per token (multiply, add).
  Norm scales, RoPE, the softmax and the attention scores over the cache are
  not counted (scores: 4 * S * H * d FLOPs a layer, under 1% at S = 256 here).
- Bytes per decoded token (batch 1) count every weight byte the token reads,
  as the weights are stored: int8 values plus their bfloat16 scales, float32
  router, norm scales and embeddings (V x D for the output projection plus
  one row for the input), for k experts a layer. The KV cache is not a weight
  and is reported on its own (`cache_bytes_read`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grok_moe import quant
from grok_moe.config import ModelConfig


def active_parameters(config: ModelConfig) -> dict[str, int]:
  """Matrix weights one token is multiplied by, by part, and their sum ("total")."""
  D, V, F = config.emb_size, config.vocab_size, config.ffn_size
  attention = D * config.q_size + 2 * D * config.kv_size + config.q_size * D
  router = D * config.num_experts
  experts = config.num_selected_experts * 3 * D * F
  parts = {"attention": config.num_layers * attention,
           "router": config.num_layers * router,
           "experts": config.num_layers * experts,
           "output_projection": V * D}
  parts["total"] = sum(parts.values())
  return parts


def _leaf_bytes(leaf, rows: int | None = None) -> int:
  """Bytes of a leaf, or of `rows` of its leading axis (one expert of a stacked weight)."""
  leaves = [leaf.weight, leaf.scales] if isinstance(leaf, quant.QuantizedWeight) else [leaf]
  total = 0
  for array in leaves:
    size = math.prod(array.shape) if rows is None else math.prod(array.shape[1:]) * rows
    total += size * jnp.dtype(array.dtype).itemsize
  return total


def bytes_per_token(params, config: ModelConfig) -> dict[str, int]:
  """Bytes of weights one decoded token (batch 1) reads, by part, as `params` hold them."""
  parts = {"attention": 0, "experts": 0, "router_and_norms": 0, "embeddings": 0}
  k = config.num_selected_experts
  for module, group in params.items():
    for name, leaf in group.items():
      full = f"{module}/{name}"
      if "/moe/" in full:
        parts["experts"] += _leaf_bytes(leaf, rows=k)
      elif "multi_head_attention" in full:
        parts["attention"] += _leaf_bytes(leaf)
      elif full.endswith("embeddings"):
        one_row = config.emb_size * jnp.dtype(leaf.dtype).itemsize
        parts["embeddings"] += _leaf_bytes(leaf) + one_row
      else:
        parts["router_and_norms"] += _leaf_bytes(leaf)
  parts["total"] = sum(parts.values())
  return parts


def weight_bytes(params) -> int:
  """Bytes of all weights as they are held (int8 + scales, or dense float)."""
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def cache_bytes_read(config: ModelConfig, length: int, dtype) -> int:
  """Bytes of keys and values a decoded token reads from a cache holding `length` tokens."""
  return (2 * config.num_layers * length * config.num_kv_heads * config.key_size
          * jnp.dtype(dtype).itemsize)

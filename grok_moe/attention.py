"""Attention: rotary embeddings and grouped-query attention with the soft logit cap.

Axis letters: B batch, T new tokens, S cache slots (or keys), H query heads,
K KV heads, G query heads per KV head (H = K*G), d head width, L layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grok_moe.config import ModelConfig
from grok_moe.soft_cap import soft_cap

MASKED_LOGIT = -1e30


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding, rotate-half form. x [B, T, H, d], positions [B, T]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [d/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq                         # [B, T, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]                   # [B, T, 1, d]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)                                           # [B, T, H, d/2]
  rotated = jnp.concatenate([-second, first], axis=-1)                                 # [B, T, H, d]
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


# `attend` reads a KV cache of more slots than this in chunks of this many, unless
# given another `chunk`.
DEFAULT_ATTENTION_CHUNK = 512


def temperature(positions: jax.Array, config: ModelConfig) -> jax.Array | None:
  """Grok-2's attention temperature of each query, [B, T] float32 from positions [B, T]:
  log2(p) / log2(Lt) at positions p > Lt = attn_temperature_len, else 1. None when the
  config has none (attn_temperature_len 0)."""
  if not config.attn_temperature_len:
    return None
  p = positions.astype(jnp.float32)
  scaled = jnp.log2(jnp.maximum(p, 1.0)) * (1.0 / math.log2(config.attn_temperature_len))
  return jnp.where(p > config.attn_temperature_len, scaled, 1.0)


def _capped(scores, config: ModelConfig, temperature=None):
  """Logits scaled by attn_output_multiplier and soft-capped (unless the cap is 0), in
  float32, then times each query's `temperature` (broadcast to scores; None: 1)."""
  scores = scores.astype(jnp.float32) * config.attn_output_multiplier
  scores = soft_cap(scores, config.attn_logit_cap)
  return scores if temperature is None else scores * temperature


def attend(q, keys, values, mask, config: ModelConfig, *, layer=None, temperature=None,
           chunk: int = DEFAULT_ATTENTION_CHUNK):
  """Grouped-query attention with the soft logit cap.

  q [B, T, H, d]; keys, values [B, S, K, d], or a whole cache [L, B, S, K, d]
  with the `layer` to read (an int or a traced index); mask [B, T, S] -> [B, T, H*d], in q's dtype.
  `temperature` [B, T] (see `temperature`) multiplies each query's capped logits.
  A cache of more than `chunk` slots (a multiple of it) is read chunk by
  chunk (`_attend_cache_in_chunks`), skipping the chunks no query sees.
  """
  batch, num_new, _, head_dim = q.shape
  q = q.reshape(batch, num_new, config.num_kv_heads, config.num_kv_groups, head_dim)  # [B, T, K, G, d]
  num_slots = mask.shape[-1]
  if layer is not None and num_slots > chunk and num_slots % chunk == 0:
    out = _attend_cache_in_chunks(q, keys, values, layer, mask, config, chunk,
                                  temperature)                                      # [B, T, K, G, d]
  else:
    if layer is not None:
      keys, values = keys[layer], values[layer]                                     # [B, S, K, d]
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    query_temperature = None if temperature is None else temperature[:, None, None, :, None]
    scores = _capped(jnp.einsum("btkgd,bskd->bkgts", q, keys,
                                preferred_element_type=jnp.float32),
                     config, query_temperature)                                     # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_LOGIT)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)                       # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", weights, values)                          # [B, T, K, G, d]
  return out.reshape(batch, num_new, config.q_size)                                 # [B, T, H*d]


def _attend_cache_in_chunks(q, cache_keys, cache_values, layer, mask, config: ModelConfig,
                            chunk: int, temperature=None):
  """Attention of q [B, T, K, G, d] over layer `layer` of a cache [L, B, S, K, d], read
  in chunks of c = `chunk` slots; mask [B, T, S], temperature [B, T] or None
  -> [B, T, K, G, d] in q's dtype.

  Two `lax.scan`s over the chunks, so that the softmax is the plain one over
  all S slots: (1) the logits of each chunk, (2) after the softmax, the sum
  of weights @ values chunk by chunk. A chunk that no query sees (its mask is
  all False: the empty end of the cache) is skipped with `lax.cond` and never
  read: its logits are MASKED_LOGIT, its weights exactly 0 for any query that
  sees a key. So a decode step costs what the filled part of the cache holds,
  not its capacity.

  Each chunk is used in its stored layout [B, c, K*d]: the queries are laid
  out block-diagonally, qd [B, K*d, T*H] with query head (k, g) nonzero only
  in the d columns of KV head k, so that both products are plain matrix
  products (chunk @ qd, weights @ chunk) and no chunk is transposed. This
  costs K times the (small) multiply-adds of the attention; the zero blocks
  add exact zeros, so the result is the grouped attention's.
  """
  batch, num_new, kv_heads, groups, head_dim = q.shape
  num_slots = mask.shape[-1]
  num_chunks, width, queries = num_slots // chunk, kv_heads * head_dim, num_new * kv_heads * groups
  eye = jnp.eye(kv_heads, dtype=q.dtype)                                            # [K, K]
  q_blocks = jnp.einsum("btkgd,kj->bjdtkg", q, eye).reshape(batch, width, queries)  # [B, K*d, T*H]
  mask_chunks = mask.reshape(batch, num_new, num_chunks, chunk)                     # [B, T, C, c]
  seen = jnp.any(mask_chunks, axis=(0, 1, 3))                                       # [C]
  mask_chunks = jnp.moveaxis(mask_chunks, 2, 0)                                     # [C, B, T, c]

  def read(cache, index):
    """Chunk `index` of this layer, [B, c, K*d]."""
    start = (layer, 0, index * chunk, 0, 0)
    piece = jax.lax.dynamic_slice(cache, start, (1, batch, chunk, kv_heads, head_dim))
    return piece.reshape(batch, chunk, width).astype(q.dtype)

  def chunk_scores(_, inputs):
    index, chunk_seen, chunk_mask = inputs

    def compute():
      scores = jnp.einsum("bse,beq->bsq", read(cache_keys, index), q_blocks,
                          preferred_element_type=jnp.float32)                      # [B, c, T*H]
      query_temperature = None if temperature is None else temperature[:, None, :, None]
      scores = _capped(scores.reshape(batch, chunk, num_new, kv_heads * groups), config,
                       query_temperature)                                          # [B, c, T, H]
      visible = jnp.swapaxes(chunk_mask, 1, 2)[..., None]                          # [B, c, T, 1]
      return jnp.where(visible, scores, MASKED_LOGIT)                              # [B, c, T, H]

    masked = jnp.full((batch, chunk, num_new, kv_heads * groups), MASKED_LOGIT, jnp.float32)
    return None, jax.lax.cond(chunk_seen, compute, lambda: masked)

  _, scores = jax.lax.scan(chunk_scores, None,
                           (jnp.arange(num_chunks), seen, mask_chunks))             # [C, B, c, T, H]
  scores = jnp.moveaxis(scores, 0, 1).reshape(batch, num_slots, queries)            # [B, S, T*H]
  weights = jax.nn.softmax(scores, axis=1).astype(q.dtype)                          # [B, S, T*H]
  weights = jnp.moveaxis(weights.reshape(batch, num_chunks, chunk, queries), 1, 0)  # [C, B, c, T*H]

  def add_chunk(out, inputs):
    index, chunk_seen, chunk_weights = inputs

    def add(out):
      return out + jnp.einsum("bsq,bse->bqe", chunk_weights, read(cache_values, index),
                              preferred_element_type=jnp.float32)                   # [B, T*H, K*d]

    return jax.lax.cond(chunk_seen, add, lambda out: out, out), None

  out = jnp.zeros((batch, queries, width), jnp.float32)                             # [B, T*H, K*d]
  out, _ = jax.lax.scan(add_chunk, out, (jnp.arange(num_chunks), seen, weights))
  out = out.reshape(batch, num_new, kv_heads, groups, kv_heads, head_dim)           # [B, T, K, G, K, d]
  return jnp.einsum("btkgjd,kj->btkgd", out, eye.astype(jnp.float32)).astype(q.dtype)

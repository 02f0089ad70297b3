"""The key/value cache: a pure value that goes into the model and comes out updated.

Slot s of a row holds the keys and values of that row's token at position s,
so the cache is read with the positions as they are and written where each
row's own next position is. `valid` marks the slots that hold a real (non-pad)
token; `lengths` is each row's next position: one past its last real token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grok_moe.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  keys: jax.Array     # [L, B, S, Hkv, d]
  values: jax.Array   # [L, B, S, Hkv, d]
  valid: jax.Array    # [B, S] bool
  lengths: jax.Array  # [B] int32

  @property
  def max_len(self) -> int:
    return self.keys.shape[2]

  @property
  def batch_size(self) -> int:
    return self.keys.shape[1]


def init_cache(config: ModelConfig, batch_size: int, max_len: int | None = None,
               dtype=jnp.bfloat16) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_len` (default sequence_len) tokens."""
  max_len = max_len or config.sequence_len
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.key_size)
  return KVCache(
      keys=jnp.zeros(shape, dtype),
      values=jnp.zeros(shape, dtype),
      valid=jnp.zeros((batch_size, max_len), bool),
      lengths=jnp.zeros((batch_size,), jnp.int32))


def cache_bytes(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> int:
  """Bytes of keys and values for a cache of this size."""
  per_token = 2 * config.num_layers * config.num_kv_heads * config.key_size
  return per_token * batch_size * max_len * jnp.dtype(dtype).itemsize

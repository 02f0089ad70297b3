"""attention.attend reading a KV cache chunk by chunk, against the whole-cache computation.

With more slots than its `chunk` (a multiple of it), attend reads one layer of
the cache in chunks of that many slots and skips (never reads) every chunk that no
query of the batch sees; these tests shrink the chunk so that a small cache
has several chunks, fill the chunks that must be skipped with NaN (a chunk
read by mistake turns the output into NaN), and hold the result to the plain
computation over every slot and to a full uncached pass.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import attention, manifest, model
from grok_moe.config import TINY
from grok_moe.kv_cache import init_cache
from tests.helpers import random_params, relative_error

CONFIG = TINY.replace(num_layers=2, sequence_len=56)
# float32 throughout; a shorter sum over values changes only the order of
# additions (~1e-7 relative), far inside 1e-5.
TOLERANCE = 1e-5


CHUNK = 8


def _inputs(rng, batch, new, slots, filled):
  """q, a 2-layer cache whose chunks past the last one any query sees hold NaN, and the
  causal mask of rows filled up to `filled` (the new tokens last)."""
  cfg = CONFIG
  q = rng.normal(size=(batch, new, cfg.num_q_heads, cfg.key_size)).astype(np.float32) * 3
  keys = rng.normal(size=(2, batch, slots, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
  values = rng.normal(size=keys.shape).astype(np.float32)
  positions = filled[:, None] - new + np.arange(new)[None, :]                     # [B, T]
  mask = np.arange(slots)[None, None, :] <= positions[:, :, None]                # [B, T, S]
  unseen = -(-int(filled.max()) // CHUNK) * CHUNK                                 # first unseen chunk
  keys[:, :, unseen:] = np.nan
  values[:, :, unseen:] = np.nan
  return q, keys, values, mask


def _plain(q, keys, values, mask):
  """attend over every slot of one layer [B, S, K, d], the skipped chunks' NaN made 0."""
  keys, values = np.nan_to_num(keys), np.nan_to_num(values)
  return attention.attend(q, keys, values, mask, CONFIG)


@pytest.mark.parametrize("filled", [[3, 17], [40, 40], [9, 1]])
def test_chunked_attend_matches_whole_cache(filled):
  """One new token per row over a 40-slot cache in 5 chunks. Catches a wrong chunk
  offset or layer, a softmax taken per chunk instead of over all slots, and a read of
  a chunk no query sees (its NaN would reach the output)."""
  rng = np.random.default_rng(sum(filled))
  q, keys, values, mask = _inputs(rng, 2, 1, 40, np.asarray(filled))
  expected = _plain(q, keys[1], values[1], mask)                                 # all 40 slots
  got = attention.attend(q, jnp.asarray(keys), jnp.asarray(values), mask, CONFIG, layer=1,
                         chunk=CHUNK)                                            # 5 chunks
  assert got.shape == (2, 1, CONFIG.q_size)
  assert relative_error(got, expected) < TOLERANCE


def test_chunked_attend_with_several_new_tokens():
  """Five new tokens per row, rows filled to different lengths: the chunked read with
  several queries per row (the block-diagonal query layout) equals the plain one."""
  rng = np.random.default_rng(0)
  q, keys, values, mask = _inputs(rng, 2, 5, 32, np.asarray([12, 30]))
  expected = _plain(q, keys[0], values[0], mask)
  got = attention.attend(q, keys, values, mask, CONFIG, layer=0, chunk=CHUNK)    # 4 chunks
  assert relative_error(got, expected) < TOLERANCE


def test_cached_decoding_over_several_chunks_matches_full_pass():
  """Prefill then decode through a 40-slot cache read in 8-slot chunks
  (`attention_chunk`) gives the logits of one uncached pass: the chunked read inside the
  model's layer scan is the plain one. The last two chunks, which no query sees, hold
  NaN: catches forward not passing its `attention_chunk` down (the whole cache is then
  read, and the NaN reaches the logits)."""
  params = manifest.unflatten(random_params(CONFIG, "release", seed=5))
  rng = np.random.default_rng(1)
  sequences = rng.integers(3, CONFIG.vocab_size, size=(2, 21))
  expected = np.asarray(model.forward(params, sequences, CONFIG, dtype=jnp.float32).logits)

  cache = init_cache(CONFIG, 2, 40, jnp.float32)                                # 5 chunks
  out = model.forward(params, sequences[:, :11], CONFIG, dtype=jnp.float32, cache=cache,
                      attention_chunk=CHUNK)
  assert relative_error(out.logits, expected[:, :11]) < 1e-4
  unseen = slice(24, None)  # chunks 3 and 4: past position 20, the last one decoded
  cache = dataclasses.replace(out.cache, keys=out.cache.keys.at[:, :, unseen].set(jnp.nan),
                              values=out.cache.values.at[:, :, unseen].set(jnp.nan))
  for position in range(11, 21):
    out = model.forward(params, sequences[:, position:position + 1], CONFIG,
                        dtype=jnp.float32, cache=cache, attention_chunk=CHUNK)
    cache = out.cache
    assert relative_error(out.logits[:, 0], expected[:, position]) < 1e-4
  assert cache.lengths.tolist() == [21, 21]

"""model.attend reading only the filled prefix of a KV cache, against the whole-cache computation.

With more slots than ATTENTION_CHUNK, attend reads the shortest prefix of the
cache (a multiple of the chunk) that holds every key a query may see; these
tests shrink the chunk so that a small cache has several prefixes, and hold
the result to the computation over every slot and to a full uncached pass.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import manifest, model
from grok_moe.config import TINY
from grok_moe.kv_cache import init_cache
from tests.helpers import random_params, relative_error

# Its own sequence_len, so that forward's compilation cache holds no trace
# of this config made with the default chunk size.
CONFIG = TINY.replace(num_layers=2, sequence_len=56)
# float32 throughout; a shorter sum over values changes only the order of
# additions (~1e-7 relative), far inside 1e-5.
TOLERANCE = 1e-5


def _inputs(rng, batch, new, slots, filled):
  cfg = CONFIG
  q = rng.normal(size=(batch, new, cfg.num_q_heads, cfg.key_size)).astype(np.float32) * 3
  keys = rng.normal(size=(2, batch, slots, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
  values = rng.normal(size=keys.shape).astype(np.float32)
  positions = filled[:, None] - new + np.arange(new)[None, :]                     # [B, T]
  mask = np.arange(slots)[None, None, :] <= positions[:, :, None]                # [B, T, S]
  return q, keys, values, mask


@pytest.mark.parametrize("filled", [[3, 17], [40, 40], [9, 1]])
def test_prefix_attend_matches_whole_cache(monkeypatch, filled):
  rng = np.random.default_rng(sum(filled))
  q, keys, values, mask = _inputs(rng, 2, 1, 40, np.asarray(filled))
  expected = model.attend(q, keys[1], values[1], mask, CONFIG)                   # all 40 slots
  monkeypatch.setattr(model, "ATTENTION_CHUNK", 8)                               # prefixes 8 .. 40
  got = model.attend(q, jnp.asarray(keys), jnp.asarray(values), mask, CONFIG, layer=1)
  assert got.shape == (2, 1, CONFIG.q_size)
  assert relative_error(got, expected) < TOLERANCE


def test_prefix_attend_with_several_new_tokens(monkeypatch):
  rng = np.random.default_rng(0)
  q, keys, values, mask = _inputs(rng, 2, 5, 32, np.asarray([12, 30]))
  expected = model.attend(q, keys[0], values[0], mask, CONFIG)
  monkeypatch.setattr(model, "ATTENTION_CHUNK", 8)                               # prefixes 8 .. 32
  got = model.attend(q, keys, values, mask, CONFIG, layer=0)
  assert relative_error(got, expected) < TOLERANCE


def test_cached_decoding_over_several_prefixes_matches_full_pass(monkeypatch):
  monkeypatch.setattr(model, "ATTENTION_CHUNK", 8)
  params = manifest.unflatten(random_params(CONFIG, "release", seed=5))
  rng = np.random.default_rng(1)
  sequences = rng.integers(3, CONFIG.vocab_size, size=(2, 21))
  expected = np.asarray(model.forward(params, sequences, CONFIG, dtype=jnp.float32).logits)

  cache = init_cache(CONFIG, 2, 40, jnp.float32)                                # prefixes 8 .. 40
  out = model.forward(params, sequences[:, :11], CONFIG, dtype=jnp.float32, cache=cache)
  assert relative_error(out.logits, expected[:, :11]) < 1e-4
  cache = out.cache
  for position in range(11, 21):
    out = model.forward(params, sequences[:, position:position + 1], CONFIG,
                        dtype=jnp.float32, cache=cache)
    cache = out.cache
    assert relative_error(out.logits[:, 0], expected[:, position]) < 1e-4
  assert cache.lengths.tolist() == [21, 21]

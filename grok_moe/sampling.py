"""Generation with a KV cache: prefill the prompts in one pass, then one token a step.

    prefill      all prompts of the batch, right-padded to a length bucket, in one
                 forward pass that fills the cache; sample each row's first token
                 from the logits at its last prompt token.
    decode_step  one new token per row: write it at the row's next position,
                 attend to the cache, sample the next one.
    generate     prefill, then decode_step until every row has stopped (EOS,
                 max_new_tokens, a full context, or the caller stops reading).

Prompt lengths and cache sizes are rounded up to powers of two, so a new prompt
length compiles again only when it crosses a bucket. Sampling arithmetic is float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok_moe import model
from grok_moe.config import ModelConfig
from grok_moe.errors import InputError
from grok_moe.kv_cache import init_cache

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each new token.

  temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters
  off. The same seed gives the same tokens for the same prompts.
  """

  max_new_tokens: int = 64
  temperature: float = 0.8
  top_p: float = 0.95
  top_k: int = 0
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
      raise InputError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
    if not self.temperature >= 0:
      raise InputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise InputError(f"top_p must be in (0, 1] (1 switches it off), got {self.top_p}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise InputError(f"top_k must be an integer >= 0 (0 switches it off), got {self.top_k!r}")


def bucket(length: int, limit: int) -> int:
  """The smallest power of two >= length (at least MIN_BUCKET), capped at limit."""
  return min(limit, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


def sample_logits(logits, key, temperature, top_p, top_k, vocab_limit=None):
  """Next tokens [B] from logits [B, V], all in float32.

  Only ids below `vocab_limit` (the tokenizer's size, when the model's
  vocabulary is larger) can be drawn. Temperature scales the logits; top-k keeps the k largest; top-p keeps the
  smallest set of most likely tokens whose probability reaches top_p (always
  at least the most likely one); then one categorical draw per row.
  temperature == 0 returns the argmax.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if vocab_limit is not None:
    logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)

  def draw():
    scaled = logits / jnp.maximum(temperature, 1e-6)
    descending = -jnp.sort(-scaled, axis=-1)                                   # [B, V]
    kth_largest = descending[:, jnp.clip(top_k - 1, 0, vocab - 1)][:, None]    # [B, 1]
    descending = jnp.where((top_k > 0) & (descending < kth_largest), -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)                                # [B, V]
    mass_before = jnp.cumsum(probs, axis=-1) - probs                           # [B, V]
    kept = jnp.where(mass_before < top_p, descending, jnp.inf)                 # [B, V]
    cutoff = jnp.min(kept, axis=-1, keepdims=True)                             # [B, 1]
    cutoff = jnp.where(top_k > 0, jnp.maximum(cutoff, kth_largest), cutoff)
    filtered = jnp.where(scaled >= cutoff, scaled, -jnp.inf)                   # [B, V]
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

  def argmax():
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  # Greedy decoding skips the sort over the vocabulary (about 1 ms a step on CPU at V=4096).
  return jax.lax.cond(temperature == 0, argmax, draw)


def _sample_on_every_device(logits, key, settings, sharding):
  """Next tokens [B] from logits [B, V]; with a mesh, both are copied to every device, so
  every process reads the same tokens and feeds them back."""
  if sharding is not None:
    logits = sharding.replicated(logits)
  tokens = sample_logits(logits, key, *settings)
  if sharding is not None:
    tokens = sharding.replicated(tokens)
  return tokens, logits


@functools.partial(jax.jit, static_argnames=("config", "dtype", "sharding"),
                   donate_argnames=("cache",))
def _prefill(params, tokens, cache, last_index, key, settings, *, config, dtype, sharding=None):
  out = model.forward(params, tokens, config, dtype=dtype, cache=cache, sharding=sharding)
  last_logits = jnp.take_along_axis(out.logits, last_index[:, None, None], axis=1)[:, 0]  # [B, V]
  return *_sample_on_every_device(last_logits, key, settings, sharding), out.cache


@functools.partial(jax.jit, static_argnames=("config", "dtype", "sharding"),
                   donate_argnames=("cache",))
def _decode_step(params, tokens, cache, key, settings, *, config, dtype, sharding=None):
  out = model.forward(params, tokens[:, None], config, dtype=dtype, cache=cache,
                      sharding=sharding)
  logits = out.logits[:, 0]                                                    # [B, V]
  return *_sample_on_every_device(logits, key, settings, sharding), out.cache


@dataclasses.dataclass
class Step:
  """One generation step: each row's new token, and which rows have finished."""
  tokens: np.ndarray    # [B] int32; meaningful where `active`
  active: np.ndarray    # [B] bool: the row produced `tokens` this step
  logits: jax.Array     # [B, V] float32 logits the tokens were drawn from


def check_prompts(prompts: Sequence[Sequence[int]], config: ModelConfig,
                  truncate: bool = False) -> list[list[int]]:
  """Validated prompts: ids in the vocabulary, empty -> [BOS], too long -> error or cut."""
  checked = []
  limit = config.sequence_len - 1  # room for at least one new token
  for row, prompt in enumerate(prompts):
    prompt = [int(t) for t in prompt] or [config.bos_token]
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
      raise InputError(f"prompt {row} has token ids outside the vocabulary "
                       f"[0, {config.vocab_size}): {bad[:5]}")
    if len(prompt) > limit:
      if not truncate:
        raise InputError(
            f"prompt {row} has {len(prompt)} tokens but the context holds {config.sequence_len}; "
            f"shorten it or pass truncate=True (--truncate) to keep the last {limit}")
      prompt = prompt[-limit:]
    checked.append(prompt)
  return checked


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig, *, dtype=jnp.bfloat16, truncate: bool = False,
             vocab_limit: int | None = None, sharding=None) -> Iterator[Step]:
  """Yields one `Step` per new token for a batch of prompts (lists of token ids).

  `vocab_limit` keeps the draws below the tokenizer's size when the model's
  vocabulary is larger. `sharding` (a `sharding.ShardingPlan`) runs on its
  mesh, with the cache created in its shards; with several processes, every
  process calls generate with the same prompts and gets the same steps.

  A row stops after EOS (which is yielded, flagged active, and ends the row) or
  when its context is full; the generator ends when every row has stopped or
  after max_new_tokens steps. Positions count from 0 at each prompt's first
  (kept) token.
  """
  prompts = check_prompts(prompts, config, truncate)
  if sampling.max_new_tokens == 0:
    return
  dtype = jnp.dtype(dtype).name
  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  prompt_len = bucket(int(lengths.max()), config.sequence_len)
  cache_len = max(prompt_len, bucket(int(lengths.max()) + sampling.max_new_tokens,
                                     config.sequence_len))
  tokens = np.full((batch, prompt_len), config.pad_token, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt

  settings = (jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
              jnp.int32(sampling.top_k), jnp.int32(vocab_limit or config.vocab_size))
  base_key = jax.random.PRNGKey(sampling.seed)
  put = np.asarray
  if sharding is None:
    cache = init_cache(config, batch, cache_len, dtype)
  else:
    params = sharding.shard_params(params)  # a no-op for params placed by the plan
    cache = sharding.init_cache(batch, cache_len, dtype)
    put = sharding.put  # host values, replicated: the same on every process
    tokens, settings, base_key = put(tokens), put(settings), put(base_key)
  next_tokens, logits, cache = _prefill(
      params, tokens, cache, put(lengths - 1), jax.random.fold_in(base_key, 0),
      settings, config=config, dtype=dtype, sharding=sharding)

  active = np.ones(batch, bool)
  positions = lengths.copy()  # where each row's next token goes
  for step in range(1, sampling.max_new_tokens + 1):
    new = np.asarray(next_tokens)
    yield Step(tokens=new, active=active.copy(), logits=logits)
    active &= (new != config.eos_token) & (positions < cache_len)
    if step == sampling.max_new_tokens or not active.any():
      return
    feed = np.where(active, new, config.pad_token).astype(np.int32)
    positions += active
    next_tokens, logits, cache = _decode_step(
        params, put(feed), cache, jax.random.fold_in(base_key, step), settings,
        config=config, dtype=dtype, sharding=sharding)

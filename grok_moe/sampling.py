"""Generation with a KV cache: prefill the prompts chunk by chunk, then one token a step.

    prefill      all prompts of the batch, right-padded, written into the cache in
                 chunks of at most `prefill_chunk` tokens (one forward pass each),
                 so activation memory is set by the chunk, not by the prompt; the
                 logits of each row's last prompt token give its first new token.
    decode_step  one new token per row: write it at the row's next position,
                 attend to the cache, sample the next one.
    generate     prefill, then decode_step until every row has stopped (EOS,
                 max_new_tokens, a full context, or the caller stops reading).

Which tokens are real is carried explicitly (a mask beside the tokens), never
read from the ids: a row that has finished feeds a token marked not real.

Compiled shapes: a prompt of at most `prefill_chunk` tokens is padded to a power
of two (at least MIN_BUCKET), a longer one is cut into chunks of exactly
`prefill_chunk`; the cache length is a power of two. Sampling arithmetic is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok_moe import model
from grok_moe import params as param_table
from grok_moe.config import ModelConfig
from grok_moe.errors import GrokMoeError, InputError
from grok_moe.kv_cache import init_cache

MIN_BUCKET = 16
DEFAULT_PREFILL_CHUNK = 1024


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
    for name in ("max_new_tokens", "top_k", "seed"):  # numpy integers are integers too
      value = getattr(self, name)
      if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        object.__setattr__(self, name, int(value))
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 64:
      raise InputError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
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
  """Next tokens [B] from logits [B, V], and whether every logit is finite; with a mesh,
  both are copied to every device, so every process reads the same tokens and feeds
  them back."""
  if sharding is not None:
    logits = sharding.replicated(logits)
  tokens = sample_logits(logits, key, *settings)
  finite = jnp.all(jnp.isfinite(logits))
  if sharding is not None:
    tokens, finite = sharding.replicated((tokens, finite))
  return tokens, logits, finite


def prefill_chunk_step(params, tokens, token_valid, start, cache, last_index, last_logits, key,
                       settings, *, config, dtype, sharding=None):
  """One prefill chunk: tokens, token_valid [B, C] at positions start .. start + C - 1.

  Writes the chunk into the cache, and for the rows whose last prompt token
  (`last_index` [B], counted from the prompt's start) is in this chunk, its
  logits replace `last_logits` [B, V]. Returns (next tokens sampled from
  last_logits, last_logits, finite, cache).
  """
  batch, chunk = tokens.shape
  positions = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]                   # [1, C]
  positions = jnp.broadcast_to(positions, (batch, chunk))                           # [B, C]
  in_chunk = (last_index >= start) & (last_index < start + chunk)                   # [B]
  out = model.apply(params, tokens, token_valid, positions, cache,
                    jnp.clip(last_index - start, 0, chunk - 1), config=config, dtype=dtype,
                    return_routing=False, sharding=sharding)
  last_logits = jnp.where(in_chunk[:, None], out.logits[:, 0], last_logits)         # [B, V]
  return *_sample_on_every_device(last_logits, key, settings, sharding), out.cache


def decode_step(params, tokens, token_valid, cache, key, settings, *, config, dtype,
                sharding=None):
  """One new token per row: tokens, token_valid [B] at each row's next position."""
  out = model.apply(params, tokens[:, None], token_valid[:, None], None, cache, None,
                    config=config, dtype=dtype, return_routing=False, sharding=sharding)
  return *_sample_on_every_device(out.logits[:, 0], key, settings, sharding), out.cache


_STATIC = ("config", "dtype", "sharding")
_prefill_chunk_jit = jax.jit(prefill_chunk_step, static_argnames=_STATIC,
                             donate_argnames=("cache",))
_decode_step_jit = jax.jit(decode_step, static_argnames=_STATIC, donate_argnames=("cache",))


@dataclasses.dataclass
class Step:
  """One generation step: each row's new token, and which rows have finished."""
  tokens: np.ndarray    # [B] int32; meaningful where `active`
  active: np.ndarray    # [B] bool: the row produced `tokens` this step
  logits: jax.Array     # [B, V] float32 logits the tokens were drawn from


def check_prompts(prompts: Sequence[Sequence[int]], config: ModelConfig,
                  truncate: bool = False, max_new_tokens: int = 1) -> list[list[int]]:
  """Validated prompts: ids in the vocabulary, empty -> [BOS], too long -> error or cut.

  With `truncate`, a prompt that leaves less than `max_new_tokens` (at least
  one) of the context free keeps its last sequence_len - max_new_tokens
  tokens (at least one), so that the new tokens fit.
  """
  checked = []
  room = max(1, max_new_tokens)
  keep = max(1, config.sequence_len - room)
  for row, prompt in enumerate(prompts):
    prompt = list(prompt)
    bad_types = [t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
    if bad_types:
      raise InputError(f"prompt {row} holds values that are not integer token ids: "
                       f"{bad_types[:5]}")
    prompt = [int(t) for t in prompt] or [config.bos_token]
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
      raise InputError(f"prompt {row} has token ids outside the vocabulary "
                       f"[0, {config.vocab_size}): {bad[:5]}")
    if len(prompt) >= config.sequence_len:
      if not truncate:
        raise InputError(
            f"prompt {row} has {len(prompt)} tokens but the context holds "
            f"{config.sequence_len}; shorten it or pass truncate=True (--truncate) to keep "
            f"the last {keep}")
      prompt = prompt[-keep:]
    elif truncate and len(prompt) > keep:
      prompt = prompt[-keep:]
    checked.append(prompt)
  return checked


def prefill_shapes(prompt_len: int, config: ModelConfig,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> tuple[int, int]:
  """(chunk size, number of chunks) that prefill a prompt of `prompt_len` tokens.

  Up to `prefill_chunk` tokens: one chunk of the next power of two (at least
  MIN_BUCKET, at most the context); longer: chunks of exactly `prefill_chunk`.
  """
  if prefill_chunk < 1:
    raise InputError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
  if prompt_len <= prefill_chunk:
    return bucket(prompt_len, min(prefill_chunk, config.sequence_len)), 1
  return prefill_chunk, math.ceil(prompt_len / prefill_chunk)


def cache_length(prompt_len: int, max_new_tokens: int, config: ModelConfig) -> int:
  """Cache slots for a prompt and its new tokens: a power of two, at most the context."""
  return bucket(prompt_len + max_new_tokens, config.sequence_len)


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig, *, dtype=jnp.bfloat16, truncate: bool = False,
             vocab_limit: int | None = None, sharding=None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Iterator[Step]:
  """Yields one `Step` per new token for a batch of prompts (lists of token ids).

  `vocab_limit` keeps the draws below the tokenizer's size when the model's
  vocabulary is larger. `sharding` (a `sharding.ShardingPlan`) runs on its
  mesh, with the cache created in its shards; with several processes, every
  process calls generate with the same prompts and gets the same steps.
  `prefill_chunk` bounds the tokens of one prefill pass (see `prefill_shapes`).

  A row stops after EOS (which is yielded, flagged active, and ends the row) or
  when its context is full; the generator ends when every row has stopped or
  after max_new_tokens steps. Positions count from 0 at each prompt's first
  (kept) token. A GrokMoeError is raised if the logits are not finite.
  """
  prompts = check_prompts(prompts, config, truncate, sampling.max_new_tokens)
  if sampling.max_new_tokens == 0:
    return
  dtype = jnp.dtype(dtype).name
  params = param_table.as_stacked(params, config)
  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  longest = int(lengths.max())
  if longest + sampling.max_new_tokens > config.sequence_len:
    warnings.warn(f"the context of {config.sequence_len} tokens leaves room for "
                  f"{config.sequence_len - longest} of the {sampling.max_new_tokens} new "
                  "tokens asked for; generation stops when it is full", stacklevel=2)
  chunk, num_chunks = prefill_shapes(longest, config, prefill_chunk)
  cache_len = cache_length(longest, sampling.max_new_tokens, config)
  tokens = np.zeros((batch, chunk * num_chunks), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  token_valid = np.arange(chunk * num_chunks)[None, :] < lengths[:, None]          # [B, T]

  settings = (jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
              jnp.int32(sampling.top_k), jnp.int32(vocab_limit or config.vocab_size))
  base_key = jax.random.PRNGKey(sampling.seed)
  last_logits = np.zeros((batch, config.vocab_size), np.float32)
  put = put_batch = np.asarray
  if sharding is None:
    cache = init_cache(config, batch, cache_len, dtype)
  else:
    params = sharding.shard_params(params)  # a no-op for params placed by the plan
    cache = sharding.init_cache(batch, cache_len, dtype)
    put = sharding.put  # host values, replicated: the same on every process
    put_batch = sharding.put_batch
    settings, base_key = put(settings), put(base_key)
  first_key = jax.random.fold_in(base_key, 0)
  for index in range(num_chunks):
    window = slice(index * chunk, (index + 1) * chunk)
    next_tokens, last_logits, finite, cache = _prefill_chunk_jit(
        params, put_batch(tokens[:, window]), put_batch(token_valid[:, window]),
        put(np.int32(index * chunk)), cache, put_batch(lengths - 1), put_batch(last_logits),
        first_key, settings, config=config, dtype=dtype, sharding=sharding)
  logits = last_logits

  active = np.ones(batch, bool)
  positions = lengths.copy()  # where each row's next token goes
  for step in range(1, sampling.max_new_tokens + 1):
    if not bool(finite):
      raise GrokMoeError(
          f"the model's logits are not finite (NaN or inf) at new token {step}: the "
          "weights hold non-finite values or the activations overflow in "
          f"{dtype}; check the checkpoint, or run in float32")
    new = np.asarray(next_tokens)
    yield Step(tokens=new, active=active.copy(), logits=logits)
    active &= (new != config.eos_token) & (positions < cache_len)
    if step == sampling.max_new_tokens or not active.any():
      return
    positions += active
    next_tokens, logits, finite, cache = _decode_step_jit(
        params, put_batch(new.astype(np.int32)), put_batch(active.copy()), cache,
        jax.random.fold_in(base_key, step), settings, config=config, dtype=dtype,
        sharding=sharding)

"""The sampler against the model: cached decoding, determinism, stopping, filters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import manifest, model, sampling
from grok_moe.config import TINY
from grok_moe.errors import InputError
from grok_moe.kv_cache import init_cache
from tests.helpers import random_params

CONFIG = TINY.replace(num_layers=2, sequence_len=48)
# float32 throughout: cached and uncached passes do the same arithmetic in a
# different order (keys of different lengths, scatter into the cache), so they
# agree to float32 rounding, far inside 1e-4.
TOLERANCE = 1e-4


@functools.lru_cache(maxsize=None)
def params():
  return manifest.unflatten(random_params(CONFIG, "release", seed=3))


def full_logits(sequences):
  """Logits [B, T, V] of one uncached pass; position t holds the prediction after t+1 tokens."""
  return np.asarray(model.forward(params(), np.asarray(sequences), CONFIG,
                                  dtype=jnp.float32).logits)


def relative(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def test_cached_decoding_matches_full_pass_for_ragged_batch():
  """A right-padded prompt batch prefilled into the cache, then decoded token by token,
  gives the logits of one uncached pass per row. Catches cache writes at wrong
  positions, padding that is attended to or counted in `lengths`, and validity read
  from the token ids: the padding here holds ordinary ids (and row 0 holds the pad
  id 0 as a real token), so only the explicit mask can tell them apart."""
  rng = np.random.default_rng(0)
  sequences = [rng.integers(3, CONFIG.vocab_size, size=n).tolist() for n in (11, 11, 11)]
  sequences[0][3] = CONFIG.pad_token  # a real token that happens to be the pad id
  prompt_lengths = [7, 2, 5]
  width = max(prompt_lengths)
  prompt = rng.integers(3, CONFIG.vocab_size, size=(3, width)).astype(np.int32)  # junk padding
  for row, length in enumerate(prompt_lengths):
    prompt[row, :length] = sequences[row][:length]
  token_valid = np.arange(width)[None, :] < np.array(prompt_lengths)[:, None]

  expected = full_logits(sequences)
  cache = init_cache(CONFIG, 3, 16, jnp.float32)
  out = model.forward(params(), prompt, CONFIG, dtype=jnp.float32, cache=cache,
                      token_valid=token_valid)
  assert out.cache.lengths.tolist() == prompt_lengths
  for row, length in enumerate(prompt_lengths):
    assert relative(out.logits[row, :length], expected[row, :length]) < TOLERANCE

  cache = out.cache
  positions = list(prompt_lengths)
  for _ in range(4):
    step_tokens = np.array([[sequences[row][positions[row]]] for row in range(3)], np.int32)
    out = model.forward(params(), step_tokens, CONFIG, dtype=jnp.float32, cache=cache)
    cache = out.cache
    for row in range(3):
      assert relative(out.logits[row, 0], expected[row, positions[row]]) < TOLERANCE
    positions = [p + 1 for p in positions]
  assert cache.lengths.tolist() == positions


def run(prompts, truncate=False, **settings):
  steps = list(sampling.generate(params(), CONFIG, prompts,
                                 sampling.SamplingConfig(**settings), dtype=jnp.float32,
                                 truncate=truncate))
  return steps, np.stack([step.tokens for step in steps], axis=1)


def test_sampler_logits_equal_model_logits_and_greedy_takes_argmax():
  prompts = [[5, 6, 7, 8, 9], [12, 13]]
  steps, tokens = run(prompts, max_new_tokens=5, temperature=0)
  for row, prompt in enumerate(prompts):
    sequence = list(prompt) + tokens[row].tolist()
    expected = full_logits([sequence])[0]
    for i, step in enumerate(steps):
      position = len(prompt) - 1 + i
      assert relative(step.logits[row], expected[position]) < TOLERANCE
      assert step.tokens[row] == np.argmax(expected[position])


def test_greedy_is_deterministic_and_seed_repeats_its_sample():
  prompts = [[5, 6, 7], [9]]
  _, greedy_a = run(prompts, max_new_tokens=6, temperature=0)
  _, greedy_b = run(prompts, max_new_tokens=6, temperature=0, seed=99)
  np.testing.assert_array_equal(greedy_a, greedy_b)
  _, sample_a = run(prompts, max_new_tokens=8, temperature=1.5, top_p=1.0, seed=7)
  _, sample_b = run(prompts, max_new_tokens=8, temperature=1.5, top_p=1.0, seed=7)
  _, sample_c = run(prompts, max_new_tokens=8, temperature=1.5, top_p=1.0, seed=8)
  np.testing.assert_array_equal(sample_a, sample_b)
  assert (sample_a != sample_c).any()


def test_eos_ends_a_row_and_all_rows_end_the_generation():
  prompts = [[5, 6, 7], [9, 10]]
  _, greedy = run(prompts, max_new_tokens=6, temperature=0)
  eos = int(greedy[0, 1])  # make a token row 0 produces the EOS token
  config = CONFIG.replace(eos_token=eos)
  steps = list(sampling.generate(params(), config, prompts,
                                 sampling.SamplingConfig(max_new_tokens=6, temperature=0),
                                 dtype=jnp.float32))
  for row in range(2):
    row_tokens = greedy[row].tolist()
    ends = row_tokens.index(eos) + 1 if eos in row_tokens else 6
    assert [bool(step.active[row]) for step in steps] == [i < ends for i in range(len(steps))]
    assert [int(step.tokens[row]) for step in steps[:ends]] == row_tokens[:ends]
  # The generation stops at the step where the last row ends.
  ends = [greedy[row].tolist().index(eos) + 1 if eos in greedy[row].tolist() else 6
          for row in range(2)]
  assert len(steps) == max(ends)


def test_max_new_tokens_and_context_limit():
  """max_new_tokens bounds the steps; a row whose context fills stops there, and a
  warning says the context cut generation short."""
  _, tokens = run([[5, 6], [7]], max_new_tokens=3, temperature=0)
  assert tokens.shape == (2, 3)
  long_prompt = list(range(4, 4 + CONFIG.sequence_len - 3))
  with pytest.warns(UserWarning, match="leaves room for 3 of the 10 new tokens"):
    steps, _ = run([long_prompt, [5]], max_new_tokens=10, temperature=0)
  # Positions len(prompt) .. sequence_len - 1 can be fed, and the last fed
  # token still predicts one more: 3 + 1 tokens in all.
  assert sum(int(step.active[0]) for step in steps) == 4


def test_prompt_checks():
  with pytest.raises(InputError, match="truncate"):
    sampling.check_prompts([list(range(1, CONFIG.sequence_len + 5))], CONFIG)
  kept = sampling.check_prompts([list(range(1, CONFIG.sequence_len + 5))], CONFIG, truncate=True)
  assert kept[0] == list(range(1, CONFIG.sequence_len + 5))[-(CONFIG.sequence_len - 1):]
  assert sampling.check_prompts([[]], CONFIG) == [[CONFIG.bos_token]]
  with pytest.raises(InputError, match="vocabulary"):
    sampling.check_prompts([[CONFIG.vocab_size]], CONFIG)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_settings(settings, message):
  with pytest.raises(InputError, match=message):
    sampling.SamplingConfig(**settings)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  sample_many = jax.jit(jax.vmap(sampling.sample_logits, in_axes=(None, 0, None, None, None)))

  def draws(k=0, p=1.0):
    tokens = sample_many(logits, keys, jnp.float32(1.0), jnp.float32(p), jnp.int32(k))
    return set(np.asarray(tokens).ravel().tolist())

  assert draws(k=2) == {0, 1}
  assert draws(p=0.75) == {0, 1}       # 0.5 < 0.75, 0.5 + 0.3 >= 0.75
  assert draws(p=0.4) == {0}           # the most likely token is always kept
  assert draws() == {0, 1, 2, 3}
  assert draws(k=3, p=0.9) == {0, 1, 2}


def test_buckets():
  assert sampling.bucket(1, 8192) == 16
  assert sampling.bucket(17, 8192) == 32
  assert sampling.bucket(5000, 4096) == 4096


def test_prompts_longer_than_the_prefill_chunk_give_the_one_pass_logits():
  """Prompts of 21 and 7 tokens prefilled in chunks of 8 (three passes, the short row's
  last token in the first chunk): every step's logits are those of one uncached pass
  over the whole sequence, and the greedy tokens its argmax. Catches chunks written at
  the wrong positions, a row's last-token logits taken from the wrong chunk, and
  chunks that do not see the earlier ones through the cache."""
  assert sampling.prefill_shapes(21, CONFIG, prefill_chunk=8) == (8, 3)
  assert sampling.prefill_shapes(7, CONFIG, prefill_chunk=8) == (8, 1)
  assert sampling.prefill_shapes(5, CONFIG, prefill_chunk=64) == (16, 1)  # a power of two
  rng = np.random.default_rng(4)
  prompts = [rng.integers(3, CONFIG.vocab_size, size=21).tolist(),
             rng.integers(3, CONFIG.vocab_size, size=7).tolist()]
  steps = list(sampling.generate(params(), CONFIG, prompts,
                                 sampling.SamplingConfig(max_new_tokens=4, temperature=0),
                                 dtype=jnp.float32, prefill_chunk=8))
  tokens = np.stack([step.tokens for step in steps], axis=1)
  for row, prompt in enumerate(prompts):
    expected = full_logits([prompt + tokens[row].tolist()])[0]
    for i, step in enumerate(steps):
      assert relative(step.logits[row], expected[len(prompt) - 1 + i]) < TOLERANCE
      assert step.tokens[row] == np.argmax(expected[len(prompt) - 1 + i])


def test_the_pad_id_is_an_ordinary_token_to_the_sampler():
  """A prompt holding the pad id (0) as text, and a row padded beside a longer one: the
  sampler's logits are those of the full pass in which every token is real. Catches
  padding inferred from token ids (id 0 skipped, or every id below pad_token)."""
  assert CONFIG.pad_token == 0
  prompts = [[5, 0, 7, 0, 9], [0, 12]]
  steps, tokens = run(prompts, max_new_tokens=3, temperature=0)
  for row, prompt in enumerate(prompts):
    expected = full_logits([prompt + tokens[row].tolist()])[0]
    for i, step in enumerate(steps):
      assert relative(step.logits[row], expected[len(prompt) - 1 + i]) < TOLERANCE
  high_pad = CONFIG.replace(pad_token=50)  # ids below it are real tokens too
  steps = list(sampling.generate(params(), high_pad, [[5, 6, 7]],
                                 sampling.SamplingConfig(max_new_tokens=1, temperature=0),
                                 dtype=jnp.float32))
  assert relative(steps[0].logits[0], full_logits([[5, 6, 7]])[0, 2]) < TOLERANCE


def test_truncate_keeps_room_for_the_new_tokens():
  """--truncate keeps the last sequence_len - max_new_tokens tokens, so the asked-for
  tokens fit (it kept sequence_len - 1, leaving room for one)."""
  long_prompt = list(range(1, CONFIG.sequence_len + 5))
  kept = sampling.check_prompts([long_prompt], CONFIG, truncate=True, max_new_tokens=10)
  assert kept[0] == long_prompt[-(CONFIG.sequence_len - 10):]
  steps, _ = run([long_prompt], max_new_tokens=10, temperature=0, truncate=True)
  assert sum(int(step.active[0]) for step in steps) == 10


def test_non_finite_logits_stop_generation_with_an_error():
  """Weights holding NaN give NaN logits: generation raises a GrokMoeError saying so
  instead of yielding tokens drawn from them."""
  from grok_moe import params as param_table
  from grok_moe.errors import GrokMoeError
  broken = param_table.flatten(param_table.as_stacked(params(), CONFIG))
  embeddings = np.array(broken[param_table.EMBEDDINGS.path])
  embeddings[5] = np.nan
  broken[param_table.EMBEDDINGS.path] = embeddings
  with pytest.raises(GrokMoeError, match="not finite"):
    list(sampling.generate(param_table.unflatten(broken), CONFIG, [[5, 6]],
                           sampling.SamplingConfig(max_new_tokens=2), dtype=jnp.float32))


def test_sampling_config_takes_numpy_integers_and_refuses_huge_seeds():
  """max_new_tokens, top_k and seed given as numpy integers are accepted (as ints); a
  seed that does not fit 64 bits is an InputError, not an OverflowError later."""
  config = sampling.SamplingConfig(max_new_tokens=np.int64(3), top_k=np.int32(2),
                                   seed=np.uint64(5))
  assert (config.max_new_tokens, config.top_k, config.seed) == (3, 2, 5)
  assert type(config.max_new_tokens) is int
  with pytest.raises(InputError, match="seed"):
    sampling.SamplingConfig(seed=99999999999999999999999)

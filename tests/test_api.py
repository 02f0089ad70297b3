"""grok_moe.Model on a tiny random model with a tokenizer made here."""

import numpy as np
import pytest

import grok_moe
from grok_moe import manifest
from tests.helpers import random_params, train_char_tokenizer

CONFIG = grok_moe.TINY.replace(sequence_len=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = tmp_path_factory.mktemp("api") / "tokenizer.model"
  train_char_tokenizer(path)
  params = manifest.unflatten(random_params(CONFIG, "release", seed=5))
  return grok_moe.Model(params, CONFIG, grok_moe.Tokenizer(path), dtype="float32")


def test_generate_stream_and_batch_agree(model):
  settings = dict(max_new_tokens=6, temperature=0.9, seed=4)
  single = model.generate("ROMEO:", **settings)
  assert isinstance(single, str)
  assert "".join(model.stream("ROMEO:", **settings)) == single
  batch = model.generate(["ROMEO:", "JULIET: O"], max_new_tokens=6, temperature=0)
  assert isinstance(batch, list) and len(batch) == 2
  assert batch[0] == model.generate("ROMEO:", max_new_tokens=6, temperature=0)
  assert model.last_stats.new_tokens > 0


def test_generate_tokens_single_and_batch(model):
  ids = model.tokenizer.encode("ROMEO:")
  new = model.generate_tokens(ids, max_new_tokens=5, temperature=0)
  assert isinstance(new, list) and all(isinstance(t, int) for t in new)
  assert 1 <= len(new) <= 5
  rows = model.generate_tokens([ids, ids[:2]], max_new_tokens=5, temperature=0)
  assert rows[0] == new
  # Greedy continuation is the argmax of the logits of the whole sequence.
  logits = model.logits([ids + new[:1]])
  assert logits.shape == (1, len(ids) + 1, CONFIG.vocab_size) and logits.dtype == np.float32
  assert int(np.argmax(logits[0, len(ids) - 1, :model.tokenizer.vocab_size])) == new[0]


def test_score_is_the_log_softmax_of_the_logits(model):
  text = "But soft"
  ids = model.tokenizer.encode(text)
  scores = model.score(text)
  logits = model.logits([[CONFIG.bos_token] + ids]).astype(np.float64)[0]
  peak = logits.max(-1, keepdims=True)
  log_probs = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
  expected = log_probs[np.arange(len(ids)), ids]
  np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
  assert scores.shape == (len(ids),) and (scores < 0).all()


def test_routing_shapes_and_gates(model):
  routing = model.routing("ROMEO:")
  steps = len(model.tokenizer.encode("ROMEO:"))
  k = CONFIG.num_selected_experts
  assert routing.expert_indices.shape == (CONFIG.num_layers, steps, k)
  assert routing.gates.shape == (CONFIG.num_layers, steps, k)
  assert ((routing.expert_indices >= 0) & (routing.expert_indices < CONFIG.num_experts)).all()
  assert (np.diff(routing.gates, axis=-1) <= 0).all() and (routing.gates.sum(-1) <= 1 + 1e-6).all()
  batched = model.routing(np.array([[5, 6, 7], [8, 9, 10]]))
  assert batched.expert_indices.shape == (CONFIG.num_layers, 2, 3, k)


def test_bad_token_input(model):
  with pytest.raises(grok_moe.InputError):
    model.logits([[CONFIG.vocab_size]])
  with pytest.raises(grok_moe.InputError):
    model.logits([[]])
  with pytest.raises(grok_moe.InputError):
    model.generate("x", temperature=-1)


def test_generation_stats_leave_the_two_compiling_steps_out_of_the_decode_rate():
  stats = grok_moe.GenerationStats()
  for tokens, elapsed in ((2, 3.0), (2, 5.0), (2, 5.5), (1, 6.0)):  # batch 2; a row ends
    stats.add_step(tokens, elapsed)
  assert (stats.new_tokens, stats.first_token_s, stats.second_token_s) == (7, 3.0, 5.0)
  assert stats.decode_tokens_per_s == 3 / 1.0
  assert grok_moe.GenerationStats().decode_tokens_per_s == 0.0

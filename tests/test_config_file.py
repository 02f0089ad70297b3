"""config.json as the loader reads it: each bad file of issue 12 finding 8 is a clean error.

Errors must name config.json and the field, come before anything is
allocated from the config, and never be a raw ValueError, OverflowError,
UnicodeDecodeError, RecursionError or MemoryError.
"""

import json
import os
import time

import numpy as np
import pytest

from grok_moe import checkpoint, config_file
from grok_moe.checkpoint import load_checkpoint
from grok_moe.config import BENCH, GROK_1, TINY, ModelConfig
from grok_moe.errors import CheckpointError, ConfigError


@pytest.fixture
def root(tmp_path):
  """A directory with an empty ckpt-0/ and a config.json to overwrite."""
  (tmp_path / "ckpt-0").mkdir()
  return tmp_path


def write_config(root, **changes):
  values = dict(TINY.to_dict(), **changes)
  (root / "config.json").write_text(json.dumps(values))


def refused(root, pattern):
  """The CheckpointError of loading `root`, which must name config.json and match `pattern`."""
  start = time.perf_counter()
  with pytest.raises(CheckpointError, match=pattern) as raised:
    load_checkpoint(root, progress=False)
  assert time.perf_counter() - start < 1.0  # refused before anything is built from it
  assert "config.json" in str(raised.value)
  return str(raised.value)


@pytest.mark.parametrize("field, value, pattern", [
    ("num_layers", 10**9, r"num_layers must be in \[1, 1024\]"),
    ("vocab_size", 10**12, r"vocab_size must be in"),
    ("emb_size", 2**20, r"emb_size must be in"),
    ("rms_norm_eps", -1, r"rms_norm_eps must be a finite number in \(0, 1.0\]"),
    ("pad_token", 0.5, r"pad_token must be an integer token id, got 0.5"),
    ("attn_output_multiplier", "x", r"attn_output_multiplier must be a finite number.*'x'"),
    ("num_experts", True, r"num_experts must be a positive integer, got True"),
    ("rope_base", 0, r"rope_base must be a finite number"),
])
def test_a_field_out_of_range_or_of_the_wrong_type_is_named(root, field, value, pattern):
  """Catches fields that loaded silently or failed later as bare errors (finding 8)."""
  write_config(root, **{field: value})
  refused(root, pattern)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_naming_the_field(root, literal):
  """Catches NaN or Infinity widening_factor reaching int() as a raw ValueError/OverflowError."""
  text = json.dumps(TINY.to_dict()).replace('"widening_factor": 2.5',
                                            f'"widening_factor": {literal}')
  (root / "config.json").write_text(text)
  refused(root, r"widening_factor must be a finite number")


@pytest.mark.parametrize("contents, pattern", [
    (b'{"vocab_size": 97\xff}', r"not UTF-8"),
    (b"[" * 20_000 + b"]" * 20_000, r"nests objects or arrays"),
    (b'{"vocab_size": ' + b"9" * 5000 + b"}", r"integer of 5000 digits"),
    (b'{"vocab_size": 97, "vocab_size": 98}', r"sets vocab_size twice"),
    (b'{"vocab_size": [97]}', r"nests objects or arrays"),
    (b"[1, 2]", r"must be an object"),
    (b"{not json", r"not valid JSON"),
])
def test_malformed_json_is_a_clean_error(root, contents, pattern):
  """Catches raw UnicodeDecodeError, RecursionError and ValueError from odd JSON."""
  (root / "config.json").write_bytes(contents)
  refused(root, pattern)


def test_a_huge_sparse_config_json_is_refused_without_reading_it(root):
  """Catches a 1 GiB config.json being read whole."""
  with open(root / "config.json", "wb") as file:
    file.truncate(2**30)
  refused(root, r"is over 65536 bytes")


@pytest.mark.parametrize("make", ["directory", "fifo", "dangling symlink"])
def test_a_config_json_that_is_not_a_file_is_a_clean_error(root, make):
  """Catches a config.json directory being ignored, a FIFO hanging, a raw OSError."""
  path = root / "config.json"
  if make == "directory":
    path.mkdir()
  elif make == "fifo":
    os.mkfifo(path)
  else:
    path.symlink_to(root / "nowhere")
  refused(root, r"config.json")


def test_the_config_inside_ckpt0_wins_over_the_one_beside_it(root):
  """Catches reading a stale root config.json beside a newer ckpt-0 (see checkpoint_dir)."""
  write_config(root, rope_base=1.0)
  (root / "ckpt-0" / "config.json").write_text(TINY.to_json())
  assert checkpoint.checkpoint_config(root) == TINY


def test_read_config_file_names_the_file(tmp_path):
  """Catches a ConfigError that does not say which file it is about."""
  path = tmp_path / "my.json"
  path.write_text(json.dumps(dict(TINY.to_dict(), num_layers=0)))
  with pytest.raises(ConfigError, match=rf"{path}: num_layers must be a positive integer"):
    config_file.read_config_file(path)
  path.write_text(TINY.to_json())
  assert config_file.read_config_file(path) == TINY


def test_every_preset_round_trips_through_json():
  """Catches ranges so tight that a real model (Grok-1 itself) is refused."""
  for config in (GROK_1, BENCH, TINY):
    assert ModelConfig.from_json(config.to_json()) == config


def test_a_numpy_nan_is_refused():
  """Catches a NaN passing a range check alone (NaN compares False with every bound)."""
  with pytest.raises(ConfigError, match=r"rms_norm_eps must be a finite number"):
    TINY.replace(rms_norm_eps=np.float64("nan"))

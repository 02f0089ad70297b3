"""Tests of grok_moe.checkpoint: the release format, safety, errors and atomic saves."""

import dataclasses
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time

import jax
import ml_dtypes
import numpy as np
import pytest

from grok_moe import checkpoint
from grok_moe import manifest
from grok_moe import quant
from grok_moe.checkpoint import load_checkpoint, quantize_params, save_checkpoint
from grok_moe.config import GROK_1, TINY
from grok_moe.errors import CheckpointError
from tests import helpers

# 12 layers: files come in the order layer 0, 1, 10, 11, 2, ..., 9.
CONFIG = TINY.replace(num_layers=12)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_float_params(config, seed=0):
  """Haiku params of float32 noise (tests.helpers layout "float")."""
  return manifest.unflatten(helpers.random_params(config, "float", seed))


def random_release_params(config, seed=0):
  """Haiku params in the release form: int8 + bfloat16 scales, float32 elsewhere."""
  return manifest.unflatten(helpers.random_params(config, "release", seed))


def assert_params_equal(actual, expected):
  """Same names, same kind of leaf, same dtypes and shapes, bitwise equal."""
  actual, expected = manifest.flatten(actual), manifest.flatten(expected)
  assert sorted(actual) == sorted(expected)
  for name, want in expected.items():
    got = actual[name]
    assert isinstance(got, quant.QuantizedWeight) == isinstance(want, quant.QuantizedWeight), name
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      got_leaf, want_leaf = np.asarray(got_leaf), np.asarray(want_leaf)
      assert got_leaf.dtype == want_leaf.dtype, name
      assert got_leaf.shape == want_leaf.shape, name
      assert got_leaf.tobytes() == want_leaf.tobytes(), name


def tensor_path(root, name, config=CONFIG):
  index = [entry.name for entry in manifest.checkpoint_manifest(config)].index(name)
  return root / "ckpt-0" / checkpoint.tensor_file_name(index)


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
  """Skip fsync: it makes each save ~10x slower here and no test can observe it.

  The killed-save test runs in a subprocess, where fsync is real.
  """
  monkeypatch.setattr(checkpoint.os, "fsync", lambda descriptor: None)


@pytest.fixture
def saved(tmp_path):
  """(checkpoint directory, params) of a release-form CONFIG checkpoint."""
  params = random_release_params(CONFIG)
  root = save_checkpoint(params, tmp_path / "demo", CONFIG, progress=False)
  return root, params


def load(path, config=None, **options):
  return load_checkpoint(path, config, progress=False, **options)


@pytest.fixture
def release_record_class(monkeypatch):
  """The release's `__main__.QuantizedWeight8bit`, registered as its loader did."""

  @dataclasses.dataclass
  class QuantizedWeight8bit:
    weight: np.ndarray
    scales: np.ndarray

  QuantizedWeight8bit.__module__ = "__main__"
  QuantizedWeight8bit.__qualname__ = "QuantizedWeight8bit"
  monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", QuantizedWeight8bit,
                      raising=False)
  return QuantizedWeight8bit


# --- Round trips and the format on disk. ---

@pytest.mark.parametrize("max_workers", [1, 3])
def test_save_then_load_is_exact(saved, max_workers):
  root, params = saved
  loaded = load(root, max_workers=max_workers)
  assert_params_equal(loaded, params)
  leaf = loaded["transformer/decoder_layer_0/moe/linear_1"]["w"]
  assert isinstance(leaf.weight, jax.Array) and leaf.weight.dtype == np.int8
  assert leaf.scales.dtype == ml_dtypes.bfloat16 and leaf.scales.shape[-2] == 8


def test_load_accepts_the_ckpt0_directory_itself(saved):
  root, params = saved
  assert_params_equal(load(root / "ckpt-0"), params)


def test_float_params_are_saved_quantized_in_the_release_layout(tmp_path):
  params = random_float_params(CONFIG)
  save_checkpoint(params, tmp_path, CONFIG, progress=False)
  loaded = load(tmp_path)
  assert_params_equal(loaded, quantize_params(params))
  for name, leaf in manifest.flatten(loaded).items():
    row_blocks = quant.row_blocks_for(name)
    if row_blocks is None:
      assert leaf.dtype == np.float32, name
    else:
      assert leaf.scales.shape[-2] == row_blocks, name


def test_files_follow_the_manifest_order_and_the_release_loader_reads_them(
    saved, release_record_class):
  root, params = saved
  flat = manifest.flatten(params)
  entries = manifest.checkpoint_manifest(CONFIG)
  assert entries[2 + 2 * 12].name.startswith("transformer/decoder_layer_10/")
  for entry in entries:
    data = (root / "ckpt-0" / f"tensor{entry.file_index:05d}_000").read_bytes()
    assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
    value = pickle.loads(data)  # as the release's own loader reads files
    want = flat[entry.name]
    if isinstance(want, quant.QuantizedWeight):
      assert isinstance(value, release_record_class), entry.name
      assert value.weight.tobytes() == want.weight.tobytes(), entry.name
      assert value.scales.tobytes() == want.scales.tobytes(), entry.name
      assert value.scales.dtype == ml_dtypes.bfloat16
    else:
      assert value.dtype == np.float32 and np.array_equal(value, want), entry.name


@pytest.mark.parametrize("protocol", [4, 5])
def test_files_pickled_with_numpy2_names_load(saved, release_record_class, protocol):
  root, params = saved
  uses_frombuffer = []
  for entry in manifest.checkpoint_manifest(CONFIG):
    leaf = manifest.flatten(params)[entry.name]
    if isinstance(leaf, quant.QuantizedWeight):
      leaf = release_record_class(weight=leaf.weight, scales=leaf.scales)
    # numpy 2's own reduce: numpy._core names; protocol 5 uses _frombuffer.
    data = pickle.dumps(leaf, protocol=protocol)
    assert b"numpy._core" in data
    uses_frombuffer.append(b"_frombuffer" in data)
    (root / "ckpt-0" / f"tensor{entry.file_index:05d}_000").write_bytes(data)
  assert any(uses_frombuffer) == (protocol == 5)
  assert_params_equal(load(root), params)


def test_large_tensors_round_trip(tmp_path):
  # Bytes objects over 64 KiB are written outside pickle frames; check that path.
  big = TINY.replace(emb_size=256, vocab_size=512, num_layers=1)
  params = random_release_params(big, seed=3)
  save_checkpoint(params, tmp_path, big, progress=False)
  assert_params_equal(load(tmp_path), params)


def test_place_gets_numpy_leaves_in_file_order(saved):
  root, _ = saved
  seen = []

  def place(name, leaf):
    seen.append(name)
    assert all(isinstance(array, np.ndarray) for array in jax.tree.leaves(leaf))
    return "placed"

  loaded = load(root, place=place, max_workers=3)
  assert seen == [entry.name for entry in manifest.checkpoint_manifest(CONFIG)]
  assert set(jax.tree.leaves(loaded)) == {"placed"}


def test_at_most_max_workers_plus_one_tensors_are_in_host_memory(saved, monkeypatch):
  root, _ = saved
  lock = threading.Lock()
  state = {"in_host": 0, "most": 0}
  read = checkpoint.read_tensor_file

  def counting_read(*args):
    leaf = read(*args)
    with lock:
      state["in_host"] += 1
      state["most"] = max(state["most"], state["in_host"])
    return leaf

  def slow_place(name, leaf):
    time.sleep(0.002)  # the readers get ahead if nothing bounds them
    with lock:
      state["in_host"] -= 1
    return leaf

  monkeypatch.setattr(checkpoint, "read_tensor_file", counting_read)
  load(root, place=slow_place, max_workers=2)
  assert 1 < state["most"] <= 2 + 1


def test_progress_bar_counts_bytes_and_tensors(saved, capsys):
  root, _ = saved
  load_checkpoint(root, progress=True)
  errors = capsys.readouterr().err
  n = len(manifest.checkpoint_manifest(CONFIG))
  assert f"{n}/{n} tensors" in errors and "B/s" in errors


# --- Safety. ---

class _RunsShellCommand:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(saved, tmp_path):
  root, _ = saved
  marker = tmp_path / "code_ran"
  tampered = root / "ckpt-0" / "tensor00005_000"
  payload = pickle.dumps(_RunsShellCommand(f"touch {marker}"), protocol=4)
  # Padded to the real file's size, past the loader's size check; pickle ignores the rest.
  tampered.write_bytes(payload.ljust(tampered.stat().st_size, b"\0"))
  with pytest.raises(CheckpointError, match=r"system") as raised:
    load(root)
  message = str(raised.value)
  assert "tensor00005_000" in message and "tampered" in message
  assert not marker.exists()
  pickle.loads(tampered.read_bytes())  # the same bytes under plain pickle do run it
  assert marker.exists()


def test_a_pickle_with_another_numpy_function_is_refused(saved):
  root, _ = saved
  path = tensor_path(root, "language_model/rms_norm/scale")
  path.write_bytes(pickle.dumps(np.ones, protocol=4).ljust(path.stat().st_size, b"\0"))
  with pytest.raises(CheckpointError, match=r"'numpy.ones'"):
    load(root)


# --- Bad inputs and their errors. ---

def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match=r"does not exist.*ckpt-0"):
    load(tmp_path / "nowhere", CONFIG)


def test_directory_without_ckpt0(tmp_path):
  with pytest.raises(CheckpointError, match=r"has no ckpt-0"):
    load(tmp_path, CONFIG)


def test_missing_tensor_file_names_file_and_parameter(saved):
  root, _ = saved
  name = "transformer/decoder_layer_10/router/w"
  path = tensor_path(root, name)
  path.unlink()
  with pytest.raises(CheckpointError, match=r"missing 1 tensor files") as raised:
    load(root)
  assert path.name in str(raised.value) and name in str(raised.value)
  assert "Re-download" in str(raised.value)


def test_extra_tensor_file(saved):
  root, _ = saved
  count = len(manifest.checkpoint_manifest(CONFIG))
  extra = root / "ckpt-0" / checkpoint.tensor_file_name(count)
  extra.write_bytes((root / "ckpt-0" / "tensor00000_000").read_bytes())
  with pytest.raises(CheckpointError, match=extra.name) as raised:
    load(root)
  assert f"holds {count + 1} tensor files" in str(raised.value)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999, 0.01])
def test_truncated_file(saved, keep_fraction):
  root, _ = saved
  path = tensor_path(root, "transformer/decoder_layer_1/moe/linear/w")
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep_fraction)])
  with pytest.raises(CheckpointError, match=r"truncated") as raised:
    load(root)
  assert path.name in str(raised.value) and "re-download" in str(raised.value).lower()


@pytest.mark.parametrize("contents", ["random", "empty", "trailing"])
def test_corrupt_file(saved, contents):
  root, _ = saved
  path = tensor_path(root, "transformer/decoder_layer_1/moe/linear/w")
  data = path.read_bytes()
  corrupt = {"random": np.random.default_rng(1).bytes(len(data)),
             "empty": b"",
             "trailing": data + b"\0garbage"}[contents]
  path.write_bytes(corrupt)
  with pytest.raises(CheckpointError, match=path.name) as raised:
    load(root)
  assert "re-download" in str(raised.value).lower()


def write_tensor(path, leaf):
  checkpoint._write_tensor_file(path, leaf)


def test_wrong_shape_names_parameter_expected_and_found(saved):
  root, _ = saved
  name = "transformer/decoder_layer_2/router/w"
  D, E = CONFIG.emb_size, CONFIG.num_experts
  write_tensor(tensor_path(root, name), np.zeros((E, D), np.float32))  # transposed
  with pytest.raises(CheckpointError) as raised:
    load(root)
  message = str(raised.value)
  assert name in message and f"({D}, {E})" in message and f"({E}, {D})" in message
  assert "pass the config" in message


def _bad_leaves():
  """Wrong forms of multi_head_attention/key/w [D=40, 16] and router/w [40, 4]."""
  D, KV = CONFIG.emb_size, CONFIG.kv_size
  int8 = np.zeros((D, KV), np.int8)
  return {
      "float64 instead of float32": (
          "router/w", np.zeros((D, CONFIG.num_experts), np.float64), r"as float64 array"),
      "quantized weight stored as float": (
          "key/w", np.zeros((D, KV), np.float32), r"as float32 array.*QuantizedWeight8bit"),
      "float32 scales": (
          "key/w", quant.QuantizedWeight(int8, np.ones((1, KV), np.float32)),
          r"scales: float32 array"),
      "int16 weight": (
          "key/w", quant.QuantizedWeight(int8.astype(np.int16),
                                         np.ones((1, KV), ml_dtypes.bfloat16)),
          r"weight: int16 array"),
      "3 row blocks for 40 rows": (
          "key/w", quant.QuantizedWeight(int8, np.ones((3, KV), ml_dtypes.bfloat16)),
          r"scales: bfloat16 array of shape \(3, 16\)"),
  }


@pytest.mark.parametrize("case", list(_bad_leaves()))
def test_wrong_dtype_or_layout(saved, case):
  root, _ = saved
  suffix, leaf, expected_text = _bad_leaves()[case]
  name = f"transformer/decoder_layer_3/multi_head_attention/{suffix}" \
      if suffix == "key/w" else f"transformer/decoder_layer_3/{suffix}"
  path = tensor_path(root, name)
  write_tensor(path, leaf)
  with pytest.raises(CheckpointError, match=expected_text) as raised:
    load(root)
  assert name in str(raised.value) and path.name in str(raised.value)


def test_config_json_is_written_and_read(saved):
  root, params = saved
  assert (root / "config.json").read_text() == CONFIG.to_json()
  assert checkpoint.checkpoint_config(root) == CONFIG
  assert_params_equal(load(root), params)


def test_a_config_that_differs_from_config_json_is_refused(saved):
  root, _ = saved
  with pytest.raises(CheckpointError, match=r"differs.*rope_base"):
    load(root, CONFIG.replace(rope_base=500.0))


def test_corrupt_config_json(saved):
  root, _ = saved
  (root / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match=r"config.json.*JSON"):
    load(root)


def test_no_config_json_needs_a_config(saved):
  root, params = saved
  (root / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"holds 146 tensor files.*Pass the config"):
    load(root)
  assert_params_equal(load(root, CONFIG), params)


def test_wrong_config_gives_a_count_error(saved):
  root, _ = saved
  (root / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"holds 146 tensor files.*needs 26"):
    load(root, TINY)


def test_770_tensors_without_config_json_are_grok_1(tmp_path):
  (tmp_path / "ckpt-0").mkdir()
  for index in range(770):
    (tmp_path / "ckpt-0" / checkpoint.tensor_file_name(index)).touch()
  assert checkpoint.checkpoint_config(tmp_path) is GROK_1
  with pytest.raises(CheckpointError, match=r"tensor00000_000.*truncated"):
    load(tmp_path)  # empty files: the first read fails


def test_save_refuses_a_quantized_weight_in_a_layout_the_loader_would_refuse(tmp_path):
  flat = manifest.flatten(random_release_params(CONFIG))
  name = "transformer/decoder_layer_0/multi_head_attention/key/w"  # [40, 16]
  flat[name] = quant.QuantizedWeight(flat[name].weight,
                                     np.ones((3, CONFIG.kv_size), ml_dtypes.bfloat16))
  with pytest.raises(CheckpointError, match=r"key/w.*R dividing K"):
    save_checkpoint(manifest.unflatten(flat), tmp_path, CONFIG, progress=False)


def test_save_refuses_params_that_do_not_fit_the_config(tmp_path):
  params = random_float_params(TINY)
  with pytest.raises(CheckpointError, match=r"120 missing \['transformer/decoder_layer_10/"):
    save_checkpoint(params, tmp_path, CONFIG, progress=False)
  assert not (tmp_path / "ckpt-0").exists()
  with pytest.raises(CheckpointError, match=r"shape"):
    save_checkpoint(params, tmp_path, TINY.replace(emb_size=48), progress=False)


# --- Atomic saves. ---

def test_save_refuses_an_existing_checkpoint_unless_overwrite(saved):
  root, params = saved
  (root / "tokenizer.model").write_bytes(b"tokenizer")
  new_params = random_release_params(CONFIG, seed=7)
  with pytest.raises(CheckpointError, match=r"overwrite=True"):
    save_checkpoint(new_params, root, CONFIG, progress=False)
  assert_params_equal(load(root), params)
  save_checkpoint(new_params, root, CONFIG, overwrite=True, progress=False)
  assert_params_equal(load(root), new_params)
  assert (root / "tokenizer.model").read_bytes() == b"tokenizer"
  assert sorted(path.name for path in root.iterdir()) == [
      "ckpt-0", "config.json", "tokenizer.model"]


def _fail_after(monkeypatch, files):
  """Make the tensor file writer raise once `files` files are written."""
  write = checkpoint._write_tensor_file
  written = []

  def failing_write(path, leaf):
    if len(written) == files:
      raise OSError("simulated crash")
    write(path, leaf)
    written.append(path)

  monkeypatch.setattr(checkpoint, "_write_tensor_file", failing_write)


def test_a_failed_first_save_leaves_nothing_loadable(tmp_path, monkeypatch):
  _fail_after(monkeypatch, files=40)
  with pytest.raises(OSError, match="simulated crash"):
    save_checkpoint(random_release_params(CONFIG), tmp_path / "demo", CONFIG, progress=False)
  assert list((tmp_path / "demo").iterdir()) == []
  with pytest.raises(CheckpointError):
    load(tmp_path / "demo", CONFIG)


def test_a_failed_overwrite_keeps_the_old_checkpoint(saved, monkeypatch):
  root, params = saved
  _fail_after(monkeypatch, files=40)
  with pytest.raises(OSError, match="simulated crash"):
    save_checkpoint(random_release_params(CONFIG, seed=5), root, CONFIG,
                    overwrite=True, progress=False)
  assert_params_equal(load(root), params)
  assert sorted(path.name for path in root.iterdir()) == ["ckpt-0", "config.json"]


def test_a_crash_between_the_renames_leaves_nothing_loadable(saved, monkeypatch):
  root, _ = saved

  def crash(*args):
    raise OSError("simulated crash")

  monkeypatch.setattr(checkpoint.os, "replace", crash)  # after the old ckpt-0 moved aside
  with pytest.raises(OSError, match="simulated crash"):
    save_checkpoint(random_release_params(CONFIG, seed=5), root, CONFIG,
                    overwrite=True, progress=False)
  with pytest.raises(CheckpointError, match=r"has no ckpt-0"):
    load(root)


_KILLED_SAVE = """
import os, sys
import numpy as np
from grok_moe import checkpoint, manifest
from grok_moe.config import TINY
config = TINY.replace(num_layers=12)
write, written = checkpoint._write_tensor_file, []
def write_then_die(path, leaf):
  if len(written) == 60:
    os._exit(9)  # no cleanup runs, as in a power cut
  write(path, leaf)
  written.append(path)
checkpoint._write_tensor_file = write_then_die
flat = {name: np.full(shape, 3.0, np.float32)
        for name, shape in manifest.parameter_shapes(config).items()}
checkpoint.save_checkpoint(manifest.unflatten(flat), sys.argv[1], config,
                           overwrite=True, progress=False)
"""


def test_a_killed_overwrite_keeps_the_old_checkpoint(saved):
  root, params = saved
  result = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(root)],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 9, result.stderr
  assert any(path.name.startswith(".ckpt-0.partial-") for path in root.iterdir())
  assert_params_equal(load(root), params)


# --- Quantization. ---

def test_quantize_params_error_bound_and_layout():
  """Per element, |weight * scale - w| <= scale / 2 + absmax * 2**-8.

  With s* = absmax / 127 over the element's (row block, column) and
  s = bfloat16(s*), |s - s*| <= 2**-8 * s* (bfloat16 keeps 8 significant
  bits). An element that is not clipped is rounded to the nearest multiple of
  s: error <= s / 2. One is clipped only when |w| / s > 127.5, hence s < s*;
  it becomes 127 * s and, since |w| <= 127 * s*, its error is at most
  127 * (s* - s) <= absmax * 2**-8. Products q * s are exact in float64.
  """
  rng = np.random.default_rng(2)
  params = random_float_params(CONFIG, seed=4)
  flat = manifest.flatten(params)
  # Give every row block and column its own magnitude, so a wrong layout fails.
  for name, w in flat.items():
    if quant.row_blocks_for(name) is not None:
      *batch, rows, cols = w.shape
      magnitudes = 10.0 ** rng.uniform(-3, 1, (*batch, 8, 1, cols))
      flat[name] = (w.reshape(*batch, 8, rows // 8, cols) * magnitudes  # [..., 8, K/8, N]
                    ).reshape(w.shape).astype(np.float32)
  quantized = manifest.flatten(quantize_params(manifest.unflatten(flat)))
  for name, w in flat.items():
    leaf = quantized[name]
    row_blocks = quant.row_blocks_for(name)
    if row_blocks is None:
      assert np.array_equal(np.asarray(leaf), w), name
      continue
    weight = np.asarray(leaf.weight).astype(np.float64)
    scales = np.asarray(leaf.scales).astype(np.float64)
    *batch, rows, cols = w.shape
    assert leaf.weight.dtype == np.int8 and leaf.scales.dtype == ml_dtypes.bfloat16
    assert scales.shape == (*batch, row_blocks, cols), name
    blocked = w.astype(np.float64).reshape(*batch, row_blocks, rows // row_blocks, cols)
    scale = scales[..., :, None, :]                                   # [..., R, 1, N]
    absmax = np.abs(blocked).max(axis=-2, keepdims=True)              # [..., R, 1, N]
    error = np.abs(weight.reshape(blocked.shape) * scale - blocked)   # [..., R, K/R, N]
    assert np.all(np.abs(scale - absmax / 127) <= 2**-8 * absmax / 127 * (1 + 1e-6)), name
    assert np.all(error <= scale / 2 + absmax * 2**-8 * (1 + 1e-6)), name
    assert error.max() > 0, name  # the bound is not met by accident of exactness

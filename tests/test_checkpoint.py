"""Tests of grok_moe.checkpoint: the release format, safety, errors and atomic saves."""

import dataclasses
import itertools
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_dtypes
import numpy as np
import pytest

from grok_moe import params as param_table
from grok_moe import checkpoint
from grok_moe import checkpoint_dir
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
  """Same release tensors (stacked params sliced by layer), same kind of leaf, same
  dtypes and shapes, bitwise equal."""
  actual, expected = param_table.release_form(actual), param_table.release_form(expected)
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


def to_release_layout(root):
  """Turn a saved checkpoint into the release layout: a plain ckpt-0/ of tensors, no config.json."""
  version = (root / "ckpt-0").resolve()
  (root / "ckpt-0").unlink()
  (root / "config.json").unlink()
  (version / "config.json").unlink()
  version.rename(root / "ckpt-0")


def visible_and_hidden(root):
  """(sorted names not starting with '.', sorted names that do) in `root`."""
  names = sorted(path.name for path in root.iterdir())
  return ([name for name in names if not name.startswith(".")],
          [name for name in names if name.startswith(".")])


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
  """Saving then loading gives back every tensor bit for bit, loaded stacked [L, ...] on
  the device with int8 weights kept int8."""
  root, params = saved
  loaded = load(root, max_workers=max_workers)
  assert_params_equal(loaded, params)
  leaf = param_table.flatten(loaded)[param_table.EXPERT_OUT.path]
  assert isinstance(leaf.weight, jax.Array) and leaf.weight.dtype == np.int8
  assert leaf.weight.shape[0] == CONFIG.num_layers
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
    row_blocks = param_table.row_blocks_for(name)
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
  to_release_layout(root)
  with pytest.raises(CheckpointError, match=r"holds 146 tensor files.*Pass the config"):
    load(root)
  assert_params_equal(load(root, CONFIG), params)


def test_wrong_config_gives_a_count_error(saved):
  root, _ = saved
  to_release_layout(root)
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
  visible, hidden = visible_and_hidden(root)
  assert visible == ["ckpt-0", "config.json", "tokenizer.model"]
  assert hidden == [os.readlink(root / "ckpt-0")]  # the old version was removed


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
  assert visible_and_hidden(root) == (["ckpt-0", "config.json"], [os.readlink(root / "ckpt-0")])


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


def test_a_killed_overwrite_keeps_the_old_checkpoint_and_the_next_load_cleans_up(saved):
  """Catches a save that writes into the live ckpt-0, and staging directories nothing removes."""
  root, params = saved
  result = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(root)],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 9, result.stderr
  _, hidden = visible_and_hidden(root)
  assert len(hidden) == 2  # the current version and the killed save's
  assert_params_equal(load(root), params)
  assert visible_and_hidden(root)[1] == [os.readlink(root / "ckpt-0")]


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
    if param_table.row_blocks_for(name) is not None:
      *batch, rows, cols = w.shape
      magnitudes = 10.0 ** rng.uniform(-3, 1, (*batch, 8, 1, cols))
      flat[name] = (w.reshape(*batch, 8, rows // 8, cols) * magnitudes  # [..., 8, K/8, N]
                    ).reshape(w.shape).astype(np.float32)
  quantized = manifest.flatten(quantize_params(manifest.unflatten(flat)))
  for name, w in flat.items():
    leaf = quantized[name]
    row_blocks = param_table.row_blocks_for(name)
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


# --- Atomic saves: killed at every file-system step. ---

KILL_CONFIG = TINY.replace(num_layers=1)  # 14 tensors: every step of a save stays fast
NEW_KILL_CONFIG = KILL_CONFIG.replace(rope_base=500.0)  # same shapes, another config.json
# The forked children below only write files; they never touch JAX's threads.
_FORK_IS_SAFE_HERE = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
_FILE_SYSTEM_STEPS = [(os, "mkdir"), (os, "replace"), (os, "rename"), (os, "symlink"),
                      (os, "unlink"), (os, "rmdir"), (os, "fsync"), (shutil, "rmtree"),
                      (checkpoint, "_write_tensor_file")]


def _save_killed_at(step, params, root, config):
  """Fork a child that saves `params` of `config` over `root`, _exiting before its `step`-th step.

  Steps are the calls in _FILE_SYSTEM_STEPS (every write, fsync, rename and
  removal). Returns the child's exit code: 9 if it was killed, 0 if the save
  finished first. os._exit runs no cleanup, as in a power cut.
  """
  pid = os.fork()
  if pid == 0:
    try:
      count = [0]
      for module, name in _FILE_SYSTEM_STEPS:
        original = getattr(module, name)

        def counted(*args, original=original, **kwargs):
          count[0] += 1
          if count[0] == step:
            os._exit(9)
          return original(*args, **kwargs)
        setattr(module, name, counted)
      save_checkpoint(params, root, config, overwrite=True, progress=False)
      os._exit(0)
    except BaseException:  # pylint: disable=broad-except
      os._exit(1)
  _, status = os.waitpid(pid, 0)
  return os.waitstatus_to_exitcode(status)


def _loads_as(root):
  """The flat params at root (numpy leaves), or None if it does not load."""
  try:
    return manifest.flatten(load(root, place=lambda name, leaf: leaf))
  except CheckpointError:
    return None


def _same(flat, params):
  return flat is not None and all(
      np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
      for name, leaf in manifest.flatten(params).items()
      for a, b in zip(jax.tree.leaves(flat[name]), jax.tree.leaves(leaf)))


@_FORK_IS_SAFE_HERE
@pytest.mark.parametrize("before", ["versioned", "plain ckpt-0", "empty"])
def test_a_save_killed_at_every_step_leaves_the_old_or_the_new_checkpoint(tmp_path, before):
  """Catches any instant at which the directory holds a mix, a partial ckpt-0 or no ckpt-0.

  The old checkpoint is a grok_moe save (ckpt-0 a symlink), a plain ckpt-0/
  with config.json beside it (replaced by RENAME_EXCHANGE; the old
  config.json must not be read with the new tensors), or nothing (then not
  loading at all is the old state). After each kill the
  next load must also remove what the killed save left behind.
  """
  old = random_release_params(KILL_CONFIG, seed=1)
  new = random_release_params(NEW_KILL_CONFIG, seed=2)
  pristine = tmp_path / "pristine"
  pristine.mkdir()
  if before != "empty":
    save_checkpoint(old, pristine, KILL_CONFIG, progress=False)
    if before == "plain ckpt-0":  # as earlier grok_moe versions saved
      to_release_layout(pristine)
      (pristine / "config.json").write_text(KILL_CONFIG.to_json())
  outcomes = []
  for step in itertools.count(1):
    root = tmp_path / f"step{step}"
    shutil.copytree(pristine, root, symlinks=True)
    code = _save_killed_at(step, new, root, NEW_KILL_CONFIG)
    assert code in (0, 9), f"step {step}: the child failed with {code}"
    flat = _loads_as(root)
    is_old = _same(flat, old) if before != "empty" else flat is None
    is_new = _same(flat, new)
    assert is_old or is_new, f"killed at step {step}: neither the old nor the new checkpoint"
    if is_new:  # the config came with the tensors
      assert checkpoint.checkpoint_config(root) == NEW_KILL_CONFIG
    if flat is not None:
      assert checkpoint_dir.leftovers(root) == [], f"step {step}: the load left leftovers"
    outcomes.append("new" if is_new else "old")
    shutil.rmtree(root)
    if code == 0:
      break
  assert outcomes[0] == "old" and outcomes[-1] == "new"
  assert outcomes == sorted(outcomes, reverse=True)  # old ... old new ... new: one switch
  assert step > 30  # every tensor write and fsync was a kill point


@_FORK_IS_SAFE_HERE
def test_a_second_save_into_the_same_directory_is_refused_while_one_runs(saved):
  """Catches two saves interleaving their versions and cleanups."""
  root, params = saved
  with checkpoint_dir._locked(root, blocking=False) as held:  # what a running save holds
    assert held
    pid = os.fork()
    if pid == 0:  # flock is per open file: another process must try
      try:
        save_checkpoint(params, root, CONFIG, overwrite=True, progress=False)
        os._exit(0)
      except CheckpointError as error:
        os._exit(3 if "another process is saving" in str(error) else 4)
      except BaseException:  # pylint: disable=broad-except
        os._exit(5)
    _, status = os.waitpid(pid, 0)
  assert os.waitstatus_to_exitcode(status) == 3


def test_save_to_a_path_that_is_a_file_is_a_checkpoint_error(tmp_path):
  """Catches the raw FileExistsError of issue 13 item 12."""
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match=r"cannot make the checkpoint directory"):
    save_checkpoint(random_release_params(KILL_CONFIG), tmp_path / "file", KILL_CONFIG,
                    progress=False)


def test_a_save_over_the_release_layout_replaces_it_and_its_config_json(saved):
  """Catches a stale config.json beside new tensors, and the old plain ckpt-0 left behind."""
  root, _ = saved
  to_release_layout(root)
  (root / "config.json").write_text(TINY.to_json())  # an old config.json beside ckpt-0/
  new = random_release_params(CONFIG, seed=9)
  save_checkpoint(new, root, CONFIG, overwrite=True, progress=False)
  assert_params_equal(load(root), new)
  assert (root / "ckpt-0").is_symlink() and (root / "config.json").is_symlink()
  assert (root / "config.json").read_text() == CONFIG.to_json()
  assert visible_and_hidden(root) == (["ckpt-0", "config.json"], [os.readlink(root / "ckpt-0")])


# --- File-system faults and non-finite weights: CheckpointErrors naming file and tensor. ---

ROUTER = "transformer/decoder_layer_1/router/w"


def _fault(path, fault, tmp_path):
  path.unlink()
  if fault == "directory":
    path.mkdir()
  elif fault == "dangling symlink":
    path.symlink_to(tmp_path / "nowhere")
  elif fault == "symlink loop":
    path.symlink_to(path.name)
  elif fault == "fifo":
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
  elif fault == "device":
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize("fault", ["directory", "dangling symlink", "symlink loop", "fifo",
                                   "device"])
def test_file_system_faults_are_checkpoint_errors(saved, tmp_path, fault):
  """Catches raw OSErrors (and a hang on a FIFO) from odd files in place of a tensor."""
  root, _ = saved
  path = tensor_path(root, ROUTER)
  _fault(path, fault, tmp_path)
  with pytest.raises(CheckpointError) as raised:
    load(root)
  assert path.name in str(raised.value) and ROUTER in str(raised.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_tensor_file_is_a_checkpoint_error(saved):
  """Catches a raw PermissionError (runs as a non-root user only: root ignores modes)."""
  root, _ = saved
  path = tensor_path(root, ROUTER)
  path.chmod(0)
  with pytest.raises(CheckpointError, match=r"permission") as raised:
    load(root)
  assert path.name in str(raised.value) and ROUTER in str(raised.value)


@pytest.mark.parametrize("name, value", [
    (ROUTER, np.nan),
    ("language_model/rms_norm/scale", np.inf),
    ("transformer/decoder_layer_4/moe/linear_1/w", -np.inf),  # in the bfloat16 scales
])
def test_non_finite_weights_fail_to_load_naming_file_and_tensor(saved, name, value):
  """Catches NaN/inf weights loading silently (issue 13 item 4)."""
  root, params = saved
  leaf = manifest.flatten(params)[name]
  if isinstance(leaf, quant.QuantizedWeight):
    scales = np.array(leaf.scales)
    scales.reshape(-1)[5] = value
    leaf = quant.QuantizedWeight(np.asarray(leaf.weight), scales)
  else:
    leaf = np.array(leaf)
    leaf.reshape(-1)[5] = value
  path = tensor_path(root, name)
  write_tensor(path, leaf)
  with pytest.raises(CheckpointError, match=r"holds -?(nan|inf) at flat index 5") as raised:
    load(root)
  assert path.name in str(raised.value) and name in str(raised.value)


# --- Ctrl-C. ---

_SLOW_LOAD = """
import sys, time
from grok_moe import checkpoint, release_pickle
release_pickle.READ_CHUNK_BYTES = 64  # many chunks, each slowed below
read_chunk = release_pickle._Decoder._check_stop
def slow_check_stop(self):
  print("reading", flush=True)
  time.sleep(0.05)
  read_chunk(self)
release_pickle._Decoder._check_stop = slow_check_stop
checkpoint.load_checkpoint(sys.argv[1], progress=False, max_workers=2)
"""


def test_ctrl_c_stops_a_slow_load_within_a_second(saved):
  """Catches a KeyboardInterrupt that waits for the reader threads to finish their files."""
  root, _ = saved
  child = subprocess.Popen([sys.executable, "-c", _SLOW_LOAD, str(root)], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    # the readers are in the middle of files (two threads may print on one line)
    assert child.stdout.readline().startswith("reading")
    time.sleep(0.2)
    interrupted = time.monotonic()
    child.send_signal(signal.SIGINT)
    child.wait(timeout=10)
    seconds = time.monotonic() - interrupted
  finally:
    child.kill()
  assert "KeyboardInterrupt" in child.stderr.read()
  assert seconds < 1.0, f"the load took {seconds:.2f} s to stop"

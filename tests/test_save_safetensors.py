"""save_checkpoint(..., format="safetensors"): Hugging Face checkpoints of each family.

Each family's committed fixture (tests/data/families/, read through
hf_checkpoint.load) is saved into tmp_path and read back. Exactness: the
fixtures are float32 and saving float32 params copies bits, so params must
come back bit-identical (no tolerance); an int8 weight dequantized to float32
is exact too (int8 times a bfloat16 scale fits float32's 24-bit significand).
The tests use no particular sizes of the fixtures.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from grok_moe import Model, checkpoint, convert, hf_checkpoint, hf_save, quant, sharding
from grok_moe import params as param_table
from grok_moe.config import TINY
from grok_moe.errors import CheckpointError
from grok_moe.safetensors_file import SafetensorsFile, header_bytes
from tests import helpers

FAMILIES_DIR = pathlib.Path(__file__).parent / "data" / "families"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


@functools.lru_cache(maxsize=None)
def _fixture(family: str):
  """(config, float32 params) of a family's fixture."""
  return hf_checkpoint.load(FAMILIES_DIR / family)


def _save(params, root, config, **options):
  return checkpoint.save_checkpoint(params, root, config, format="safetensors",
                                    progress=False, **options)


def _tensors(root: pathlib.Path) -> dict[str, np.ndarray]:
  """{name: array} of every tensor in the safetensors files at the top of `root`."""
  tensors = {}
  for path in sorted(root.glob("*.safetensors")):
    file = SafetensorsFile(path)
    for name in file.names():
      assert name not in tensors, f"{name} is in two files"
      tensors[name] = np.array(file.view(name))
  return tensors


def _assert_same_params(got, want):
  got, want = param_table.flatten(got), param_table.flatten(want)
  assert set(got) == set(want)
  for path in want:
    assert got[path].dtype == want[path].dtype, path
    assert np.array_equal(np.asarray(got[path]), np.asarray(want[path])), path


def _visible(root: pathlib.Path) -> list[str]:
  """The names a Hugging Face reader sees at the top of `root` (not the version store)."""
  return sorted(name for name in os.listdir(root)
                if not name.startswith(".") and name != "ckpt-0")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_family_loads_back_bit_identical_with_an_equal_config(tmp_path, family):
  """Catches a tensor written under another entry's name, transposed the wrong way or
  with its experts out of order, and a config.json field that reads back differently
  (family, sizes, rope_theta, rms_norm_eps, norm_topk_prob, biases, shared expert)."""
  config, params = _fixture(family)
  root = _save(params, tmp_path / "saved", config)
  loaded_config, loaded = hf_checkpoint.load(root)
  assert loaded_config == config
  _assert_same_params(loaded, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_names_shapes_and_config_are_the_hubs(tmp_path, family):
  """The saved tensors are exactly the fixture's (same names, per expert, same [out, in]
  shapes and values), in one model.safetensors without an index, and config.json names
  the same model_type and architectures. Catches a stacked tensor written whole, a
  missing or extra tensor (an lm_head with tied embeddings, biases Mixtral lacks) and
  a name map that only our own reader accepts."""
  config, params = _fixture(family)
  root = _save(params, tmp_path / "saved", config)
  assert _visible(root) == ["config.json", "model.safetensors"]
  saved, source = _tensors(root), _tensors(FAMILIES_DIR / family)
  assert {name: a.shape for name, a in saved.items()} == {n: a.shape for n, a in source.items()}
  for name, array in source.items():
    assert np.array_equal(saved[name], array), name
  written = json.loads((root / "config.json").read_text())
  original = json.loads((FAMILIES_DIR / family / "config.json").read_text())
  assert (written["model_type"], written["architectures"]) == (
      original["model_type"], original["architectures"])
  assert written["torch_dtype"] == "float32"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sharded_save_has_the_hubs_files_and_index_and_loads_back(tmp_path, family):
  """Files of at most max_shard_bytes (a third of the data), named
  model-0000i-of-0000n.safetensors, with an index whose weight_map says where each
  tensor is and whose total_size is the data's bytes. Catches a shard over the limit,
  an index that points at the wrong file and a sharded save that does not load."""
  config, params = _fixture(family)
  total = sum(np.asarray(a).nbytes for a in _tensors(FAMILIES_DIR / family).values())
  limit = total // 3
  root = _save(params, tmp_path / "saved", config, max_shard_bytes=limit)
  files = sorted(root.glob("*.safetensors"))
  count = len(files)
  assert count >= 3
  assert [path.name for path in files] == [hf_save.shard_file_name(i, count)
                                           for i in range(1, count + 1)]
  index = json.loads((root / hf_checkpoint.INDEX_FILE).read_text())
  assert index["metadata"]["total_size"] == total
  for path in files:
    file = SafetensorsFile(path)
    sizes = [np.asarray(file.view(name)).nbytes for name in file.names()]
    assert sum(sizes) <= limit or len(sizes) == 1, path.name
    assert all(index["weight_map"][name] == path.name for name in file.names())
  assert len(index["weight_map"]) == len(_tensors(root))
  loaded_config, loaded = hf_checkpoint.load(root)
  assert loaded_config == config
  _assert_same_params(loaded, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reference_reader_reads_what_we_write(tmp_path, family):
  """safetensors' own reader (in the [test] extra; the library never imports it) reads
  every file written, sharded and not, to the fixture's arrays. Catches a header it
  rejects (padding, offsets with gaps, a wrong dtype name) that our lenient reader
  accepts."""
  import safetensors.numpy as reference  # noqa: PLC0415
  config, params = _fixture(family)
  source = _tensors(FAMILIES_DIR / family)
  for name, limit in (("one", hf_save.MAX_SHARD_BYTES), ("shards", 4096)):
    root = _save(params, tmp_path / name, config, max_shard_bytes=limit)
    read = {}
    for path in root.glob("*.safetensors"):
      read.update(reference.load_file(path))
    assert set(read) == set(source)
    for tensor, array in source.items():
      assert read[tensor].dtype == array.dtype and np.array_equal(read[tensor], array), tensor


def test_header_is_padded_to_8_bytes_and_the_data_is_contiguous():
  """Catches a header whose length is not a multiple of 8 (unaligned data) or offsets
  with gaps or overlaps."""
  entries = [("b", np.dtype(ml_dtypes.bfloat16), (3,)), ("a", np.dtype(np.float32), (2, 5)),
             ("c", np.dtype(np.int8), (7,))]
  data = header_bytes(entries)
  length = int.from_bytes(data[:8], "little")
  assert length == len(data) - 8 and length % 8 == 0
  header = json.loads(data[8:])
  assert header.pop("__metadata__") == {"format": "pt"}
  assert [header[name]["data_offsets"] for name, _, _ in entries] == [[0, 6], [6, 46],
                                                                       [46, 53]]
  assert [header[name]["dtype"] for name, _, _ in entries] == ["BF16", "F32", "I8"]


def test_int8_weights_are_dequantized_exactly_to_float32(tmp_path):
  """Int8 QuantizedWeight params come out as float32 equal to dequantize() (exactly).
  Catches int8 bytes written as they are and scales applied over the wrong rows."""
  config, float_params = _fixture("mixtral")
  params = param_table.flatten(float_params)
  for spec in param_table.params_for(config):  # int8 on the device, 8 row blocks where they fit
    if spec.quantized:
      weight = np.asarray(params[spec.path])
      params[spec.path] = jax.device_put(quant.quantize(
          weight, spec.blocks_for_rows(weight.shape[-2])))
  params = param_table.unflatten(params)
  root = _save(params, tmp_path / "int8", config)
  _, loaded = hf_checkpoint.load(root)
  flat = param_table.flatten(params)
  assert any(isinstance(leaf, quant.QuantizedWeight) for leaf in flat.values())
  for path, leaf in param_table.flatten(loaded).items():
    assert leaf.dtype == np.float32, path
    assert np.array_equal(np.asarray(leaf), helpers.dequantized(flat[path])), path


def test_dtype_bfloat16_writes_every_tensor_rounded_once_and_it_loads(tmp_path):
  """dtype="bfloat16" writes every tensor as BF16, the float32 values rounded once, and
  the bfloat16 checkpoint (what the hub's are) loads back to those values. Catches a
  dtype= that is ignored, and a loader that refuses bfloat16 tensors."""
  config, float_params = _fixture("mixtral")
  root = _save(float_params, tmp_path / "bf16", config, dtype="bfloat16")
  assert {array.dtype for array in _tensors(root).values()} == {np.dtype(ml_dtypes.bfloat16)}
  _, loaded = hf_checkpoint.load(root)
  for path, leaf in param_table.flatten(float_params).items():
    want = np.asarray(leaf).astype(ml_dtypes.bfloat16)
    assert np.array_equal(np.asarray(param_table.flatten(loaded)[path]), want), path


@pytest.mark.parametrize("mode", ["expert", "tensor"])
def test_params_sharded_on_a_mesh_save_as_on_one_device(tmp_path, mode):
  """Params laid out on a 2-device mesh (whole experts, or every expert's FFN columns,
  split) are written tensor by tensor to the same files. Catches a save that reads
  only the first device's shard or puts a shard's columns in the wrong place."""
  config, _ = _fixture("qwen3_moe")
  plan = sharding.ShardingPlan(config, sharding.make_mesh(
      1, 2, devices=jax.devices()[:2]), mode)
  _, placed = hf_checkpoint.load(FAMILIES_DIR / "qwen3_moe", sharding=plan)
  experts = param_table.flatten(placed)[param_table.EXPERT_IN.path]
  assert len({str(shard.index) for shard in experts.addressable_shards}) == 2  # really split
  root = _save(placed, tmp_path / "saved", config)
  source = _tensors(FAMILIES_DIR / "qwen3_moe")
  saved = _tensors(root)
  assert set(saved) == set(source)
  assert all(np.array_equal(saved[name], source[name]) for name in source)


def test_a_config_of_no_hugging_face_family_is_refused_with_the_way_out(tmp_path):
  """Grok-1's switches (post-norms, multipliers, tied embeddings, a soft cap) and one
  switch Mixtral lacks are refused before anything is written, naming the release
  format and the differing field. Catches a silent save that reads back as another
  model."""
  with pytest.raises(CheckpointError, match=r"format=\"release\""):
    _save(param_table.init_params(TINY), tmp_path / "grok", TINY)
  config, params = _fixture("mixtral")
  params = param_table.flatten(params)
  for layer_norm in ("rms_norm_1/scale", "rms_norm_3/scale"):  # what post_norms adds
    params[f"{param_table.LAYERS_MODULE}/{layer_norm}"] = np.ones(
        (config.num_layers, config.emb_size), np.float32)
  with pytest.raises(CheckpointError, match="post_norms"):
    _save(params, tmp_path / "post_norms", config.replace(post_norms=True))
  assert not (tmp_path / "grok").exists() and not (tmp_path / "post_norms").exists()


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tmp_path):
  """Catches a second save that silently replaces the first, and overwrite=True that
  leaves the old tensors."""
  config, params = _fixture("qwen2_moe")
  root = _save(params, tmp_path / "saved", config)
  other = jax.tree.map(lambda leaf: np.asarray(leaf) * 2, params)
  with pytest.raises(CheckpointError, match="overwrite=True"):
    _save(other, root, config)
  _assert_same_params(hf_checkpoint.load(root)[1], params)
  _save(other, root, config, overwrite=True)
  _assert_same_params(hf_checkpoint.load(root)[1], other)


class _FailingLeaf:
  """A stacked leaf of the right shape and dtype whose values cannot be read."""

  def __init__(self, like, error):
    self.shape, self.dtype, self.error = like.shape, like.dtype, error

  def __getitem__(self, index):
    raise self.error


@pytest.mark.parametrize("error", [RuntimeError("device lost"), KeyboardInterrupt()])
def test_a_save_that_fails_midway_leaves_the_old_checkpoint(tmp_path, error):
  """A tensor that raises (an error, or Ctrl-C) partway through the files: the old
  checkpoint loads as it was, with no new or half-written file beside it. Catches
  tensors written in place over the old files."""
  config, params = _fixture("mixtral")
  root = _save(params, tmp_path / "saved", config, max_shard_bytes=4096)
  before = sorted(os.listdir(root))
  flat = param_table.flatten(jax.tree.map(lambda leaf: np.asarray(leaf) * 2, params))
  last = param_table.layer_params_for(config)[-1].path  # written in the last layers' files
  flat[last] = _FailingLeaf(flat[last], error)
  with pytest.raises(type(error)):
    _save(param_table.unflatten(flat), root, config, overwrite=True, max_shard_bytes=4096)
  assert sorted(os.listdir(root)) == before
  loaded_config, loaded = hf_checkpoint.load(root)
  assert loaded_config == config
  _assert_same_params(loaded, params)


def test_overwriting_a_plain_hub_directory_replaces_its_shards_and_keeps_the_rest(tmp_path):
  """Saving one file over a hub directory of several shards removes the old shards and
  index (else the stale index would be read), keeps tokenizer.json, and
  Model.from_checkpoint loads it with its tokenizer. Catches files of the previous
  checkpoint left behind."""
  root = tmp_path / "mixtral"
  shutil.copytree(FAMILIES_DIR / "mixtral", root)
  assert (root / hf_checkpoint.INDEX_FILE).exists()
  config, params = _fixture("mixtral")
  doubled = jax.tree.map(lambda leaf: np.asarray(leaf) * 2, params)
  _save(doubled, root, config, overwrite=True)
  names = _visible(root)
  assert "model.safetensors" in names and hf_checkpoint.INDEX_FILE not in names
  assert [name for name in names if name.endswith(".safetensors")] == ["model.safetensors"]
  assert "tokenizer.json" in names
  model = Model.from_checkpoint(root, progress=False, compilation_cache=False)
  assert model.config == config and model.tokenizer is not None
  _assert_same_params(model.params, doubled)


def test_the_two_formats_replace_each_other_in_one_directory(tmp_path):
  """A release-format save over a safetensors one (and back) leaves a directory that
  loads as the newer format, with no links to the other's files. Catches dangling
  links to the old version's shards that make the directory look like both."""
  config, params = _fixture("qwen3_moe")
  root = _save(params, tmp_path / "saved", config)
  checkpoint.save_checkpoint(params, root, config, overwrite=True, progress=False)
  assert not hf_checkpoint.is_hf_checkpoint(root)
  assert not list(root.glob("*.safetensors"))
  assert checkpoint.checkpoint_config(root) == config
  checkpoint.load_checkpoint(root, progress=False)
  _save(params, root, config, overwrite=True)
  assert hf_checkpoint.is_hf_checkpoint(root)
  _assert_same_params(hf_checkpoint.load(root)[1], params)


class _Stop(BaseException):
  """Raised in place of one file-system step of a save."""


_SAVE_STEPS = [(os, "mkdir"), (os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"),
               (os, "rmdir"), (os, "fsync"), (shutil, "rmtree"), (hf_save, "write_safetensors")]


def test_a_save_stopped_at_every_step_leaves_the_old_or_the_new_checkpoint(tmp_path,
                                                                            monkeypatch):
  """A sharded save over a sharded save of the same names, stopped by an exception at
  each of its file-system steps in turn (every file write, fsync, link, rename and
  removal): the directory loads as the complete old or the complete new checkpoint,
  old before some step and new from then on. Catches a step after which the files
  mix versions, or none loads."""
  config, params = _fixture("mixtral")
  new = jax.tree.map(lambda leaf: np.asarray(leaf) * 2, params)
  limit = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params)) // 3  # 3 or 4 files
  pristine = _save(params, tmp_path / "pristine", config, max_shard_bytes=limit)
  outcomes = []
  step = 0
  while True:
    step += 1
    root = tmp_path / f"step{step}"
    shutil.copytree(pristine, root, symlinks=True)
    count = [0]
    with monkeypatch.context() as patch:
      for module, name in _SAVE_STEPS:
        def counted(*args, original=getattr(module, name), **kwargs):
          count[0] += 1
          if count[0] == step:
            raise _Stop()
          return original(*args, **kwargs)
        patch.setattr(module, name, counted)
      try:
        _save(new, root, config, overwrite=True, max_shard_bytes=limit)
        finished = True
      except _Stop:
        finished = False
    loaded = param_table.flatten(hf_checkpoint.load(root)[1])
    is_new = all(np.array_equal(loaded[path], leaf)
                 for path, leaf in param_table.flatten(new).items())
    is_old = all(np.array_equal(loaded[path], leaf)
                 for path, leaf in param_table.flatten(params).items())
    assert is_old or is_new, f"stopped at step {step}: neither the old nor the new checkpoint"
    outcomes.append("new" if is_new else "old")
    shutil.rmtree(root)
    if finished:
      break
  assert outcomes[0] == "old" and outcomes[-1] == "new"
  assert outcomes == sorted(outcomes, reverse=True)  # old ... old new ... new: one switch
  assert step > 10  # every file write and fsync was a stop point


# --- python -m grok_moe.convert ---

def test_convert_goes_to_the_release_format_and_back_with_the_tokenizer(tmp_path):
  """A Hugging Face checkpoint converted to the release format and back: the weights the
  release quantizes come back as exactly their int8 values times their scales (the
  release's quantization, recomputed here in NumPy), the others unchanged, and
  tokenizer.json travels along. Catches a converter that loses the tokenizer, reads the
  release checkpoint with the wrong config, or writes other values than it loaded."""
  source = tmp_path / "source"
  shutil.copytree(FAMILIES_DIR / "qwen3_moe", source)
  config, params = _fixture("qwen3_moe")
  assert convert.main([str(source), str(tmp_path / "release"), "--format", "release"]) == 0
  assert checkpoint.checkpoint_config(tmp_path / "release") == config
  assert convert.main([str(tmp_path / "release"), str(tmp_path / "back"),
                       "--format", "safetensors"]) == 0
  loaded_config, loaded = hf_checkpoint.load(tmp_path / "back")
  assert loaded_config == config
  loaded = param_table.flatten(loaded)
  for spec in param_table.params_for(config):
    original = np.asarray(param_table.flatten(params)[spec.path])
    want = original
    if spec.quantized:
      want = helpers.dequantized(quant.quantize(original, spec.blocks_for_rows(original.shape[-2])))
    assert np.array_equal(np.asarray(loaded[spec.path]), want), spec.path
  for directory in ("release", "back"):
    assert ((tmp_path / directory / "tokenizer.json").read_bytes()
            == (source / "tokenizer.json").read_bytes())


def test_convert_of_a_config_no_family_has_is_one_error_line_and_writes_nothing(tmp_path,
                                                                              capsys):
  """Catches a traceback, or a half-made destination, for a Grok-style checkpoint asked
  for as safetensors."""
  checkpoint.save_checkpoint(param_table.init_params(TINY), tmp_path / "grok", TINY,
                             progress=False)
  code = convert.main([str(tmp_path / "grok"), str(tmp_path / "out"), "--format",
                       "safetensors"])
  error = capsys.readouterr().err.strip()
  assert code == 2 and error.startswith("error: ") and "\n" not in error
  assert 'format="release"' in error
  assert not (tmp_path / "out").exists()

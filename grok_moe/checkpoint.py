"""Reading and writing checkpoints in the format of the Grok-1 release.

A checkpoint directory D holds `D/ckpt-0/tensor{i:05d}_000`, one pickled tensor
per file in the order of `manifest.checkpoint_manifest`, and, for any config
other than Grok-1, `D/config.json`. Float-only tensors (embeddings, norm
scales, router) are float32 numpy arrays; every other weight is a
`__main__.QuantizedWeight8bit` record of an int8 `weight` and bfloat16
`scales` in the layout `param_table.row_blocks_for` gives it.

Loading (`load_checkpoint`):
  1. Find ckpt-0 and the config (argument, config.json, or Grok-1 for 770 files).
  2. Check that the tensor files are exactly the ones the config needs.
  3. Read files on a few threads, at most `max_workers` ahead of the caller;
     each file is unpickled by `release_pickle.SafeUnpickler`, which builds numpy arrays and
     QuantizedWeight8bit records and refuses every other global, so no code
     from a file ever runs.
  4. Check each tensor's kind, dtype and shape against the config, hand it to
     `place` (one device by default, a mesh for a sharding `place`) in file
     order, and drop the host copy. Host memory holds at most
     max_workers + 1 tensors at a time.

Saving (`save_checkpoint`) quantizes float weights the way the release did,
writes every file into a hidden staging directory beside ckpt-0, fsyncs it and
renames it into place, so a crash never leaves a half-written ckpt-0.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import uuid
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tqdm

from grok_moe import params as param_table
from grok_moe import manifest
from grok_moe import quant, release_pickle
from grok_moe import sharding as sharding_module
from grok_moe.config import GROK_1, ModelConfig
from grok_moe.errors import CheckpointError, ConfigError
from grok_moe.sharding import ShardingPlan

TENSOR_DIR = "ckpt-0"
CONFIG_FILE = "config.json"
_TENSOR_FILE_PATTERN = re.compile(r"tensor\d{5}_\d{3}")

Place = Callable[[str, Any], Any]


def tensor_file_name(index: int) -> str:
  """Name of the file that holds tensor `index` of the manifest."""
  return f"tensor{index:05d}_000"


def _write_tensor_file(path: pathlib.Path, leaf) -> None:
  """Pickle one release-form tensor into `path` and fsync it."""
  with open(path, "wb") as file:
    release_pickle.ReleasePickler(file).dump(leaf)
    file.flush()
    os.fsync(file.fileno())


# --- Checking one tensor against the config. ---

def _describe(value) -> str:
  if isinstance(value, np.ndarray):
    return f"{value.dtype} array of shape {tuple(value.shape)}"
  if isinstance(value, release_pickle.QuantizedWeight8bitRecord):
    return (f"QuantizedWeight8bit(weight: {_describe(value.weight)}, "
            f"scales: {_describe(value.scales)})")
  return f"{type(value).__module__}.{type(value).__qualname__}"


def _expected_form(name: str, shape: tuple[int, ...]) -> str:
  if param_table.row_blocks_for(name) is None:
    return f"float32 array of shape {shape}"
  *batch, rows, cols = shape
  return (f"QuantizedWeight8bit(weight: int8 array of shape {shape}, scales: bfloat16 "
          f"array of shape {(*batch, 'R', cols)} with R dividing {rows})")


def _is_quantized_weight_of_shape(weight, scales, shape: tuple[int, ...]) -> bool:
  """Whether weight is int8 [..., K, N] = shape and scales bfloat16 [..., R, N], R dividing K."""
  *batch, rows, cols = shape
  return (isinstance(weight, np.ndarray) and isinstance(scales, np.ndarray)
          and weight.dtype == np.int8 and weight.shape == tuple(shape)
          and scales.dtype == ml_dtypes.bfloat16 and scales.ndim == len(shape)
          and scales.shape[:-2] == tuple(batch) and scales.shape[-1] == cols
          and scales.shape[-2] >= 1 and rows % scales.shape[-2] == 0)


def _check_tensor(value, name: str, shape: tuple[int, ...], file_path: pathlib.Path):
  """`value` as a library leaf if it is the tensor `name` of `shape`, else CheckpointError.

  Float-only parameters must be float32 arrays; all others a QuantizedWeight8bit
  with an int8 weight of `shape` and bfloat16 scales [..., R, N] with R
  dividing K (the release uses R = 1 and R = 8). Nothing is converted, so a
  model is never silently changed.
  """
  if param_table.row_blocks_for(name) is None:
    if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.shape == shape:
      return value
  elif isinstance(value, release_pickle.QuantizedWeight8bitRecord):
    if _is_quantized_weight_of_shape(value.weight, value.scales, shape):
      return quant.QuantizedWeight(weight=value.weight, scales=value.scales)
  raise CheckpointError(
      f"{file_path} holds {name} as {_describe(value)}; expected "
      f"{_expected_form(name, shape)}. If the file is intact, the checkpoint was made "
      "for another model: pass the config it was made with.")


def _minimum_file_size(name: str, shape: tuple[int, ...]) -> int:
  """Bytes of tensor data a file holding `name` must at least contain."""
  if param_table.row_blocks_for(name) is None:
    return math.prod(shape) * 4
  *batch, _, cols = shape
  return math.prod(shape) + math.prod(batch) * cols * 2  # int8 weight + >= 1 row of bf16 scales


def _read_tensor_file(file_path: pathlib.Path, entry: manifest.TensorEntry):
  """Unpickle one tensor file safely and check it; returns numpy-backed leaf."""
  try:
    size = file_path.stat().st_size
  except FileNotFoundError:
    raise CheckpointError(
        f"tensor file {file_path} ({entry.name}) is missing; re-download "
        f"{file_path.name}.") from None
  needed = _minimum_file_size(entry.name, entry.shape)
  if size < needed:
    raise CheckpointError(
        f"{file_path} ({entry.name}) has {size} bytes, but a tensor of shape "
        f"{entry.shape} needs at least {needed}: the file is truncated or does not "
        f"belong to this config. Re-download {file_path.name}, or pass the config "
        "the checkpoint was made with.")
  with open(file_path, "rb") as file:
    try:
      value = release_pickle.SafeUnpickler(release_pickle.BoundedReader(file, size), file_path).load()
    except CheckpointError:
      raise
    except Exception as error:  # a corrupt pickle can fail in many ways
      raise CheckpointError(
          f"{file_path} ({entry.name}) is truncated or corrupt "
          f"({type(error).__name__}: {error}); re-download {file_path.name}.") from None
    trailing = size - file.tell()
  if trailing:
    raise CheckpointError(
        f"{file_path} ({entry.name}) has {trailing} unexpected bytes after its "
        f"tensor: the file is corrupt; re-download {file_path.name}.")
  return _check_tensor(value, entry.name, entry.shape, file_path)


# --- Where a checkpoint lives, and its config. ---

def _checkpoint_dirs(path) -> tuple[pathlib.Path, pathlib.Path]:
  """(root, tensor_dir) for a path to D or D/ckpt-0: config.json lives in root."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(
        f"checkpoint directory {path} does not exist. Download the release's "
        "ckpt-0/ into checkpoints/, or pass the directory that holds ckpt-0/.")
  if (path / TENSOR_DIR).is_dir():
    return path, path / TENSOR_DIR
  if path.name == TENSOR_DIR:
    return path.parent, path
  raise CheckpointError(
      f"{path} has no {TENSOR_DIR}/ directory. Pass the directory that holds "
      f"{TENSOR_DIR}/ (or {TENSOR_DIR}/ itself).")


def _tensor_files(tensor_dir: pathlib.Path) -> list[str]:
  return sorted(entry.name for entry in os.scandir(tensor_dir)
                if _TENSOR_FILE_PATTERN.fullmatch(entry.name))


def checkpoint_config(path, config: ModelConfig | None = None) -> ModelConfig:
  """The config of the checkpoint at `path` (D or D/ckpt-0).

  config.json beside ckpt-0 wins when present (a `config` argument must then
  equal it); without one, `config` is needed, except that a directory of 770
  tensors is the Grok-1 release.
  """
  root, tensor_dir = _checkpoint_dirs(path)
  config_path = root / CONFIG_FILE
  if config_path.is_file():
    try:
      saved = ModelConfig.from_json(config_path.read_text())
    except ConfigError as error:
      raise CheckpointError(f"{config_path}: {error}. Fix or delete it and pass the "
                            "config the checkpoint was made with.") from None
    if config is not None and config != saved:
      differing = [field for field, value in config.to_dict().items()
                   if saved.to_dict()[field] != value]
      raise CheckpointError(
          f"the config passed differs from {config_path} in {differing}. Pass "
          "config=None to use the checkpoint's own config.")
    return saved
  if config is not None:
    return config
  count = len(_tensor_files(tensor_dir))
  grok_1_count = len(manifest.parameter_shapes(GROK_1))
  if count == grok_1_count:
    return GROK_1
  raise CheckpointError(
      f"{tensor_dir} holds {count} tensor files and there is no {config_path}, so "
      f"the model is unknown (the Grok-1 release has {grok_1_count}). Pass the "
      "config the checkpoint was made with.")


def _check_tensor_files(tensor_dir: pathlib.Path, config: ModelConfig,
                        entries: list[manifest.TensorEntry]) -> None:
  """CheckpointError unless tensor_dir holds exactly the files the config needs."""
  expected = {tensor_file_name(entry.file_index): entry for entry in entries}
  present = set(_tensor_files(tensor_dir))
  missing = sorted(set(expected) - present)
  extra = sorted(present - set(expected))
  if not missing and not extra:
    return
  problems = []
  if missing:
    listed = ", ".join(f"{name} ({expected[name].name})" for name in missing[:5])
    problems.append(f"missing {len(missing)} tensor files: {listed}"
                    + (", ..." if len(missing) > 5 else ""))
  if extra:
    problems.append(f"{len(extra)} tensor files the config has no parameter for: "
                    + ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else ""))
  raise CheckpointError(
      f"{tensor_dir} holds {len(present)} tensor files, the config "
      f"(num_layers={config.num_layers}) needs {len(expected)}: "
      + "; ".join(problems)
      + ". Re-download the missing files, or pass the config the checkpoint was "
      "made with.")


# --- Loading. ---

def place_on_default_device(name: str, leaf):
  """Put one tensor on jax's default device unchanged (int8, bfloat16, float32)."""
  del name
  return jax.block_until_ready(jax.device_put(leaf))


def read_release_tensors(path, config: ModelConfig, *, max_workers: int = 4,
                         progress: bool = True):
  """Yields (manifest entry, host leaf) for every tensor of the checkpoint, in file order.

  Up to `max_workers` threads read and check files ahead of the consumer, so
  at most max_workers + 1 tensors are in host memory at once if the consumer
  drops each leaf before taking the next. A leaf is a float32 numpy array or
  a QuantizedWeight of numpy int8 weight and bfloat16 scales.
  """
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  _, tensor_dir = _checkpoint_dirs(path)
  entries = manifest.checkpoint_manifest(config)
  _check_tensor_files(tensor_dir, config, entries)
  file_paths = [tensor_dir / tensor_file_name(entry.file_index) for entry in entries]
  sizes = [file_path.stat().st_size for file_path in file_paths]

  bar = tqdm.tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"loading {tensor_dir}", file=sys.stderr, disable=not progress)
  executor = concurrent.futures.ThreadPoolExecutor(max_workers, "read-tensor")
  finished = False
  try:
    reads = (executor.submit(_read_tensor_file, file_path, entry)  # submitted lazily
             for entry, file_path in zip(entries, file_paths))
    pending = collections.deque(itertools.islice(reads, max_workers))  # in file order
    for done, (entry, size) in enumerate(zip(entries, sizes), start=1):
      host_leaf = pending.popleft().result()
      pending.extend(itertools.islice(reads, 1))
      yield entry, host_leaf
      del host_leaf
      bar.set_postfix_str(f"{done}/{len(entries)} tensors", refresh=False)
      bar.update(size)
    finished = True
  finally:
    # On an error or Ctrl-C, do not wait for a worker stuck in a read.
    executor.shutdown(wait=finished, cancel_futures=True)
    bar.close()


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stack, leaf, layer):
  """stack [L, ...] with layer `layer` replaced by leaf [...], in place (the stack is donated)."""
  return jax.tree.map(lambda whole, part: whole.at[layer].set(part), stack, leaf)


class _StackedTarget:
  """The stacked, already placed arrays the release's per-layer tensors are written into.

  Each tensor kind's stack [L, ...] is allocated, zero and in its final
  sharding, when its first layer arrives (whose scales give the layout);
  every layer is placed in the layout of one slice of the stack and written
  into its slot in place. Device memory holds the stacks plus one layer's
  tensor: nothing is stacked on the host or copied after.
  """

  def __init__(self, config: ModelConfig, plan: ShardingPlan | None):
    self.config, self.plan = config, plan
    self.flat: dict[str, Any] = {}
    self.device = jax.devices()[0]

  def _sharding(self, spec):
    if self.plan is None:
      return jax.sharding.SingleDeviceSharding(self.device)
    return self.plan.sharding(spec)

  def _shardings(self, path: str, leaf):
    if self.plan is None:
      return jax.tree.map(lambda _: self._sharding(None), leaf)
    return jax.tree.map(self.plan.sharding, self.plan.leaf_spec(path, leaf))

  def add(self, file_path: pathlib.Path, name: str, host_leaf) -> None:
    spec, layer = param_table.spec_for_release_name(name)
    if not spec.per_layer:
      shardings = self._shardings(spec.path, host_leaf)
      self.flat[spec.path] = jax.block_until_ready(jax.tree.map(_place, host_leaf, shardings))
      return
    stack = self.flat.get(spec.path)
    if stack is None:
      stack = self._allocate(spec, host_leaf)
    elif (isinstance(host_leaf, quant.QuantizedWeight)
          and host_leaf.scales.shape != stack.scales.shape[1:]):
      raise CheckpointError(
          f"{file_path} ({name}) has scales of shape {host_leaf.scales.shape}, but the "
          f"other layers' {spec.name} have {stack.scales.shape[1:]}: one tensor kind must "
          "use one scale layout in every layer. The file is corrupt or from another model.")
    stack_shardings = jax.tree.map(lambda a: a.sharding, stack)
    layer_shardings = jax.tree.map(_slice_sharding, stack_shardings)
    placed = jax.tree.map(_place, host_leaf, layer_shardings)
    self.flat[spec.path] = jax.block_until_ready(_write_layer(stack, placed, layer))

  def _allocate(self, spec: param_table.ParamSpec, first_leaf):
    stored = spec.stored_shape(self.config)
    layers = stored[0]
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers, *a.shape), a.dtype),
                          first_leaf)
    shardings = self._shardings(spec.path, shapes)
    zeros = lambda s, sharding: jax.jit(  # noqa: E731
        functools.partial(jnp.zeros, s.shape, s.dtype), out_shardings=sharding)()
    return jax.tree.map(zeros, shapes, shardings,
                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _slice_sharding(sharding):
  """The sharding of one layer of an array [L, ...] laid out by `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        *tuple(sharding.spec)[1:]))
  return sharding


def _place(host, sharding):
  """A host array as a device array in `sharding`, only the local shards copied."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return sharding_module.put_array(host, sharding)
  return jax.device_put(host, sharding)


def load_checkpoint(path, config: ModelConfig | None = None, *,
                    sharding: ShardingPlan | None = None, place: Place | None = None,
                    max_workers: int = 4, progress: bool = True) -> dict[str, dict[str, Any]]:
  """The params of the checkpoint at `path` (D or D/ckpt-0), stacked and on the device(s).

  `config` is needed only when there is no config.json and it is not the
  770-tensor Grok-1 release (see `checkpoint_config`). Files are read in the
  release's order (`read_release_tensors`) and each layer's tensor is written
  into its slot of the stacked array it belongs to, already laid out as
  `sharding` (a ShardingPlan) says, or on the default device. Host memory
  holds at most max_workers + 1 tensors; device memory the final arrays plus
  one layer's tensor.

  `place(name, leaf)`, when given, replaces all of that: it is called in the
  calling thread, in file order, with each release tensor (numpy leaves) as
  soon as it is read, and the release-named tree of what it returns comes back.
  """
  config = checkpoint_config(path, config)
  if sharding is not None:
    sharding.check_config(config)
  tensors = read_release_tensors(path, config, max_workers=max_workers, progress=progress)
  if place is not None:
    return manifest.unflatten({entry.name: place(entry.name, leaf) for entry, leaf in tensors})
  target = _StackedTarget(config, sharding)
  _, tensor_dir = _checkpoint_dirs(path)
  for entry, leaf in tensors:
    target.add(tensor_dir / tensor_file_name(entry.file_index), entry.name, leaf)
    del leaf
  return param_table.unflatten({spec.path: target.flat[spec.path]
                                for spec in param_table.PARAMS})


# --- Quantizing and saving. ---

def _release_leaf(name: str, leaf):
  """`leaf` in the release's form as numpy: float32, or int8 + bfloat16 scales."""
  row_blocks = param_table.row_blocks_for(name)
  if row_blocks is None:
    if isinstance(leaf, quant.QuantizedWeight) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise CheckpointError(f"{name} must be a float array (the release keeps it "
                            f"float32), got {_describe_leaf(leaf)}.")
    return np.asarray(leaf, dtype=np.float32)
  if isinstance(leaf, quant.QuantizedWeight):
    weight, scales = np.asarray(leaf.weight), np.asarray(leaf.scales)
    if not _is_quantized_weight_of_shape(weight, scales, weight.shape):
      raise CheckpointError(f"{name}: a QuantizedWeight must have an int8 weight [..., K, N] "
                            f"and bfloat16 scales [..., R, N] with R dividing K, got "
                            f"{_describe_leaf(leaf)}.")
    return quant.QuantizedWeight(weight=weight, scales=scales)
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise CheckpointError(f"{name} must be a float array or a QuantizedWeight, "
                          f"got {_describe_leaf(leaf)}.")
  try:
    return quant.quantize(np.asarray(leaf, dtype=np.float32), row_blocks)
  except ValueError as error:
    raise CheckpointError(f"cannot quantize {name} in the release layout: {error}.") from None


def _describe_leaf(leaf) -> str:
  if isinstance(leaf, quant.QuantizedWeight):
    return (f"QuantizedWeight(weight: {leaf.weight.dtype} {tuple(leaf.weight.shape)}, "
            f"scales: {leaf.scales.dtype} {tuple(leaf.scales.shape)})")
  return f"{leaf.dtype} array of shape {tuple(leaf.shape)}"


def quantize_params(params, config: ModelConfig | None = None) -> dict[str, dict[str, Any]]:
  """Params in the release's storage: float weights quantized to int8 with bfloat16 scales.

  Per output channel (R = 1) or in 8 row blocks, as the parameter table
  gives each tensor kind (a stack [L, ...] is quantized layer by layer, the
  same numbers); float-only tensors become float32; QuantizedWeight leaves
  are kept. Release-named params stay release-named (`config` is not needed
  then); stacked params need `config`. Leaves come back as jax arrays.
  """
  flat = {name: jax.tree.map(jnp.asarray, _release_leaf(name, leaf))
          for name, leaf in param_table.flatten(params).items()}
  return param_table.unflatten(flat)


def _params_for_config(params, config: ModelConfig) -> dict[str, Any]:
  """{release name: leaf} of `params` (stacked or release-named), or CheckpointError if
  they do not fit `config`."""
  try:
    stacked = param_table.as_stacked(params, config)
    param_table.check_stacked(stacked, config)
  except ConfigError as error:
    raise CheckpointError(f"{error}") from None
  return dict(param_table.release_tensors(stacked, config))


def _make_readable_by_all(directory: pathlib.Path) -> None:
  """Give a directory the permissions a plain mkdir would (0777 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  directory.chmod(0o777 & ~umask)


def _fsync_directory(path: pathlib.Path) -> None:
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _stage_config_file(root: pathlib.Path, config: ModelConfig) -> pathlib.Path | None:
  """config.json's new content in a hidden file of root, fsynced; None for Grok-1."""
  if config == GROK_1:
    return None
  staged = root / f".{CONFIG_FILE}.partial-{uuid.uuid4().hex}"
  with open(staged, "w") as file:
    file.write(config.to_json())
    file.flush()
    os.fsync(file.fileno())
  return staged


def _commit(staged_tensors: pathlib.Path, staged_config: pathlib.Path | None,
            root: pathlib.Path) -> None:
  """Swap the staged ckpt-0 and config.json into root; no intermediate state loads.

  Only renames: the old ckpt-0 is first renamed aside, so from then on nothing
  loads; config.json is replaced (or removed, for Grok-1); the new, complete
  ckpt-0 is renamed in last. A crash in between leaves no ckpt-0 and the old
  one in root/.ckpt-0.old-*; a crash before leaves the old checkpoint as it was.
  """
  tensor_dir = root / TENSOR_DIR
  retired = None
  if tensor_dir.exists():
    retired = root / f".{TENSOR_DIR}.old-{uuid.uuid4().hex}"
    os.rename(tensor_dir, retired)
  if staged_config is None:
    (root / CONFIG_FILE).unlink(missing_ok=True)
  else:
    os.replace(staged_config, root / CONFIG_FILE)
  os.rename(staged_tensors, tensor_dir)
  _fsync_directory(root)
  if retired is not None:
    shutil.rmtree(retired)


def save_checkpoint(params, path, config: ModelConfig, *, overwrite: bool = False,
                    progress: bool = True) -> pathlib.Path:
  """Write `params` to path/ckpt-0 (+ path/config.json) in the release format.

  `path` is the checkpoint directory D (or D/ckpt-0); files beside ckpt-0,
  such as tokenizer.model, are left alone. Leaves may be float or
  QuantizedWeight, numpy or jax: see `_release_leaf`. Every tensor is written
  and fsynced into a hidden staging directory in D, then `_commit` renames it
  into place. An existing checkpoint is refused unless `overwrite`. Returns D.
  """
  flat = _params_for_config(params, config)
  root = pathlib.Path(path)
  if root.name == TENSOR_DIR:
    root = root.parent
  if ((root / TENSOR_DIR).exists() or (root / CONFIG_FILE).exists()) and not overwrite:
    raise CheckpointError(f"{root} already holds a checkpoint; pass overwrite=True "
                          "to replace it, or choose another directory.")
  root.mkdir(parents=True, exist_ok=True)
  staged_tensors = pathlib.Path(
      tempfile.mkdtemp(prefix=f".{TENSOR_DIR}.partial-", dir=root))
  _make_readable_by_all(staged_tensors)  # mkdtemp makes it private (0700)
  staged_config = None
  try:
    entries = manifest.checkpoint_manifest(config)
    for entry in tqdm.tqdm(entries, desc=f"saving {root / TENSOR_DIR}", unit="tensor",
                           file=sys.stderr, disable=not progress):
      leaf = _release_leaf(entry.name, flat[entry.name])
      _write_tensor_file(staged_tensors / tensor_file_name(entry.file_index), leaf)
    _fsync_directory(staged_tensors)
    staged_config = _stage_config_file(root, config)
    _commit(staged_tensors, staged_config, root)
  except BaseException:
    shutil.rmtree(staged_tensors, ignore_errors=True)
    if staged_config is not None:
      staged_config.unlink(missing_ok=True)
    raise
  return root

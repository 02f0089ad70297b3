"""Reading and writing checkpoints in the format of the Grok-1 release.

A checkpoint directory D holds `D/ckpt-0/tensor{i:05d}_000`, one pickled tensor
per file in the order of `manifest.checkpoint_manifest`, and the model's
config.json (none in the Grok-1 release). grok_moe saves make ckpt-0 a symlink
to a version directory that holds config.json too (see `checkpoint_dir`).
Float-only tensors (embeddings, norm scales, router) are float32 numpy arrays;
every other weight is a `__main__.QuantizedWeight8bit` record of an int8
`weight` and bfloat16 `scales` in the layout the parameter table gives it.

Loading (`load_checkpoint`):
  1. Find ckpt-0 and the config (argument, config.json, or Grok-1 for 770 files).
  2. Check that the tensor files are exactly the ones the config needs.
  3. Read files on a few threads, at most `max_workers` ahead of the caller,
     with `tensor_file.read_tensor_file`: a pickle decoder of its own records
     the file as plain data, checks kind, dtype, shape, byte count and finite
     values against the config, and only then builds numpy arrays, so no
     code from a file runs and no file state reaches numpy's constructors.
  4. Write each layer's tensor, in file order, into its slot of the stacked
     array [L, ...] it belongs to (`grok_moe.params`), allocated already in
     its final layout on the device(s), and drop the host copy. Host memory
     holds at most max_workers + 1 tensors at a time; device memory the final
     arrays plus one layer's tensor. Ctrl-C stops the readers within one
     16 MiB chunk.

Saving (`save_checkpoint`) slices stacked params back into the release's
per-layer tensors, quantizes float weights the way the release did and
writes a new version directory that one atomic swap makes current; see
`checkpoint_dir` for the layout and why every instant holds the old or the new
checkpoint, config.json included. `save_checkpoint(..., format="safetensors")`
writes a Hugging Face checkpoint of the config's family instead (`hf_save`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import pathlib
import re
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tqdm

from grok_moe import checkpoint_dir, config_file, hf_checkpoint, hf_save, manifest
from grok_moe import params as param_table
from grok_moe import quant, release_pickle
from grok_moe import sharding as sharding_module
from grok_moe.checkpoint_dir import CONFIG_FILE, TENSOR_DIR
from grok_moe.config import GROK_1, ModelConfig
from grok_moe.errors import CheckpointError, ConfigError
from grok_moe.sharding import ShardingPlan
from grok_moe.tensor_file import read_tensor_file

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


def _is_quantized_weight_of_shape(weight, scales, shape: tuple[int, ...]) -> bool:
  """Whether weight is int8 [..., K, N] = shape and scales bfloat16 [..., R, N], R dividing K."""
  *batch, rows, cols = shape
  return (isinstance(weight, np.ndarray) and isinstance(scales, np.ndarray)
          and weight.dtype == np.int8 and weight.shape == tuple(shape)
          and scales.dtype == ml_dtypes.bfloat16 and scales.ndim == len(shape)
          and scales.shape[:-2] == tuple(batch) and scales.shape[-1] == cols
          and scales.shape[-2] >= 1 and rows % scales.shape[-2] == 0)


# --- Where a checkpoint lives, and its config. ---

def _tensor_files(tensor_dir: pathlib.Path) -> list[str]:
  try:
    return sorted(entry.name for entry in os.scandir(tensor_dir)
                  if _TENSOR_FILE_PATTERN.fullmatch(entry.name))
  except OSError as error:
    raise CheckpointError(f"cannot list {tensor_dir}: {error.strerror or error}; check "
                          "its permissions.") from None


def checkpoint_config(path, config: ModelConfig | None = None) -> ModelConfig:
  """The config of the checkpoint at `path` (D or D/ckpt-0).

  config.json (inside ckpt-0, else beside it) wins when present (a `config`
  argument must then equal it); without one, `config` is needed, except that
  a directory of 770 tensors is the Grok-1 release. A Hugging Face directory's
  config is read from its config.json (`hf_checkpoint.model_config`).
  """
  if hf_checkpoint.is_hf_checkpoint(path):
    return hf_checkpoint.checkpoint_config(path, config)
  return _config_at(*checkpoint_dir.locate(path), config)


def _config_at(root: pathlib.Path, tensor_dir: pathlib.Path,
               config: ModelConfig | None) -> ModelConfig:
  """`checkpoint_config` for a located (root, tensor directory): see there."""
  config_path = checkpoint_dir.config_path(root, tensor_dir)
  if config_path is not None:
    try:
      saved = config_file.read_config_file(config_path)
    except ConfigError as error:
      raise CheckpointError(f"{error}. Fix or delete it and pass the "
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
      f"{tensor_dir} holds {count} tensor files and there is no {root / CONFIG_FILE}, so "
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


def read_release_tensors(tensor_dir: pathlib.Path, config: ModelConfig, *, max_workers: int = 4,
                         progress: bool = True):
  """Yields (manifest entry, host leaf) for every tensor in `tensor_dir` (a located
  ckpt-0), in file order.

  Up to `max_workers` threads read and check files ahead of the consumer, so
  at most max_workers + 1 tensors are in host memory at once if the consumer
  drops each leaf before taking the next. A leaf is a float32 numpy array or
  a QuantizedWeight of numpy int8 weight and bfloat16 scales.
  """
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  entries = manifest.checkpoint_manifest(config)
  _check_tensor_files(tensor_dir, config, entries)
  file_paths = [tensor_dir / tensor_file_name(entry.file_index) for entry in entries]
  sizes = checkpoint_dir.file_sizes(file_paths, [entry.name for entry in entries])

  bar = tqdm.tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"loading {tensor_dir}", file=sys.stderr, disable=not progress)
  executor = concurrent.futures.ThreadPoolExecutor(max_workers, "read-tensor")
  stop = threading.Event()  # set on the way out: a reader still running stops within a chunk
  try:
    reads = (executor.submit(read_tensor_file, file_path, entry, stop)  # submitted lazily
             for entry, file_path in zip(entries, file_paths))
    pending = collections.deque(itertools.islice(reads, max_workers))  # in file order
    for done, (entry, size) in enumerate(zip(entries, sizes), start=1):
      host_leaf = pending.popleft().result()
      pending.extend(itertools.islice(reads, 1))
      yield entry, host_leaf
      del host_leaf
      bar.set_postfix_str(f"{done}/{len(entries)} tensors", refresh=False)
      bar.update(size)
  finally:
    stop.set()
    executor.shutdown(wait=False, cancel_futures=True)  # Ctrl-C is not held up by a reader
    bar.close()


_write_layer = param_table.write_layer  # one name here, which benchmarks/load_checkpoint wraps


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
    zeros = lambda s, sharding: jnp.zeros(s.shape, s.dtype, device=sharding)  # noqa: E731
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
  root, tensor_dir = checkpoint_dir.locate(path)  # once: config and tensors of one version
  config = _config_at(root, tensor_dir, config)
  checkpoint_dir.remove_leftovers(root)
  if sharding is not None:
    sharding.check_config(config)
  tensors = read_release_tensors(tensor_dir, config, max_workers=max_workers, progress=progress)
  if place is not None:
    return manifest.unflatten({entry.name: place(entry.name, leaf) for entry, leaf in tensors})
  target = _StackedTarget(config, sharding)
  for entry, leaf in tensors:
    target.add(tensor_dir / tensor_file_name(entry.file_index), entry.name, leaf)
    del leaf
  return param_table.unflatten({spec.path: target.flat[spec.path]
                                for spec in param_table.params_for(config)})


# --- Quantizing and saving. ---

def _release_leaf(name: str, leaf):
  """`leaf` in the release's form as numpy: float32, or int8 + bfloat16 scales."""
  spec = param_table.spec_of(name)
  if spec.row_blocks is None:
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
  row_blocks = spec.blocks_for_rows(leaf.shape[-2])
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
    if param_table.is_release_form(params):
      flat = param_table.flatten(params)
      param_table.check_release(flat, config)
      return flat
    param_table.check_stacked(params, config)
  except ConfigError as error:
    raise CheckpointError(f"{error}") from None
  return dict(param_table.release_tensors(params, config))


SAVE_FORMATS = ("release", "safetensors")


def save_checkpoint(params, path, config: ModelConfig, *, overwrite: bool = False,
                    progress: bool = True, format: str = "release",  # noqa: A002
                    dtype=None, max_shard_bytes: int | None = None,
                    ranks: int | None = None) -> pathlib.Path:
  """Write `params` to the checkpoint directory `path` in the release format or, with
  format="safetensors", as a Hugging Face checkpoint of the config's family.

  Release format: path/ckpt-0 (+ path/config.json); `path` is the checkpoint
  directory D (or D/ckpt-0). Float weights are quantized to int8 as the
  release did. Safetensors (`grok_moe.hf_save`): config.json in the family's
  Hugging Face form, `model.safetensors` or files of at most
  `max_shard_bytes` (default 5 GB) with their index, the hub's per-expert
  [out, in] tensors; Grok-2 in its release's layout instead, the expert
  tensors split into `ranks` (default 8) `*-TP-RRR` files, the rest in
  `*-TP-common` files; float tensors in their dtype or `dtype`, int8 ones
  dequantized (float32, or `dtype`); only configs of a Hugging Face family
  (Mixtral, Qwen2-MoE, Qwen3-MoE, Grok-2), so not Grok-1's.
  `Model.from_checkpoint` and `hf_checkpoint.load` read either back.

  Files beside the checkpoint, such as tokenizer.model, are left alone.
  Leaves may be float or QuantizedWeight, numpy or jax (sharded too);
  stacked (as the model holds them) or named per layer as the release. Every
  file is written and fsynced into a new hidden version directory in D,
  which `checkpoint_dir.staged_save` then makes current in one atomic swap;
  an error or Ctrl-C on the way leaves the old checkpoint as it was. An
  existing checkpoint is refused unless `overwrite`. Returns D.
  """
  if format not in SAVE_FORMATS:
    raise CheckpointError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
  if format == "safetensors":
    return hf_save.save(params, path, config, dtype=dtype, max_shard_bytes=max_shard_bytes,
                        ranks=ranks, overwrite=overwrite, progress=progress)
  if dtype is not None or max_shard_bytes is not None or ranks is not None:
    raise CheckpointError("dtype=, max_shard_bytes= and ranks= apply to "
                          "format=\"safetensors\"; the release format has its own (int8 "
                          "weights, one file per tensor)")
  flat = _params_for_config(params, config)
  root = pathlib.Path(path)
  if root.name == TENSOR_DIR:
    root = root.parent
  if hf_save.existing_checkpoint(root) and not overwrite:  # ckpt-0, config.json, ...
    raise CheckpointError(f"{root} already holds a checkpoint; pass overwrite=True "
                          "to replace it, or choose another directory.")
  with checkpoint_dir.staged_save(root, config.to_json()) as staged_tensors:
    entries = manifest.checkpoint_manifest(config)
    for entry in tqdm.tqdm(entries, desc=f"saving {root / TENSOR_DIR}", unit="tensor",
                           file=sys.stderr, disable=not progress):
      leaf = _release_leaf(entry.name, flat[entry.name])
      _write_tensor_file(staged_tensors / tensor_file_name(entry.file_index), leaf)
  return root

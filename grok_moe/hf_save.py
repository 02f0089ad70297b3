"""Saving params as a Hugging Face checkpoint of their family: config.json and safetensors.

The writing direction of `hf_checkpoint`, from the same table: config.json is
`hf_checkpoint.hf_config(config)` (the first family whose reader gives the
config back; a config no family has, such as Grok-1's, is refused), and each
entry of the parameter table goes out under its `hf_checkpoint.SOURCES` name,
per layer, per expert for the experts (`...experts.{e}.w1.weight`), with the
last two axes swapped where the hub keeps [out, in]. Reading the directory
back with `hf_checkpoint.load` gives the same config and the same arrays.

Algorithm:
  1. List every Hugging Face tensor: name, dtype, shape and where it lies in
     the stacked params (table entry, layer, expert). Nothing is read yet.
  2. Pack them in that order (outside-layer tensors, then layer by layer)
     into files of at most `max_shard_bytes` (a larger tensor gets a file of
     its own): `model.safetensors`, or `model-0000i-of-0000n.safetensors` with
     `model.safetensors.index.json` when there are several.
  3. Write each file, one tensor at a time: each device shard holding part
     of it gives that part (so a sharded array is never gathered whole), the
     tensor is dequantized, cast and transposed, and appended.
  4. All of it goes into a new version directory that one swap makes current
     (`checkpoint_dir.staged_save`, published: every file is also reachable
     at the top of the directory, where Hugging Face readers look).

Grok-2 (a family whose `SOURCES` give a `rank_axis`) is saved as its release
lays it out (docs/GROK2_SPEC.md, "The released checkpoint"; read back by
`grok_moe.rank_files`): step 2 instead gives each table entry (one tensor kind,
every layer and expert) a file number NNNNN, in the table's order; a kind that
is split by rank goes into `pytorch_model-NNNNN-TP-RRR.safetensors`, rank r
holding the r-th of `ranks` equal slices of each tensor along its `rank_axis`
(w1/w3 rows, w2 columns: the expert FFN axis), read from the devices as that
slice only; every other kind is whole in `pytorch_model-NNNNN-TP-common.safetensors`.
No index file and no size limit: the files' headers say what each holds.

Dtypes: a float tensor keeps its dtype (bfloat16, float16, float32) unless
`dtype` says otherwise. Safetensors Hugging Face checkpoints are float, so an
int8 `QuantizedWeight` is dequantized on the way out: to float32 by default,
which holds int8 times a bfloat16 scale exactly, or to `dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from grok_moe import checkpoint_dir, hf_checkpoint, quant, rank_files
from grok_moe import params as param_table
from grok_moe.config import ModelConfig
from grok_moe.errors import CheckpointError, ConfigError
from grok_moe.safetensors_file import write_safetensors

MAX_SHARD_BYTES = 5 * 10**9  # 5 GB: transformers 4's default, the shard size of the hub's models
SINGLE_FILE = "model.safetensors"
DTYPES = ("bfloat16", "float16", "float32")
RANKS = 8  # Grok-2's release: "This checkpoint is TP=8"


def shard_file_name(index: int, count: int) -> str:
  """The hub's name of file `index` (from 1) of `count`."""
  return f"model-{index:05d}-of-{count:05d}.safetensors"


def is_checkpoint_file(name: str) -> bool:
  """Whether `name`, in a checkpoint directory, is a file of a Hugging Face checkpoint
  (what a save in this layout replaces)."""
  return name in (hf_checkpoint.CONFIG_FILE, hf_checkpoint.INDEX_FILE) or name.endswith(
      ".safetensors")


@dataclasses.dataclass(frozen=True)
class HfTensor:
  """One Hugging Face tensor: its name, dtype and shape, and where it lies in the params
  (`path` of the stacked leaf, `index` of the layer and expert within it). In files split
  by rank, `rank_axis` is the axis of the tensor that ranks split, and `split` (axis,
  start, stop) the slice of it that this file's tensor holds (None: the whole tensor)."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  path: str
  index: tuple[int, ...]
  transpose: bool
  rank_axis: int | None = None
  split: tuple[int, int, int] | None = None

  def rank_slice(self, rank: int, ranks: int) -> "HfTensor":
    """Rank `rank`'s slice, the `rank`-th of `ranks` equal parts of the rank axis."""
    axis = self.rank_axis
    width = self.shape[axis] // ranks
    shape = (*self.shape[:axis], width, *self.shape[axis + 1:])
    return dataclasses.replace(self, shape=shape, split=(axis, rank * width,
                                                         (rank + 1) * width))

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _out_dtype(path: str, leaf, dtype) -> np.dtype:
  """The dtype `leaf` is written in: `dtype`, else its own (float32 for an int8 one)."""
  if dtype is not None:
    return np.dtype(dtype)
  if isinstance(leaf, quant.QuantizedWeight):
    return np.dtype(np.float32)
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise CheckpointError(f"{path} is {leaf.dtype}, not a float array or a QuantizedWeight; "
                          "a Hugging Face checkpoint holds float tensors")
  return np.dtype(leaf.dtype)


def hf_tensors(flat: dict[str, Any], config: ModelConfig, family: str,
               dtype=None) -> list[HfTensor]:
  """Step 1: every tensor of the checkpoint, outside-layer ones first, then layer by
  layer in the table's order, each layer's experts in order."""
  sources = hf_checkpoint.SOURCES[family]
  outside, layers = [], [[] for _ in range(config.num_layers)]
  for spec in param_table.params_for(config):
    source = sources.get(spec.name)
    if source is None:
      raise CheckpointError(f"{family} checkpoints have no name for {spec.name}")
    out_dtype = _out_dtype(spec.path, flat[spec.path], dtype)
    shape = spec.layer_shape(config)[1 if source.per_expert else 0:]
    if source.transpose:
      shape = (*shape[:-2], shape[-1], shape[-2])                 # [..., out, in]
    experts = range(config.num_experts) if source.per_expert else [None]
    for layer in range(config.num_layers) if spec.per_layer else [None]:
      for expert in experts:
        index = tuple(i for i in (layer, expert) if i is not None)
        tensor = HfTensor(source.name.format(layer=layer, expert=expert), out_dtype,
                          tuple(shape), spec.path, index, source.transpose, source.rank_axis)
        (outside if layer is None else layers[layer]).append(tensor)
  return outside + [tensor for layer in layers for tensor in layer]


def pack(tensors: list[HfTensor], max_shard_bytes: int) -> dict[str, list[HfTensor]]:
  """Step 2: {file name: its tensors}, filled in order up to `max_shard_bytes` each;
  within a file, wider dtypes first so every tensor starts aligned to its item size."""
  shards: list[list[HfTensor]] = [[]]
  size = 0
  for tensor in tensors:
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(tensor)
    size += tensor.nbytes
  shards = [sorted(shard, key=lambda tensor: -tensor.dtype.itemsize) for shard in shards]
  if len(shards) == 1:
    return {SINGLE_FILE: shards[0]}
  return {shard_file_name(i, len(shards)): shard for i, shard in enumerate(shards, start=1)}


def by_rank(tensors: list[HfTensor], ranks: int) -> dict[str, list[HfTensor]]:
  """Step 2 of the rank-split layout: {file name: its tensors}, file number n for the
  n-th table entry (kind) of `tensors`; a kind with a rank axis in `ranks` files of
  one slice each, any other in one common file. CheckpointError unless `ranks` (a
  positive integer) divides every rank axis."""
  if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
    raise CheckpointError(f"ranks must be a positive integer, got {ranks!r}")
  kinds: dict[str, list[HfTensor]] = {}
  for tensor in tensors:
    kinds.setdefault(tensor.path, []).append(tensor)
  files = {}
  for number, kind in enumerate(kinds.values(), start=1):
    first = kind[0]
    if first.rank_axis is None:
      files[rank_files.file_name(number, None)] = kind
      continue
    size = first.shape[first.rank_axis]
    if size % ranks:
      raise CheckpointError(f"ranks={ranks} does not divide the {size} of axis "
                            f"{first.rank_axis} of {first.name} (the expert FFN size), "
                            "which the rank files split; pass a divisor of it (the "
                            f"release has {RANKS})")
    for rank in range(ranks):
      files[rank_files.file_name(number, rank)] = [tensor.rank_slice(rank, ranks)
                                                   for tensor in kind]
  return files


def _host_slice(array, index: tuple) -> np.ndarray:
  """array[index] on the host (`index`: leading integers, then slices of step 1). From
  a device array, each device shard that overlaps it gives that overlap, sliced on its
  own device (no collective, nothing gathered but the slice); replicas are read once."""
  if not isinstance(array, jax.Array):
    return np.asarray(array[index])
  lead = len([i for i in index if isinstance(i, int)])
  tail = tuple(index[lead:]) + (slice(None),) * (array.ndim - len(index))
  want = [part.indices(size)[:2] for part, size in zip(tail, array.shape[lead:])]
  out = np.empty(tuple(hi - lo for lo, hi in want), array.dtype)
  done, filled = set(), 0
  for shard in array.addressable_shards:
    holds = all(i in range(size)[part]
                for part, i, size in zip(shard.index[:lead], index, array.shape))
    spans = [part.indices(size)[:2] for part, size in zip(shard.index[lead:],
                                                          array.shape[lead:])]
    overlap = tuple((max(lo, w_lo), min(hi, w_hi)) for (lo, hi), (w_lo, w_hi)
                    in zip(spans, want))                        # shards tile: equal or apart
    if not holds or any(lo >= hi for lo, hi in overlap) or overlap in done:
      continue
    local = tuple(i - (part.start or 0) for part, i in zip(shard.index[:lead], index))
    local += tuple(slice(lo - start, hi - start) for (lo, hi), (start, _) in zip(overlap, spans))
    piece = np.asarray(shard.data[local])
    out[tuple(slice(lo - w_lo, hi - w_lo) for (lo, hi), (w_lo, _) in zip(overlap, want))] = piece
    done.add(overlap)
    filled += piece.size
  if filled != out.size:
    raise CheckpointError("a parameter is spread over several processes; save from params "
                          "that one process holds whole (e.g. gathered with "
                          "grok_moe.sharding.fetch)")
  return out


@functools.partial(jax.jit, static_argnames=("dtype", "transpose"))
def _converted(tensor, dtype, transpose: bool):
  """One tensor (a QuantizedWeight dequantized) in `dtype`, its last two axes swapped if
  `transpose`."""
  part = quant.dequantize(tensor, dtype)                        # [..., in, out]
  return jnp.swapaxes(part, -1, -2) if transpose else part      # [..., out, in]


def _fetch(leaf, tensor: HfTensor) -> np.ndarray:
  """Step 3 for one tensor: its slice of the stacked leaf copied to the host from the
  devices that hold it, then dequantized, cast and transposed (on the default device).
  A rank's slice is cut before the copy: of an int8 leaf, with the scales of its
  columns, or of its rows as one scale row per row (`_rank_rows`), since rank slices
  need not fall on the scales' row blocks."""
  if tensor.split is None:
    part = jax.tree.map(lambda array: _host_slice(array, tensor.index), leaf)
    return np.asarray(_converted(part, tensor.dtype, tensor.transpose))
  axis, start, stop = tensor.split
  ndim = len(tensor.shape)
  table_axis = (2 * ndim - 3 - axis) if tensor.transpose and axis >= ndim - 2 else axis
  index = tensor.index + (slice(None),) * table_axis + (slice(start, stop),)
  if not isinstance(leaf, quant.QuantizedWeight):
    part = _host_slice(leaf, index)
  elif table_axis == ndim - 1:  # columns: each column keeps its own scales
    part = quant.QuantizedWeight(_host_slice(leaf.weight, index), _host_slice(leaf.scales, index))
  else:
    part = _rank_rows(leaf, tensor.index, start, stop)
  return np.asarray(_converted(part, tensor.dtype, tensor.transpose))


def _rank_rows(leaf: quant.QuantizedWeight, index: tuple[int, ...], start: int, stop: int
               ) -> quant.QuantizedWeight:
  """Rows start .. stop of leaf[index] [K, N] on the host, each row with the scales of its
  row block: a QuantizedWeight of one scale row per row [stop - start, N]."""
  block_rows = leaf.weight.shape[-2] // leaf.scales.shape[-2]
  first, last = start // block_rows, (stop - 1) // block_rows + 1
  weight = _host_slice(leaf.weight, index + (slice(start, stop),))                 # [rows, N]
  scales = _host_slice(leaf.scales, index + (slice(first, last),))                 # [blocks, N]
  per_row = np.repeat(scales, block_rows, axis=-2)[start - first * block_rows:
                                                   stop - first * block_rows]     # [rows, N]
  return quant.QuantizedWeight(weight, per_row)


def _stacked(params, config: ModelConfig) -> dict[str, Any]:
  """{path: stacked leaf} of `params` (stacked, or named per layer as the release),
  or CheckpointError if they do not fit `config`."""
  try:
    stacked = param_table.as_stacked(params, config)
    param_table.check_stacked(stacked, config)
  except ConfigError as error:
    raise CheckpointError(f"{error}") from None
  return param_table.flatten(stacked)


def existing_checkpoint(root: pathlib.Path) -> list[str]:
  """The names in `root` that a save would replace: a checkpoint of either format."""
  if not root.is_dir():
    return []
  return sorted(name for name in os.listdir(root)
                if is_checkpoint_file(name) or name == checkpoint_dir.TENSOR_DIR)


def save(params, path, config: ModelConfig, *, dtype=None, max_shard_bytes: int | None = None,
         ranks: int | None = None, overwrite: bool = False,
         progress: bool = True) -> pathlib.Path:
  """Write `params` to the directory `path` as a Hugging Face checkpoint of the config's
  family (see the module docstring); refused if it holds a checkpoint, unless
  `overwrite`. Returns the directory.

  `max_shard_bytes` (default MAX_SHARD_BYTES) sizes the files of the hub's
  families; `ranks` (default RANKS) is the number of rank files of Grok-2's
  layout. Each is refused where the other layout applies.

  Files beside the checkpoint (tokenizer.json, ...) are left alone; a previous
  checkpoint's files that the new one lacks (other shards, an index) are removed.
  """
  try:
    known = dtype is None or np.dtype(dtype).name in DTYPES
  except TypeError:
    known = False
  if not known:
    raise CheckpointError(f"dtype must be one of {DTYPES} (or None: as the params hold "
                          f"them), got {dtype!r}")
  if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int)
                                      or isinstance(max_shard_bytes, bool)
                                      or max_shard_bytes < 1):
    raise CheckpointError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
  hf = hf_checkpoint.hf_config(config)
  family = hf_checkpoint.family(hf)
  rank_split = any(source.rank_axis is not None
                   for source in hf_checkpoint.SOURCES[family].values())
  if rank_split and max_shard_bytes is not None:
    raise CheckpointError(f"max_shard_bytes= does not apply to {family}: its release layout "
                          "has one file per tensor kind and rank; pass ranks= instead")
  if not rank_split and ranks is not None:
    raise CheckpointError(f"ranks= applies to Grok-2's rank-split layout; {family} "
                          "checkpoints keep whole tensors (pass max_shard_bytes= instead)")
  flat = _stacked(params, config)
  tensors = hf_tensors(flat, config, family, dtype)
  hf["torch_dtype"] = tensors[0].dtype.name  # the embeddings'
  if rank_split:
    files = by_rank(tensors, RANKS if ranks is None else ranks)
  else:
    files = pack(tensors, MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)
  root = pathlib.Path(path)
  if root.name == checkpoint_dir.TENSOR_DIR:  # D/ckpt-0 of an earlier save: D, as the release's
    root = root.parent
  if root.exists() and not root.is_dir():
    raise CheckpointError(f"{root} is a file; pass a directory for the checkpoint")
  present = existing_checkpoint(root)
  if present and not overwrite:
    raise CheckpointError(f"{root} already holds a checkpoint ({', '.join(present[:3])}); "
                          "pass overwrite=True to replace it, or choose another directory.")
  bar = tqdm.tqdm(total=sum(t.nbytes for shard in files.values() for t in shard), unit="B",
                  unit_scale=True, unit_divisor=1024, desc=f"saving {root}", file=sys.stderr,
                  disable=not progress)
  config_json = json.dumps(hf, indent=2, sort_keys=True) + "\n"
  with bar, checkpoint_dir.staged_save(root, config_json,
                                       published=is_checkpoint_file) as version:
    for file_name, shard in files.items():
      by_name = {tensor.name: tensor for tensor in shard}

      def read(name, by_name=by_name):
        tensor = by_name[name]
        array = _fetch(flat[tensor.path], tensor)
        bar.update(tensor.nbytes)
        return array

      write_safetensors(version / file_name, [(t.name, t.dtype, t.shape) for t in shard], read)
    if len(files) > 1 and not rank_split:
      _write_index(version, files)
  return root


def _write_index(version: pathlib.Path, files: dict[str, list[HfTensor]]) -> None:
  """model.safetensors.index.json: the data's total bytes and each tensor's file."""
  weight_map = {tensor.name: file_name for file_name, shard in files.items() for tensor in shard}
  total = sum(tensor.nbytes for shard in files.values() for tensor in shard)
  text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                    indent=2, sort_keys=True) + "\n"
  checkpoint_dir.write_synced(version / hf_checkpoint.INDEX_FILE, text)


"""A checkpoint saved split for tensor parallelism (Grok-2's release), read onto any mesh.

The files are `PREFIX-TP-RRR.safetensors`, RRR = 000 .. n-1 the rank, and
`PREFIX-TP-common.safetensors` (docs/GROK2_SPEC.md, "The released
checkpoint"). A common file holds whole tensors. A rank file holds that rank's
slice of some tensors: the tensor split into n equal slices along one axis
(the expert FFN axis for Grok-2), rank r holding slice r, under the whole
tensor's name, so the same name is in every rank's file. No index file: the
files' headers say which tensors each holds.

`RankFiles.read(name, shape, part, rank_axis)` gives the block `part` of the
whole tensor: each rank slice that overlaps `part` along `rank_axis` is read
as a slice of its memory-mapped file (only the pages it covers) and the
pieces are joined in rank order. A device whose shard lies within one rank's
slice reads one file; the whole tensor is never assembled unless asked for.

`file_name` gives the release's file names, for writing them (`grok_moe.hf_save`).

Refused with a CheckpointError naming the file: a rank file missing (a
prefix whose other ranks are present, or ranks that cover too little of the
tensor), rank slices of the wrong shape or of differing dtypes, a tensor of
the wrong shape or not a float, a tensor that is in no file, or in two.
"""

from __future__ import annotations

import pathlib
import re

import ml_dtypes
import numpy as np

from grok_moe.errors import CheckpointError
from grok_moe.safetensors_file import SafetensorsFile

FLOAT_DTYPES = tuple(np.dtype(t) for t in ("<f2", "<f4", "<f8", ml_dtypes.bfloat16))
_FILE_NAME = re.compile(r"^(?P<prefix>.+)-TP-(?P<rank>\d{3}|common)\.safetensors$")
PREFIX = "pytorch_model"  # the release's: pytorch_model-NNNNN-TP-RRR.safetensors


def file_name(number: int, rank: int | None) -> str:
  """The release's name of file `number` (from 1): rank `rank`'s, or the common file
  (rank None)."""
  return f"{PREFIX}-{number:05d}-TP-{'common' if rank is None else f'{rank:03d}'}.safetensors"


def is_rank_split(root) -> bool:
  """Whether the directory holds tensor-parallel files (`*-TP-RRR.safetensors`)."""
  return any(_FILE_NAME.match(path.name) for path in pathlib.Path(root).glob("*.safetensors"))


def check_tensor(path, name: str, view: np.ndarray, shape: tuple[int, ...]) -> None:
  """CheckpointError naming the file unless `view` is a float tensor of `shape`."""
  if tuple(view.shape) != tuple(shape):
    raise CheckpointError(f"{path}: {name} has shape {tuple(view.shape)}, the config needs "
                          f"{tuple(shape)}; the checkpoint does not match its config.json")
  if view.dtype not in FLOAT_DTYPES:  # (bfloat16 is not a numpy np.floating)
    raise CheckpointError(f"{path}: {name} is {view.dtype}, not a float tensor")


class RankFiles:
  """The `*-TP-*.safetensors` files of a directory: every header read at once, data mapped."""

  def __init__(self, root):
    self.root = pathlib.Path(root)
    self.common: dict[str, SafetensorsFile] = {}          # name -> its file
    self.ranked: dict[str, dict[int, SafetensorsFile]] = {}  # name -> rank -> its file
    prefixes: dict[str, set[int]] = {}
    for path in sorted(self.root.glob("*-TP-*.safetensors")):
      match = _FILE_NAME.match(path.name)
      if not match:
        continue
      file = SafetensorsFile(path)
      if match["rank"] == "common":
        for name in file.names():
          self._add(self.common, name, name, file)
        continue
      rank = int(match["rank"])
      prefixes.setdefault(match["prefix"], set()).add(rank)
      for name in file.names():
        self._add(self.ranked.setdefault(name, {}), rank, name, file)
    self.num_ranks = 1 + max((max(ranks) for ranks in prefixes.values()), default=-1)
    for prefix, ranks in sorted(prefixes.items()):
      for rank in range(self.num_ranks):
        if rank not in ranks:
          raise CheckpointError(
              f"{self.root / f'{prefix}-TP-{rank:03d}.safetensors'} is missing (the other "
              f"ranks of {prefix} up to TP-{self.num_ranks - 1:03d} are present); download it "
              "again")
    self._checked: set[str] = set()

  @staticmethod
  def _add(table: dict, key, name: str, file: SafetensorsFile) -> None:
    """table[key] = file, the tensor `name`'s (or its rank's) file, unless one holds it."""
    if key in table:
      raise CheckpointError(f"{table[key].path} and {file.path} both hold {name}; remove the "
                            "duplicate file")
    table[key] = file

  def _rank_views(self, name: str, shape: tuple[int, ...], rank_axis: int | None):
    """The views of the rank slices of `name`, in rank order, checked once to be the n
    equal slices of `shape` along `rank_axis`."""
    files = self.ranked[name]
    if rank_axis is None:
      raise CheckpointError(f"{files[min(files)].path} holds {name}, which is not split by "
                            "rank; it belongs in a TP-common file")
    absent = [rank for rank in range(self.num_ranks) if rank not in files]
    if absent:
      raise CheckpointError(f"{name} is in {files[min(files)].path} but in no TP-"
                            f"{absent[0]:03d} file of {self.root}; the rank files do not match "
                            "each other")
    views = [files[rank].view(name) for rank in range(self.num_ranks)]
    if name in self._checked:
      return views
    full = shape[rank_axis]
    width = full // self.num_ranks
    want = shape[:rank_axis] + (width,) + shape[rank_axis + 1:]
    for rank, view in enumerate(views):
      if width * self.num_ranks != full or tuple(view.shape) != want:
        raise CheckpointError(
            f"{files[rank].path}: {name} has shape {tuple(view.shape)}; the config needs "
            f"{shape} split into {self.num_ranks} equal slices of axis {rank_axis} (one per "
            f"rank file TP-000 .. TP-{self.num_ranks - 1:03d}). A rank file is missing, or "
            "the rank files do not match each other or config.json")
      check_tensor(files[rank].path, name, view, want)
      if view.dtype != views[0].dtype:
        raise CheckpointError(f"{files[rank].path}: {name} is {view.dtype} but "
                              f"{files[0].path} holds it as {views[0].dtype}; the rank files "
                              "do not match each other")
    self._checked.add(name)
    return views

  def _whole(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    file = self.common[name]
    view = file.view(name)
    check_tensor(file.path, name, view, shape)
    return view

  def _missing(self, name: str) -> CheckpointError:
    return CheckpointError(f"{self.root} has no tensor {name} in its *-TP-*.safetensors "
                           "files; the checkpoint is incomplete or of another model")

  def dtype(self, name: str, shape: tuple[int, ...], rank_axis: int | None = None) -> np.dtype:
    """The stored dtype of the tensor `name` of (whole) `shape`."""
    if name in self.common:
      return self._whole(name, shape).dtype
    if name in self.ranked:
      return self._rank_views(name, shape, rank_axis)[0].dtype
    raise self._missing(name)

  def read(self, name: str, shape: tuple[int, ...], part, rank_axis: int | None = None
           ) -> np.ndarray:
    """The block `part` (a slice per axis) of the whole tensor `name` of `shape`, reading
    only the rank slices that overlap it along `rank_axis`."""
    if name in self.common:
      return np.asarray(self._whole(name, shape)[part])
    if name not in self.ranked:
      raise self._missing(name)
    views = self._rank_views(name, shape, rank_axis)
    start, stop, step = part[rank_axis].indices(shape[rank_axis])
    if step != 1:
      raise ValueError(f"strided reads are not supported, got {part[rank_axis]}")
    pieces = [np.asarray(views[rank][part[:rank_axis] + (slice(lo, hi),) + part[rank_axis + 1:]])
              for rank, lo, hi in _overlaps(start, stop, shape[rank_axis] // self.num_ranks,
                                            self.num_ranks)]
    if not pieces:  # an empty block
      return np.asarray(views[0][part[:rank_axis] + (slice(0, 0),) + part[rank_axis + 1:]])
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=rank_axis)


def _overlaps(start: int, stop: int, width: int, num_ranks: int) -> list[tuple[int, int, int]]:
  """(rank, lo, hi) of each rank whose slice [rank*width, (rank+1)*width) of the split axis
  overlaps [start, stop), with the overlap [lo, hi) in the rank's own slice."""
  return [(rank, max(start - rank * width, 0), min(stop - rank * width, width))
          for rank in range(num_ranks) if rank * width < stop and start < (rank + 1) * width]

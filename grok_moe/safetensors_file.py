"""Safetensors files: read by slices (a checked header, then views into the mapped data),
and written one tensor at a time.

The format (Hugging Face's safetensors): 8 bytes of little-endian header
length n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {...}}, then the tensors' bytes, each at its offsets
from the end of the header. Reading maps the file and hands out numpy views,
so a slice of a tensor reads only the pages it covers: no whole-file copy is
ever made in host memory. bfloat16 is read as ml_dtypes.bfloat16.

Every problem (a header too long or not JSON, an unknown dtype, offsets that
do not match the shape or fall outside the file) is a CheckpointError that
names the file and the tensor.

Writing (`write_safetensors`) lays the header out from the tensors' names,
dtypes and shapes alone, padded with spaces to a multiple of 8 bytes (so the
data starts 8-byte aligned, as the reference writer does), then asks for each
tensor in header order and appends its bytes: the tensors lie contiguously,
with no gaps, and host memory holds one tensor at a time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pathlib
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from grok_moe.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}  # the writing direction
METADATA = "__metadata__"


class SafetensorsFile:
  """One safetensors file: its tensors' names, dtypes and shapes, and numpy views of them."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    try:
      with open(self.path, "rb") as file:
        self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as error:
      raise CheckpointError(f"cannot read {self.path}: {error}") from None
    size = len(self._map)
    if size < 8:
      raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes)")
    header_len = int.from_bytes(self._map[:8], "little")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
      raise CheckpointError(f"{self.path} is not a safetensors file or is truncated: its "
                            f"header claims {header_len} bytes")
    try:
      header = json.loads(bytes(self._map[8:8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
      raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON "
                            f"({error}); the file is corrupt") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
    self.metadata = header.pop("__metadata__", None)
    self._data_start = 8 + header_len
    self._entries = {}
    for name, entry in header.items():
      self._entries[name] = self._check_entry(name, entry, size)

  def _check_entry(self, name: str, entry, file_size: int):
    try:
      dtype = DTYPES[entry["dtype"]]
      shape = tuple(int(n) for n in entry["shape"])
      begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{self.path}: tensor {name} has a malformed header entry "
                            f"{str(entry)[:200]}; the file is corrupt or of an unknown "
                            "dtype") from None
    if any(n < 0 for n in shape) or not 0 <= begin <= end:
      raise CheckpointError(f"{self.path}: tensor {name} has a negative shape or offsets")
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise CheckpointError(f"{self.path}: tensor {name} of shape {shape} {entry['dtype']} "
                            f"holds {end - begin} bytes; the file is corrupt")
    if self._data_start + end > file_size:
      raise CheckpointError(f"{self.path}: tensor {name} lies past the end of the file; the "
                            "file is truncated")
    return dtype, shape, self._data_start + begin

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def view(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view of the mapped file: slicing it reads only what
    the slice covers."""
    dtype, shape, offset = self._entries[name]
    count = math.prod(shape)
    return np.frombuffer(self._map, dtype, count, offset).reshape(shape)


def dtype_code(dtype) -> str:
  """The safetensors name of a numpy dtype ("F32", "BF16", ...); CheckpointError if none."""
  code = DTYPE_CODES.get(np.dtype(dtype).newbyteorder("<"))
  if code is None:
    raise CheckpointError(f"{np.dtype(dtype)} has no safetensors dtype; known: "
                          f"{sorted(str(dtype) for dtype in DTYPE_CODES)}")
  return code


def header_bytes(entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
  """The 8-byte length and the JSON header of tensors (name, dtype, shape) laid out
  contiguously in this order, the JSON padded with spaces to a multiple of 8 bytes."""
  values = {METADATA: {"format": "pt"}}
  offset = 0
  for name, dtype, shape in entries:
    if name in values:
      raise CheckpointError(f"tensor name {name!r} appears twice (or is reserved)")
    size = math.prod(shape) * np.dtype(dtype).itemsize
    values[name] = {"dtype": dtype_code(dtype), "shape": [int(n) for n in shape],
                    "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(values, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text


def write_safetensors(path, entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                      read: Callable[[str], np.ndarray]) -> int:
  """Write the tensors `entries` (name, dtype, shape) into a new file `path`, each
  tensor's values `read(name)`, asked for in order; fsynced.

  The file must not exist. A tensor that comes back of another dtype or shape
  than its entry is a CheckpointError naming it.
  """
  path = pathlib.Path(path)
  with open(path, "xb") as file:
    file.write(header_bytes(entries))
    for name, dtype, shape in entries:
      array = read(name)
      if np.dtype(array.dtype) != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name} came as {array.dtype} "
                              f"{tuple(array.shape)}, its header says {np.dtype(dtype)} "
                              f"{tuple(shape)}")
      data = np.ascontiguousarray(array, DTYPES[dtype_code(dtype)]).reshape(-1)
      file.write(memoryview(data.view(np.uint8)))
    file.flush()
    os.fsync(file.fileno())

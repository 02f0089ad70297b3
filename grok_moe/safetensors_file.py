"""Reading safetensors files by slices: a checked header, then views into the memory-mapped data.

The format (Hugging Face's safetensors): 8 bytes of little-endian header
length n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {...}}, then the tensors' bytes, each at its offsets
from the end of the header. Reading maps the file and hands out numpy views,
so a slice of a tensor reads only the pages it covers: no whole-file copy is
ever made in host memory. bfloat16 is read as ml_dtypes.bfloat16.

Every problem (a header too long or not JSON, an unknown dtype, offsets that
do not match the shape or fall outside the file) is a CheckpointError that
names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import pathlib

import ml_dtypes
import numpy as np

from grok_moe.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


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

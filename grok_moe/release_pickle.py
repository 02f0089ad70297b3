"""The pickle format of the release's tensor files: read safely, written as the release did.

Reading: `SafeUnpickler` resolves only the globals a release tensor file names
(numpy's array rebuilders under their numpy 1.x and 2.x names, numpy.dtype,
ml_dtypes.bfloat16 and `__main__.QuantizedWeight8bit`), so a tampered file
cannot run code. Writing: `ReleasePickler` writes numpy 1.x names and
`__main__.QuantizedWeight8bit` records, readable by the release's own code.
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle

import ml_dtypes
import numpy as np

from grok_moe import quant
from grok_moe.errors import CheckpointError

PICKLE_PROTOCOL = 4


# numpy's own array rebuilders, under whichever module this numpy keeps them.
_reconstruct_ndarray = np.zeros(1).__reduce_ex__(4)[0]  # protocols <= 4
_ndarray_from_buffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5, in-band buffer


class QuantizedWeight8bitRecord:
  """What unpickling `__main__.QuantizedWeight8bit` builds: a holder of `weight` and `scales`."""

  def __setstate__(self, state):
    if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
      fields = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"QuantizedWeight8bit record with fields {fields}, "
                       "expected ['scales', 'weight']")
    self.weight = state["weight"]
    self.scales = state["scales"]


# Every global a release tensor file refers to, under numpy 1.x and 2.x names.
# A bfloat16 array's dtype pickles as numpy.dtype(ml_dtypes.bfloat16, ...).
# _frombuffer (frombuffer + reshape) is what protocol 5, Python 3.14's default,
# writes for arrays of numpy's own dtypes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy.core.numeric", "_frombuffer"): _ndarray_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _ndarray_from_buffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bitRecord,
}


class SafeUnpickler(pickle.Unpickler):
  """An unpickler that resolves only `_ALLOWED_GLOBALS`.

  Pickles run code only through the globals they name (and persistent ids),
  so refusing every other global means a tampered file cannot run anything.
  """

  def __init__(self, file, file_path: pathlib.Path):
    super().__init__(file)
    self._file_path = file_path

  def find_class(self, module: str, name: str):
    allowed = _ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise CheckpointError(
          f"{self._file_path}: refused to unpickle the global '{module}.{name}'. "
          "This is not a Grok-1 tensor file and may have been tampered with: "
          "do not load it; re-download it from the release.")
    return allowed

  def persistent_load(self, pid):
    raise CheckpointError(
        f"{self._file_path}: refused a pickle persistent id; this is not a Grok-1 "
        "tensor file and may have been tampered with: do not load it.")


class BoundedReader:
  """A binary file whose reads never ask for more than the bytes left in it.

  A corrupt length field in a pickle then reads short (an error about a
  truncated file) instead of allocating the claimed size first.
  """

  def __init__(self, file, size: int):
    self._file = file
    self._size = size

  def read(self, count: int = -1) -> bytes:
    left = self._size - self._file.tell()
    return self._file.read(left if count < 0 else min(count, left))

  def readline(self) -> bytes:
    return self._file.readline()

  def readinto(self, buffer) -> int:
    return self._file.readinto(buffer)


@dataclasses.dataclass(frozen=True)
class _GlobalName:
  """A global written by its name, whether or not this Python can import it."""

  module: str
  name: str


_NUMPY1_RECONSTRUCT = _GlobalName("numpy.core.multiarray", "_reconstruct")
_QUANTIZED_WEIGHT_8BIT = _GlobalName("__main__", "QuantizedWeight8bit")


class ReleasePickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles tensors exactly as the release's numpy 1.x code did.

  numpy arrays: `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b"b")`
  then BUILD with (1, shape, dtype, False, data), readable by numpy 1.x and 2.x.
  QuantizedWeight: NEWOBJ of `__main__.QuantizedWeight8bit`, then BUILD with
  {"weight": ..., "scales": ...}, as a plain dataclass pickles. Globals are
  written by name, so nothing is registered in `__main__`. Based on the
  pure-Python pickler, whose dispatch table maps types to writers.
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file):
    super().__init__(file, protocol=PICKLE_PROTOCOL)

  def save_global_name(self, global_name: _GlobalName):
    self.save(global_name.module)
    self.save(global_name.name)
    self.write(pickle.STACK_GLOBAL)
    self.memoize(global_name)

  def save_ndarray(self, array: np.ndarray):
    array = np.asarray(array, order="C")
    self.save(_NUMPY1_RECONSTRUCT)
    self.save((np.ndarray, (0,), b"b"))
    self.write(pickle.REDUCE)
    self.memoize(array)
    self.write(pickle.MARK)
    for item in (1, tuple(array.shape), array.dtype, False):
      self.save(item)
    self._save_array_bytes(array)
    self.write(pickle.TUPLE + pickle.BUILD)

  def _save_array_bytes(self, array: np.ndarray):
    """The array's memory as a pickled bytes object, without copying it first."""
    data = memoryview(array.reshape(-1).view(np.uint8))  # [nbytes]
    if data.nbytes < self.framer._FRAME_SIZE_TARGET:
      self.save(data.tobytes())
      return
    if data.nbytes > 0xFFFFFFFF:
      header = pickle.BINBYTES8 + data.nbytes.to_bytes(8, "little")
    else:
      header = pickle.BINBYTES + data.nbytes.to_bytes(4, "little")
    self._write_large_bytes(header, data)

  def save_quantized_weight(self, weight: quant.QuantizedWeight):
    self.save(_QUANTIZED_WEIGHT_8BIT)
    self.save(())
    self.write(pickle.NEWOBJ)
    self.memoize(weight)
    self.save({"weight": np.asarray(weight.weight), "scales": np.asarray(weight.scales)})
    self.write(pickle.BUILD)

  dispatch[_GlobalName] = save_global_name
  dispatch[np.ndarray] = save_ndarray
  dispatch[quant.QuantizedWeight] = save_quantized_weight



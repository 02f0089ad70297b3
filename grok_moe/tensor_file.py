"""Reading one tensor file of a checkpoint: open, bound, decode, check, then build.

`read_tensor_file(file_path, entry)` returns the tensor the manifest entry
names, as a float32 numpy array or a `quant.QuantizedWeight` of numpy arrays,
or raises `CheckpointError` naming the file and the tensor. Steps:

  1. Open without following into FIFOs or devices (O_NONBLOCK, then fstat:
     only a regular file is read) and take its size from the open file.
  2. Refuse a size outside [least, most] bytes a file of this tensor can have,
     so a sparse or padded file is never read whole.
  3. Decode it with `release_pickle.decode` into plain specs (nothing is
     called, nothing from the file reaches a numpy constructor).
  4. Check the spec against the entry: the kind (array or QuantizedWeight8bit),
     dtype, exact shape and byte count (= the product of the shape times the
     item size).
  5. Only then build arrays with `np.frombuffer` over the checked bytes, and
     check float arrays and scales for NaN and inf, in chunks.

Every exception on the way, OSError included, becomes a CheckpointError.
"""

from __future__ import annotations

import math
import os
import pathlib
import stat
import threading

import numpy as np

from grok_moe import params as param_table
from grok_moe import quant, release_pickle
from grok_moe.errors import CheckpointError

# Pickle bytes around the tensor data: ~300 for a QuantizedWeight8bit record.
PICKLE_OVERHEAD_BYTES = 4096
FINITE_CHECK_ELEMENTS = 4 * 1024 * 1024  # checked per chunk, so the bool temp stays small


def size_bounds(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """(least, most) bytes of tensor data a file holding `name` of `shape` can have.

  Float tensors: 4 bytes an element. Quantized: an int8 weight plus bfloat16
  scales of R rows, 1 <= R <= K. The most adds the pickle's own overhead.
  """
  if param_table.row_blocks_for(name) is None:
    size = math.prod(shape) * 4
    return size, size + PICKLE_OVERHEAD_BYTES
  *batch, rows, cols = shape
  least = math.prod(shape) + math.prod(batch) * cols * 2
  most = math.prod(shape) + math.prod(batch) * rows * cols * 2
  return least, most + PICKLE_OVERHEAD_BYTES


def expected_form(name: str, shape: tuple[int, ...]) -> str:
  if param_table.row_blocks_for(name) is None:
    return f"float32 array of shape {shape}"
  *batch, rows, cols = shape
  return (f"QuantizedWeight8bit(weight: int8 array of shape {shape}, scales: bfloat16 "
          f"array of shape {(*batch, 'R', cols)} with R dividing {rows})")


def _array_fits(spec, code: str, shape_ok) -> bool:
  """Whether an ArraySpec has dtype `code`, a shape `shape_ok` accepts, and exactly its bytes."""
  if not isinstance(spec, release_pickle.ArraySpec) or spec.dtype is None:
    return False
  return (spec.dtype.code == code and shape_ok(spec.shape)
          and len(spec.data) == math.prod(spec.shape) * spec.dtype.numpy_dtype.itemsize)


def _scales_shape_ok(shape: tuple[int, ...]):
  *batch, rows, cols = shape

  def accepts(found: tuple[int, ...]) -> bool:
    return (len(found) == len(shape) and tuple(found[:-2]) == tuple(batch)
            and found[-1] == cols and found[-2] >= 1 and rows % found[-2] == 0)
  return accepts


def _build(spec: release_pickle.ArraySpec) -> np.ndarray:
  """The checked spec as a writable array over its bytes (small ones, read as bytes, are copied)."""
  data = spec.data if isinstance(spec.data, bytearray) else bytearray(spec.data)
  return np.frombuffer(data, dtype=spec.dtype.numpy_dtype).reshape(spec.shape)


def check_finite(array: np.ndarray, what: str, stop: threading.Event | None = None) -> None:
  """CheckpointError(`what` ...) if `array` holds a NaN or an inf; checked in chunks."""
  flat = array.reshape(-1)  # [n]
  for start in range(0, flat.size, FINITE_CHECK_ELEMENTS):
    if stop is not None and stop.is_set():
      raise release_pickle.Cancelled()
    chunk = flat[start:start + FINITE_CHECK_ELEMENTS]
    finite = np.isfinite(chunk)
    if not finite.all():
      index = start + int(np.argmin(finite))
      value = float(flat[index])
      raise CheckpointError(
          f"{what} holds {value} at flat index {index} (of {flat.size}); a checkpoint "
          "must hold finite weights: the file is corrupt or the model diverged. "
          "Re-download the file, or save the model again from finite params.")


def check_spec(value, name: str, shape: tuple[int, ...], where: str):
  """The leaf `value` (a decoded spec) stands for, if it is tensor `name` of `shape`.

  Float-only parameters must be float32 arrays of exactly `shape`; all others a
  QuantizedWeight8bit with an int8 weight of `shape` and bfloat16 scales
  [..., R, N] with R dividing K (the release uses R = 1 and R = 8). Nothing is
  converted, so a model is never silently changed. `where` names the file.
  """
  shape = tuple(shape)
  if param_table.row_blocks_for(name) is None:
    if _array_fits(value, "f4", lambda found: found == shape):
      return _build(value)
  elif isinstance(value, release_pickle.RecordSpec) and value.built:
    if (_array_fits(value.weight, "i1", lambda found: found == shape)
        and _array_fits(value.scales, release_pickle.BFLOAT16, _scales_shape_ok(shape))):
      return quant.QuantizedWeight(weight=_build(value.weight), scales=_build(value.scales))
  found = release_pickle.describe(value)
  for spec in (value, getattr(value, "weight", None), getattr(value, "scales", None)):
    if (isinstance(spec, release_pickle.ArraySpec) and spec.dtype is not None
        and len(spec.data) != math.prod(spec.shape) * spec.dtype.numpy_dtype.itemsize):
      found += f" whose data has {len(spec.data)} bytes instead of the shape's " \
               f"{math.prod(spec.shape) * spec.dtype.numpy_dtype.itemsize}"
  raise CheckpointError(
      f"{where} holds {name} as {found}; expected {expected_form(name, shape)}. If the "
      "file is intact, the checkpoint was made for another model: pass the config it "
      "was made with.")


def _open_regular(file_path: pathlib.Path, where: str):
  """(binary file, size) of a regular file; CheckpointError for anything else."""
  try:
    descriptor = os.open(file_path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  except FileNotFoundError:
    raise CheckpointError(f"tensor file {where} is missing (or a symlink to nothing); "
                          f"re-download {file_path.name}.") from None
  except OSError as error:
    raise CheckpointError(f"cannot open tensor file {where}: {error.strerror or error}; "
                          f"check its permissions, or re-download {file_path.name}.") from None
  try:
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
      raise CheckpointError(f"tensor file {where} is not a regular file (a directory, "
                            f"pipe or device); replace it with the real {file_path.name}.")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb"), info.st_size
  except BaseException:
    os.close(descriptor)
    raise


def read_tensor_file(file_path, entry, stop: threading.Event | None = None):
  """The tensor `entry` (`.name`, `.shape`) from `file_path`, checked; see the module docstring.

  Returns a float32 numpy array or a QuantizedWeight of an int8 and a bfloat16
  numpy array. `stop`, when set by another thread, makes a read in progress
  end within one chunk (16 MiB) with a CheckpointError.
  """
  file_path = pathlib.Path(file_path)
  name, shape = entry.name, tuple(entry.shape)
  where = f"{file_path} ({name})"
  try:
    file, size = _open_regular(file_path, where)
    with file:
      least, most = size_bounds(name, shape)
      if size < least:
        raise CheckpointError(
            f"{where} has {size} bytes, but a tensor of shape {shape} needs at least "
            f"{least}: the file is truncated or does not belong to this config. "
            f"Re-download {file_path.name}, or pass the config the checkpoint was made with.")
      if size > most:
        raise CheckpointError(
            f"{where} has {size} bytes, more than a tensor of shape {shape} can take "
            f"({most}): the file is corrupt or does not belong to this config. "
            f"Re-download {file_path.name}, or pass the config the checkpoint was made with.")
      value, trailing = release_pickle.decode(file, size, stop)
    leaf = check_spec(value, name, shape, str(file_path))
    if trailing:
      raise CheckpointError(
          f"{where} has {trailing} unexpected bytes after its tensor: the file is "
          f"corrupt; re-download {file_path.name}.")
    if isinstance(leaf, quant.QuantizedWeight):
      check_finite(leaf.scales, f"{where}, its scales,", stop)
    else:
      check_finite(leaf, where, stop)
    return leaf
  except CheckpointError:
    raise
  except release_pickle.Cancelled:
    raise CheckpointError(f"reading {where} was cancelled.") from None
  except release_pickle.UnsafeError as error:
    raise CheckpointError(
        f"{where}: {error}. This is not a Grok-1 tensor file and may have been tampered "
        f"with: do not load it; re-download {file_path.name} from the release.") from None
  except release_pickle.DecodeError as error:
    raise CheckpointError(f"{where} is not a valid tensor file ({error}): it is truncated, "
                          f"corrupt or was tampered with; re-download {file_path.name}.") from None
  except MemoryError:
    raise CheckpointError(f"out of memory reading {where}; free host memory or load "
                          "with fewer max_workers.") from None
  except Exception as error:  # pylint: disable=broad-except  # OSError from a read, or unforeseen
    raise CheckpointError(f"cannot read {where} ({type(error).__name__}: {error}); "
                          f"re-download {file_path.name}.") from None

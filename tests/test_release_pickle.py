"""Hostile tensor files, one per finding of issue 12: each must end in a CheckpointError.

Each payload is read with `tensor_file.read_tensor_file`, the loader's per-file
reader, and must fail fast with a message naming the file and the tensor.
Under the old loader (pickle.Unpickler with numpy's own rebuilders) these
payloads segfaulted, read process memory, hung, or took gigabytes.
"""

import io
import pickle
import resource
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from grok_moe import manifest, quant, release_pickle, tensor_file
from grok_moe.errors import CheckpointError

NORM = manifest.TensorEntry(1, "language_model/rms_norm/scale", (4,))           # float32 [4]
KEY = manifest.TensorEntry(5, "transformer/decoder_layer_0/multi_head_attention/key/w", (8, 6))
RECONSTRUCT = np.zeros(1).__reduce_ex__(4)[0]  # numpy's _reconstruct under this numpy's name


class Reduces:
  """Pickles as `function(*args)`, then BUILD with `state` when given."""

  def __init__(self, function, args, state=None):
    self.reduced = (function, args) if state is None else (function, args, state)

  def __reduce__(self):
    return self.reduced


def dtype_pickle(code, state):
  """A numpy.dtype(code, False, True) pickle whose BUILD state is `state`."""
  return Reduces(np.dtype, (code, False, True), state)


def array_pickle(dtype, shape, data, version=1, fortran=False):
  """numpy's own _reconstruct + BUILD array pickle, with any dtype, shape and data."""
  return Reduces(RECONSTRUCT, (np.ndarray, (0,), b"b"), (version, shape, dtype, fortran, data))


PLAIN_F4 = (3, "<", None, None, None, -1, -1, 0)


def opcodes(*parts: bytes) -> bytes:
  """A protocol-4 pickle of the given opcode bytes."""
  return pickle.PROTO + b"\x04" + b"".join(parts) + pickle.STOP


def text(value: str) -> bytes:
  data = value.encode()
  return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def read(tmp_path, payload, entry=NORM, pad=True):
  """read_tensor_file on `payload` (an object to pickle, or bytes), padded to the least size."""
  data = payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=4)
  least, _ = tensor_file.size_bounds(entry.name, entry.shape)
  path = tmp_path / "tensor00001_000"
  path.write_bytes(data.ljust(least, b"\0") if pad else data)
  return tensor_file.read_tensor_file(path, entry)


def assert_refused(tmp_path, payload, pattern, entry=NORM):
  with pytest.raises(CheckpointError, match=pattern) as raised:
    read(tmp_path, payload, entry)
  message = str(raised.value)
  assert "tensor00001_000" in message and entry.name in message
  return message


def test_a_valid_file_reads_as_a_writable_array_over_its_own_bytes(tmp_path):
  """Catches the decoder rejecting the format it must read (the baseline for the rest)."""
  value = np.arange(4, dtype=np.float32)
  leaf = read(tmp_path, array_pickle(np.dtype("f4"), (4,), value.tobytes()), pad=False)
  assert leaf.dtype == np.float32 and leaf.flags.writeable and np.array_equal(leaf, value)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_numpy_pickles_of_every_protocol_with_binbytes_read(tmp_path, protocol):
  """Catches a decoder that knows only the opcodes of one protocol (GLOBAL/BINPUT in 3).

  The quantized weight is written by ReleasePickler, as the release wrote it.
  """
  weight = np.arange(48, dtype=np.int8).reshape(8, 6)
  scales = np.linspace(1, 2, 12).astype(ml_dtypes.bfloat16).reshape(2, 6)
  path = tmp_path / "tensor00005_000"
  floats = np.arange(4, dtype=np.float32)
  path.write_bytes(pickle.dumps(floats, protocol=protocol))
  assert np.array_equal(tensor_file.read_tensor_file(path, NORM), floats)
  buffer = io.BytesIO()
  release_pickle.ReleasePickler(buffer).dump(quant.QuantizedWeight(weight, scales))
  path.write_bytes(buffer.getvalue())
  leaf = tensor_file.read_tensor_file(path, KEY)
  assert np.array_equal(leaf.weight, weight) and leaf.scales.tobytes() == scales.tobytes()


# Finding 1: dtype states that crash numpy.

def test_1_a_dtype_build_with_a_6_item_state_is_refused(tmp_path):
  """Catches numpy.dtype.__setstate__ seeing a crafted state (it segfaulted)."""
  dtype = dtype_pickle("f4", (3, "<", None, None, None, -1))
  assert_refused(tmp_path, array_pickle(dtype, (4,), b"\0" * 16), r"state numpy never writes")


def test_1_a_void_dtype_with_an_object_field_is_refused(tmp_path):
  """Catches file bytes treated as object pointers (a free at a file-chosen address)."""
  fields = {"a": (np.dtype("O"), 0)}
  void = dtype_pickle("V8", (3, "|", None, ("a",), fields, 8, 1, 63))
  assert_refused(tmp_path, array_pickle(void, (64,), b"\x41" * 512), r"dtype")
  # The same shape of state under the float32 code (plain data only, so no inner dtype).
  disguised = dtype_pickle("f4", (3, "<", None, ("a",), {"a": 0}, 8, 1, 63))
  assert_refused(tmp_path, array_pickle(disguised, (4,), b"\0" * 16), r"fields")


# Finding 2: numpy.ndarray with a negative offset.

@pytest.mark.parametrize("offset", [-4096, -2**62])
def test_2_ndarray_with_a_negative_offset_is_refused(tmp_path, offset):
  """Catches a tensor that holds process memory from before its buffer."""
  payload = Reduces(np.ndarray, ((4,), "f4", b"\0" * 16, offset))
  assert_refused(tmp_path, payload, r"ndarray")


# Finding 3: dtypes that compare equal to float32 but are not plain.

@pytest.mark.parametrize("state", [
    (3, "<", None, None, None, -1, -1, 16),                  # flags
    (3, "<", (np.dtype("f4"), (2,)), None, None, -1, -1, 0),  # a sub-array
    (3, ">", None, None, None, -1, -1, 0),                   # big-endian
])
def test_3_a_float32_dtype_with_flags_sub_array_or_byte_order_is_refused(tmp_path, state):
  """Catches the old `dtype == float32` check passing these on to JAX's bare TypeError."""
  assert_refused(tmp_path, array_pickle(dtype_pickle("f4", state), (4,), b"\0" * 16),
                 r"state numpy never writes")


def test_3_data_of_the_wrong_length_is_refused(tmp_path):
  """Catches an array built over fewer (or more) bytes than its shape needs."""
  message = assert_refused(tmp_path, array_pickle(dtype_pickle("f4", PLAIN_F4), (4,), b"\0" * 12),
                           r"float32 array of shape \(4,\) whose data has 12 bytes")
  assert "instead of the shape's 16" in message


# Finding 4: a record that is created but never built.

def test_4_a_quantized_weight_never_built_is_refused(tmp_path):
  """Catches the bare AttributeError of reading .weight from an empty record."""
  payload = opcodes(text("__main__"), text("QuantizedWeight8bit"), pickle.STACK_GLOBAL,
                    pickle.EMPTY_TUPLE, pickle.NEWOBJ)
  assert_refused(tmp_path, payload, r"QuantizedWeight8bit that is never filled in", KEY)


# Finding 5: hashing a huge tuple DAG, and deep nesting.

def test_5_nested_tuples_as_a_dict_key_are_refused_fast(tmp_path):
  """Catches the 860-byte file whose dict key takes 2**60 steps to hash."""
  parts = [pickle.EMPTY_TUPLE, pickle.MEMOIZE]
  for index in range(60):  # t[i+1] = (t[i], t[i]): a tree of 2**60 leaves in 60 memo entries
    parts += [pickle.BINGET + bytes([index]), pickle.BINGET + bytes([index]), pickle.TUPLE2,
              pickle.MEMOIZE]
  payload = opcodes(*parts, pickle.EMPTY_DICT, pickle.BINGET + bytes([60]), pickle.NONE,
                    pickle.SETITEM)
  start = time.perf_counter()
  assert_refused(tmp_path, payload, r"nested more than 4 deep")
  assert time.perf_counter() - start < 1.0


def test_5_a_tuple_nested_a_million_deep_is_refused(tmp_path):
  """Catches the C stack overflow of a million nested tuples."""
  entry = manifest.TensorEntry(1, "language_model/rms_norm/scale", (250_000,))  # fits the file
  payload = opcodes(pickle.EMPTY_TUPLE, pickle.TUPLE1 * 1_000_000)
  assert_refused(tmp_path, payload, r"nested more than 4 deep", entry)


# Finding 6: small files that allocate gigabytes.

def _peak_rss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_6_an_object_array_payload_is_refused_without_allocating(tmp_path):
  """Catches the 29-byte object array that took 4 GB before its error."""
  before = _peak_rss_bytes()
  object_dtype = dtype_pickle("O8", (3, "|", None, None, None, -1, -1, 63))
  assert_refused(tmp_path, array_pickle(object_dtype, (2**29,), []), r"dtype")
  assert _peak_rss_bytes() - before < 64 * 2**20


def test_6_a_huge_memo_index_is_refused_without_allocating(tmp_path):
  """Catches the 7-byte LONG_BINPUT 2**28 that grew the memo to 4.4 GB."""
  before = _peak_rss_bytes()
  payload = opcodes(pickle.NONE, pickle.LONG_BINPUT + (2**28).to_bytes(4, "little"))
  assert_refused(tmp_path, payload, r"memo index 268435456")
  assert _peak_rss_bytes() - before < 64 * 2**20


def test_6_a_length_field_larger_than_the_file_is_refused_before_reading(tmp_path):
  """Catches a BINBYTES8 that claims 2**40 bytes being allocated first."""
  payload = opcodes(pickle.BINBYTES8 + (2**40).to_bytes(8, "little"))
  assert_refused(tmp_path, payload, r"claims 1099511627776 bytes")


def test_6_a_file_far_larger_than_its_tensor_is_refused_unread(tmp_path):
  """Catches a sparse multi-gigabyte file being read whole."""
  path = tmp_path / "tensor00001_000"
  with open(path, "wb") as file:
    file.truncate(2**32)  # sparse: 4 GiB that take no disk
  with pytest.raises(CheckpointError, match=r"more than a tensor of shape \(4,\) can take"):
    tensor_file.read_tensor_file(path, NORM)


# Finding 7: opcodes that reach objects without find_class.

@pytest.mark.parametrize("payload, opcode", [
    (opcodes(pickle.EXT1 + b"\x01"), "EXT1"),
    (opcodes(pickle.EXT2 + b"\x01\x00"), "EXT2"),
    (opcodes(pickle.NONE, pickle.BINPERSID), "BINPERSID"),
    (opcodes(pickle.PERSID + b"0\n"), "PERSID"),
])
def test_7_ext_opcodes_and_persistent_ids_are_refused_as_tampering(tmp_path, payload, opcode):
  """Catches EXT codes served from copyreg's cache without going through the allow-list."""
  message = assert_refused(tmp_path, payload, rf"refused the pickle opcode {opcode}")
  assert "tampered" in message


def test_a_global_outside_the_allow_list_is_refused_and_never_imported(tmp_path):
  """Catches a decoder that imports (and so runs) a module a file names."""
  payload = opcodes(text("this_module_does_not_exist"), text("run"), pickle.STACK_GLOBAL)
  assert_refused(tmp_path, payload, r"'this_module_does_not_exist.run'.*tampered")


def test_the_opcode_count_is_capped(tmp_path):
  """Catches a file of endless no-op work (NONE/POP-style loops) running unbounded."""
  entry = manifest.TensorEntry(1, "language_model/rms_norm/scale", (1000,))
  payload = opcodes(*[pickle.NONE + pickle.MEMOIZE] * 30, *[pickle.MARK + pickle.TUPLE] * 1500)
  assert_refused(tmp_path, payload, r"more than 100 values|more than 2000 pickle opcodes", entry)


def test_a_stop_event_cancels_a_read(tmp_path):
  """Catches a reader that ignores the loader's stop event (Ctrl-C would wait for it)."""
  stop = threading.Event()
  stop.set()
  path = tmp_path / "tensor00001_000"
  path.write_bytes(pickle.dumps(np.zeros(4, np.float32), protocol=4))
  with pytest.raises(CheckpointError, match=r"cancelled"):
    tensor_file.read_tensor_file(path, NORM, stop)

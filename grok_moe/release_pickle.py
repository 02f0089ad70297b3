"""The release's tensor-file pickle format: decoded as plain data, written as the release did.

Reading: `decode` is a small pickle interpreter of its own, not `pickle.Unpickler`.
It knows only the opcodes a tensor file uses and the few objects the release
pickles, and it records them as plain data instead of calling anything:

  * `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b"b")` then BUILD
    with (1, shape, dtype, fortran, data) -> `ArraySpec` (also under numpy 2's
    `numpy._core` names);
  * `numpy._core.numeric._frombuffer(data, dtype, shape, "C")`, what protocol 5
    writes -> `ArraySpec`;
  * `numpy.dtype(code, False, True)` then BUILD with its 8-item state ->
    `DtypeSpec`, where code is one of `DTYPE_CODES` or `ml_dtypes.bfloat16`
    and the state must describe a plain dtype (no sub-array, fields, names;
    the byte order and flags numpy writes for that code);
  * `__main__.QuantizedWeight8bit` (NEWOBJ) then BUILD with {"weight", "scales"}
    -> `RecordSpec`.

No numpy constructor ever sees file state: `tensor_file` checks a spec against
the expected tensor and only then makes an array with `np.frombuffer` over the
checked bytes. Every other global, EXT opcodes and persistent ids are refused;
the memo index, stack, marks, tuple nesting, string lengths and opcode count
are capped far above what a tensor file needs; a length field is never
trusted beyond the bytes left in the file; big byte strings are read in chunks
that a `stop` event can interrupt.

Writing: `ReleasePickler` writes numpy 1.x names and `__main__.QuantizedWeight8bit`
records, readable by the release's own code.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
from typing import BinaryIO

import numpy as np
import ml_dtypes

from grok_moe import quant

PICKLE_PROTOCOL = 4

# Caps, each far above what a release tensor file needs (about 40 opcodes,
# memo indices < 40, tuples of <= 8 items nested 2 deep).
MAX_OPCODES = 2000
MAX_MEMO_INDEX = 1000
MAX_STACK = 100
MAX_MARKS = 10
MAX_TUPLE_ITEMS = 16
MAX_TUPLE_DEPTH = 4
MAX_TEXT_BYTES = 64
MAX_INT_BYTES = 8
READ_CHUNK_BYTES = 16 * 1024 * 1024

# dtype codes a tensor file may name (the format uses f4, i1 and bfloat16; the
# others are decoded only to say what a wrong file holds).
DTYPE_CODES = {code: np.dtype(code) for code in (
    "f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")}
BFLOAT16 = "bfloat16"
_BFLOAT16_DTYPE = np.dtype(ml_dtypes.bfloat16)


class DecodeError(Exception):
  """The bytes are not a release tensor file (the message says why)."""


class UnsafeError(DecodeError):
  """The file names a global or opcode a tensor file never uses: it may have been tampered with."""


class Cancelled(Exception):
  """Decoding stopped because the caller set its stop event."""


@dataclasses.dataclass
class DtypeSpec:
  """A pickled numpy dtype: its code ('f4', 'i1', ..., 'bfloat16'), once its state checked out."""

  code: str
  built: bool = False

  @property
  def numpy_dtype(self) -> np.dtype:
    return _BFLOAT16_DTYPE if self.code == BFLOAT16 else DTYPE_CODES[self.code]


@dataclasses.dataclass
class ArraySpec:
  """A pickled array as plain data; shape, dtype and data are None until BUILD."""

  shape: tuple[int, ...] | None = None
  dtype: DtypeSpec | None = None
  data: bytearray | bytes | None = None

  def describe(self) -> str:
    if self.dtype is None:
      return "an ndarray that is never filled in"
    return f"{self.dtype.numpy_dtype.name} array of shape {self.shape}"


@dataclasses.dataclass
class RecordSpec:
  """A pickled `__main__.QuantizedWeight8bit`; fields None until BUILD."""

  weight: ArraySpec | None = None
  scales: ArraySpec | None = None
  built: bool = False

  def describe(self) -> str:
    if not self.built:
      return "a QuantizedWeight8bit that is never filled in"
    return (f"QuantizedWeight8bit(weight: {self.weight.describe()}, "
            f"scales: {self.scales.describe()})")


@dataclasses.dataclass(frozen=True)
class _Global:
  """One of the globals a tensor file may name; `role` says which."""

  role: str


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Global("reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _Global("reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): _Global("frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _Global("frombuffer"),
    ("numpy", "ndarray"): _Global("ndarray"),
    ("numpy", "dtype"): _Global("dtype"),
    ("ml_dtypes", "bfloat16"): _Global(BFLOAT16),
    ("__main__", "QuantizedWeight8bit"): _Global("record"),
}


def describe(value) -> str:
  """What a decoded value is, in words, for error messages."""
  if isinstance(value, (ArraySpec, RecordSpec)):
    return value.describe()
  if isinstance(value, _Global):
    return f"the bare global {value.role}"
  return f"a {type(value).__name__}"


def _dtype_state_is_plain(code: str, state) -> bool:
  """Whether a dtype BUILD state is what numpy writes for `code`.

  (version 3, byte order, sub-array None, names None, fields None, elsize,
  alignment, flags): builtin dtypes write -1, -1, 0; bfloat16, a user dtype,
  writes its item size twice and ml_dtypes' flags (which vary by version and
  say nothing about layout; the dtype is never built from them).
  """
  if not (isinstance(state, tuple) and len(state) == 8
          and all(type(item) in (int, str, type(None)) for item in state)):
    return False
  version, order, subarray, names, fields, elsize, alignment, flags = state
  dtype = DTYPE_CODES.get(code, _BFLOAT16_DTYPE)
  expected_order = "|" if dtype.itemsize == 1 else "<"
  if version != 3 or order != expected_order or (subarray, names, fields) != (None,) * 3:
    return False
  if code == BFLOAT16:
    return (elsize == alignment == 2 and type(flags) is int
            and 0 <= flags < 256)
  return (elsize, alignment, flags) == (-1, -1, 0)


def _is_shape(value) -> bool:
  return (isinstance(value, tuple) and len(value) <= 8
          and all(type(dim) is int and 0 <= dim < 2**40 for dim in value))


class _Decoder:
  """One pass over a tensor pickle; `decode` is the entry point."""

  def __init__(self, file: BinaryIO, size: int, stop: threading.Event | None):
    self._file = file
    self._left = size  # bytes of the file not read yet
    self._stop = stop
    self._stack: list = []
    self._marks: list[list] = []
    self._memo: dict[int, object] = {}
    self._depths: dict[int, int] = {}  # id(tuple) -> nesting depth; tuples stay alive in memo/stack
    self._tuples: list[tuple] = []     # keeps every tuple alive so ids stay unique
    self._protocol_seen = False

  # --- Reading bytes. ---

  def _read(self, count: int) -> bytes:
    if count > self._left:
      raise DecodeError(f"a field claims {count} bytes but only {self._left} are left "
                        "(the file is truncated)")
    data = self._file.read(count)
    if len(data) != count:
      raise DecodeError("the file is truncated (it shrank while being read)")
    self._left -= count
    return data

  def _read_blob(self, count: int) -> bytearray:
    """`count` bytes into a new bytearray, in chunks, checking `stop` between them."""
    if count > self._left:
      raise DecodeError(f"a byte string claims {count} bytes but only {self._left} are "
                        "left (the file is truncated)")
    blob = bytearray(count)
    view = memoryview(blob)
    done = 0
    while done < count:
      self._check_stop()
      got = self._file.readinto(view[done:done + READ_CHUNK_BYTES])
      if not got:
        raise DecodeError("the file is truncated (it shrank while being read)")
      done += got
    self._left -= count
    return blob

  def _check_stop(self):
    if self._stop is not None and self._stop.is_set():
      raise Cancelled()

  def _unsigned(self, count: int) -> int:
    return int.from_bytes(self._read(count), "little")

  # --- The stack. ---

  def _push(self, value):
    if len(self._stack) >= MAX_STACK:
      raise DecodeError(f"more than {MAX_STACK} values on the pickle stack")
    self._stack.append(value)

  def _pop(self):
    if not self._stack:
      raise DecodeError("an opcode pops an empty pickle stack")
    return self._stack.pop()

  def _pop_mark(self) -> list:
    if not self._marks:
      raise DecodeError("an opcode needs a MARK that is not there")
    items = self._stack
    self._stack = self._marks.pop()
    return items

  def _make_tuple(self, items) -> tuple:
    if len(items) > MAX_TUPLE_ITEMS:
      raise DecodeError(f"a tuple of {len(items)} items (a tensor file needs at most 8)")
    value = tuple(items)
    depth = 1 + max((self._depths.get(id(item), 0) for item in items
                     if isinstance(item, tuple)), default=0)
    if depth > MAX_TUPLE_DEPTH:
      raise DecodeError(f"tuples nested more than {MAX_TUPLE_DEPTH} deep")
    self._tuples.append(value)
    self._depths[id(value)] = depth
    return value

  # --- Opcodes. ---

  def decode(self):
    for _ in range(MAX_OPCODES):
      self._check_stop()
      code = self._read(1)
      handler = _OPCODES.get(code)
      if handler is None:
        name = _OPCODE_NAMES.get(code)
        if name in _UNSAFE_OPCODES:
          raise UnsafeError(f"refused the pickle opcode {name}")
        raise DecodeError(f"opcode {name or code!r} is not used by tensor files")
      if handler is _Decoder._stop_opcode:
        return self._stop_opcode()
      handler(self)
    raise DecodeError(f"more than {MAX_OPCODES} pickle opcodes")

  def _stop_opcode(self):
    value = self._pop()
    if self._stack or self._marks:
      raise DecodeError("values left on the pickle stack at STOP")
    return value

  def _proto(self):
    protocol = self._unsigned(1)
    if self._protocol_seen or not 2 <= protocol <= 5:
      raise DecodeError(f"pickle protocol {protocol} (tensor files use 2 to 5, once)")
    self._protocol_seen = True

  def _frame(self):
    length = self._unsigned(8)
    if length > self._left:
      raise DecodeError(f"a frame claims {length} bytes but only {self._left} are left "
                        "(the file is truncated)")

  def _text(self, length: int):
    if length > MAX_TEXT_BYTES:
      raise DecodeError(f"a string of {length} bytes (tensor files use names of < 40)")
    try:
      self._push(self._read(length).decode("utf-8"))
    except UnicodeDecodeError:
      raise DecodeError("a string that is not UTF-8") from None

  def _short_binunicode(self):
    self._text(self._unsigned(1))

  def _binunicode(self):
    self._text(self._unsigned(4))

  def _short_binbytes(self):
    self._push(self._read(self._unsigned(1)))

  def _binbytes(self):
    self._push(self._read_blob(self._unsigned(4)))

  def _binbytes8(self):
    self._push(self._read_blob(self._unsigned(8)))

  def _bytearray8(self):
    self._push(self._read_blob(self._unsigned(8)))

  def _binint(self):
    self._push(int.from_bytes(self._read(4), "little", signed=True))

  def _binint1(self):
    self._push(self._unsigned(1))

  def _binint2(self):
    self._push(self._unsigned(2))

  def _long1(self):
    length = self._unsigned(1)
    if length > MAX_INT_BYTES:
      raise DecodeError(f"an integer of {length} bytes")
    self._push(int.from_bytes(self._read(length), "little", signed=True))

  def _none(self):
    self._push(None)

  def _newtrue(self):
    self._push(True)

  def _newfalse(self):
    self._push(False)

  def _empty_tuple(self):
    self._push(self._make_tuple(()))

  def _tuple1(self):
    self._push(self._make_tuple([self._pop()]))

  def _tuple2(self):
    second = self._pop()
    self._push(self._make_tuple([self._pop(), second]))

  def _tuple3(self):
    third, second = self._pop(), self._pop()
    self._push(self._make_tuple([self._pop(), second, third]))

  def _mark(self):
    if len(self._marks) >= MAX_MARKS:
      raise DecodeError(f"more than {MAX_MARKS} nested MARKs")
    self._marks.append(self._stack)
    self._stack = []

  def _tuple(self):
    self._push(self._make_tuple(self._pop_mark()))

  def _empty_dict(self):
    self._push({})

  def _setitem(self):
    value, key = self._pop(), self._pop()
    self._set_items([key, value])

  def _setitems(self):
    self._set_items(self._pop_mark())

  def _set_items(self, items):
    """Into the dict on top of the stack: only str keys (so hashing is trivial), at most 2."""
    target = self._stack[-1] if self._stack else None
    if not isinstance(target, dict) or len(items) % 2:
      raise DecodeError("SETITEMS on something that is not a dict")
    for key, value in zip(items[::2], items[1::2]):
      if type(key) is not str:
        raise DecodeError(f"a dict key that is {describe(key)}, not a string")
      target[key] = value
      if len(target) > 2:
        raise DecodeError("a dict of more than 2 items (a record has weight and scales)")

  def _memoize(self):
    self._put(len(self._memo))

  def _binput(self):
    self._put(self._unsigned(1))

  def _long_binput(self):
    self._put(self._unsigned(4))

  def _put(self, index: int):
    if index >= MAX_MEMO_INDEX:
      raise DecodeError(f"memo index {index} (tensor files use < {MAX_MEMO_INDEX})")
    if not self._stack:
      raise DecodeError("MEMOIZE with an empty stack")
    self._memo[index] = self._stack[-1]

  def _binget(self):
    self._get(self._unsigned(1))

  def _long_binget(self):
    self._get(self._unsigned(4))

  def _get(self, index: int):
    if index not in self._memo:
      raise DecodeError(f"memo index {index} is read before it is written")
    self._push(self._memo[index])

  def _stack_global(self):
    name, module = self._pop(), self._pop()
    if type(module) is not str or type(name) is not str:
      raise DecodeError("STACK_GLOBAL of something other than two strings")
    self._push(self._global(module, name))

  def _global_opcode(self):
    module = self._line()
    name = self._line()
    self._push(self._global(module, name))

  def _line(self) -> str:
    data = b""
    while not data.endswith(b"\n"):
      if len(data) > MAX_TEXT_BYTES:
        raise DecodeError("a GLOBAL name longer than a tensor file uses")
      data += self._read(1)
    try:
      return data[:-1].decode("ascii")
    except UnicodeDecodeError:
      raise DecodeError("a GLOBAL name that is not ASCII") from None

  @staticmethod
  def _global(module: str, name: str) -> _Global:
    allowed = _ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise UnsafeError(f"refused to unpickle the global '{module}.{name}'")
    return allowed

  def _reduce(self):
    args, function = self._pop(), self._pop()
    if not isinstance(function, _Global) or not isinstance(args, tuple):
      raise DecodeError(f"REDUCE of {describe(function)}")
    if function.role == "reconstruct":
      if (len(args) == 3 and args[0] == _Global("ndarray") and args[1] == (0,)
          and args[2] == b"b"):
        self._push(ArraySpec())
        return
    elif function.role == "dtype":
      if len(args) == 3 and type(args[1]) is bool and args[2] is True:
        code = args[0]
        if code == _Global(BFLOAT16):
          self._push(DtypeSpec(BFLOAT16))
          return
        if type(code) is str and code in DTYPE_CODES:
          self._push(DtypeSpec(code))
          return
    elif function.role == "frombuffer":
      if (len(args) == 4 and isinstance(args[0], (bytes, bytearray))
          and isinstance(args[1], DtypeSpec) and args[1].built and _is_shape(args[2])
          and args[3] == "C"):
        self._push(ArraySpec(shape=args[2], dtype=args[1], data=args[0]))
        return
    raise DecodeError(f"a call of {function.role} with arguments a tensor file never has")

  def _newobj(self):
    args, cls = self._pop(), self._pop()
    if cls != _Global("record") or args != ():
      raise DecodeError(f"NEWOBJ of {describe(cls)}")
    self._push(RecordSpec())

  def _build(self):
    state, target = self._pop(), self._pop()
    if isinstance(target, DtypeSpec) and not target.built:
      if not _dtype_state_is_plain(target.code, state):
        raise DecodeError(f"a {target.code} dtype with a state numpy never writes for it "
                          "(flags, fields, sub-arrays or another byte order)")
      target.built = True
    elif isinstance(target, ArraySpec) and target.dtype is None:
      if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
              and type(state[0]) is int and _is_shape(state[1])
              and isinstance(state[2], DtypeSpec) and state[2].built
              and state[3] is False and isinstance(state[4], (bytes, bytearray))):
        raise DecodeError("an array state that is not (1, shape, dtype, False, bytes)")
      target.shape, target.dtype, target.data = state[1], state[2], state[4]
    elif isinstance(target, RecordSpec) and not target.built:
      if not (isinstance(state, dict) and set(state) == {"weight", "scales"}
              and all(isinstance(value, ArraySpec) and value.dtype is not None
                      for value in state.values())):
        fields = sorted(state) if isinstance(state, dict) else describe(state)
        raise DecodeError(f"a QuantizedWeight8bit record with fields {fields}, expected "
                          "['scales', 'weight'] holding arrays")
      target.weight, target.scales, target.built = state["weight"], state["scales"], True
    else:
      raise DecodeError(f"BUILD of {describe(target)}")
    self._push(target)


_OPCODES = {
    pickle.PROTO: _Decoder._proto,
    pickle.FRAME: _Decoder._frame,
    pickle.STOP: _Decoder._stop_opcode,
    pickle.SHORT_BINUNICODE: _Decoder._short_binunicode,
    pickle.BINUNICODE: _Decoder._binunicode,
    pickle.SHORT_BINBYTES: _Decoder._short_binbytes,
    pickle.BINBYTES: _Decoder._binbytes,
    pickle.BINBYTES8: _Decoder._binbytes8,
    pickle.BYTEARRAY8: _Decoder._bytearray8,
    pickle.BININT: _Decoder._binint,
    pickle.BININT1: _Decoder._binint1,
    pickle.BININT2: _Decoder._binint2,
    pickle.LONG1: _Decoder._long1,
    pickle.NONE: _Decoder._none,
    pickle.NEWTRUE: _Decoder._newtrue,
    pickle.NEWFALSE: _Decoder._newfalse,
    pickle.EMPTY_TUPLE: _Decoder._empty_tuple,
    pickle.TUPLE1: _Decoder._tuple1,
    pickle.TUPLE2: _Decoder._tuple2,
    pickle.TUPLE3: _Decoder._tuple3,
    pickle.MARK: _Decoder._mark,
    pickle.TUPLE: _Decoder._tuple,
    pickle.EMPTY_DICT: _Decoder._empty_dict,
    pickle.SETITEM: _Decoder._setitem,
    pickle.SETITEMS: _Decoder._setitems,
    pickle.MEMOIZE: _Decoder._memoize,
    pickle.BINPUT: _Decoder._binput,
    pickle.LONG_BINPUT: _Decoder._long_binput,
    pickle.BINGET: _Decoder._binget,
    pickle.LONG_BINGET: _Decoder._long_binget,
    pickle.STACK_GLOBAL: _Decoder._stack_global,
    pickle.GLOBAL: _Decoder._global_opcode,
    pickle.REDUCE: _Decoder._reduce,
    pickle.NEWOBJ: _Decoder._newobj,
    pickle.BUILD: _Decoder._build,
}
_OPCODE_NAMES = {getattr(pickle, name): name for name in dir(pickle)
                 if name.isupper() and isinstance(getattr(pickle, name), bytes)
                 and len(getattr(pickle, name)) == 1}
# Opcodes that reach objects without naming a global: refused as tampering.
_UNSAFE_OPCODES = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "INST", "OBJ",
                   "NEXT_BUFFER", "READONLY_BUFFER"}


def decode(file: BinaryIO, size: int, stop: threading.Event | None = None):
  """Decode the pickle in `file` (which holds `size` bytes from its position) as plain data.

  Returns an ArraySpec, RecordSpec or whatever else the pickle's top value is
  (a str, tuple, ...; the caller refuses it). Raises UnsafeError for globals
  and opcodes a tensor file never uses, DecodeError for any other malformed
  pickle, Cancelled when `stop` is set. Reads at most `size` bytes and
  returns (value, bytes left after STOP), so the caller can refuse trailing bytes.
  """
  decoder = _Decoder(file, size, stop)
  value = decoder.decode()
  return value, decoder._left  # pylint: disable=protected-access


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



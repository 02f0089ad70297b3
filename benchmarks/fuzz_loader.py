"""Fuzzing the tensor-file reader: seeded mutations of the demo's files and hostile payloads.

    python -m benchmarks.fuzz_loader --cases 5000 [--seed 0] [--json results.json]

Each case is one tensor file of checkpoints/demo, mutated (bit flips, byte
changes, inserts, deletes, truncations, splices; mostly in the pickle's
first 512 bytes, where the structure is) or replaced by a hand-written
hostile payload (issue 12's findings), then read with
`tensor_file.read_tensor_file` against its manifest entry. Cases run in a
worker subprocess with an address-space cap (RLIMIT_AS, 3 GiB); a worker that
dies is a crash, one silent for 10 s a hang, and the next worker resumes after
that case. Outcomes:

  ok      the file loaded (a flipped weight byte the format cannot detect)
  error   CheckpointError
  raw     any other exception (a bug: the loader promises CheckpointError)
  crash   the worker died (a signal, such as a segfault)
  hang    no answer within the timeout

For each case the worker also records its peak RSS above the RSS before the
case (VmHWM after clearing it). Prints a summary; exits 1 unless there are 0
crashes, 0 hangs, 0 raw exceptions and the peak stays under
4 x the largest tensor file + 16 MiB of slack for Python's own allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import random
import resource
import select
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "checkpoints" / "demo"
MEMORY_CAP_BYTES = 3 * 2**30
CASE_TIMEOUT_S = 10.0
HEADER_BYTES = 512
MB = 2**20


def _text(value: str) -> bytes:
  data = value.encode()
  return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def _p4(*parts: bytes) -> bytes:
  return pickle.PROTO + b"\x04" + b"".join(parts) + pickle.STOP


def _dtype(code: str, state: bytes) -> bytes:
  """numpy.dtype(code, False, True) then BUILD with the given pickled state tuple."""
  return (_text("numpy") + _text("dtype") + pickle.STACK_GLOBAL + _text(code)
          + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE + state + pickle.BUILD)


def _array(dtype: bytes, shape: bytes, data: bytes) -> bytes:
  """numpy's _reconstruct(ndarray, (0,), b'b'), then BUILD with (1, shape, dtype, False, data)."""
  return (_text("numpy._core.multiarray") + _text("_reconstruct") + pickle.STACK_GLOBAL
          + _text("numpy") + _text("ndarray") + pickle.STACK_GLOBAL
          + pickle.BININT1 + b"\0" + pickle.TUPLE1 + pickle.SHORT_BINBYTES + b"\x01b"
          + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + pickle.BININT1 + b"\x01" + shape
          + dtype + pickle.NEWFALSE + data + pickle.TUPLE + pickle.BUILD)


def _state(*items: bytes) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


_NONE3 = pickle.NONE * 3
_MINUS1 = pickle.BININT + (-1).to_bytes(4, "little", signed=True)
_SHAPE4 = pickle.BININT1 + b"\x04" + pickle.TUPLE1


def hostile_payloads() -> dict[str, bytes]:
  """Hand-written payloads, one or more per finding of issue 12 (for a float32 [4] entry)."""
  six_item = _state(pickle.BININT1 + b"\x03", _text("<"), _NONE3, _MINUS1)
  flags = _state(pickle.BININT1 + b"\x03", _text("<"), _NONE3, _MINUS1, _MINUS1,
                 pickle.BININT1 + b"\x10")
  plain = _state(pickle.BININT1 + b"\x03", _text("<"), _NONE3, _MINUS1, _MINUS1,
                 pickle.BININT1 + b"\0")
  data16 = pickle.SHORT_BINBYTES + b"\x10" + b"\0" * 16
  dag = [pickle.EMPTY_TUPLE, pickle.MEMOIZE]
  for index in range(60):
    dag += [pickle.BINGET + bytes([index])] * 2 + [pickle.TUPLE2, pickle.MEMOIZE]
  return {
      "1 dtype with a 6-item state": _p4(_array(_dtype("f4", six_item), _SHAPE4, data16)),
      "1 void dtype": _p4(_array(_dtype("V8", plain), _SHAPE4, data16)),
      "2 ndarray with a negative offset": _p4(
          _text("numpy") + _text("ndarray") + pickle.STACK_GLOBAL + pickle.MARK + _SHAPE4
          + _text("f4") + data16 + pickle.BININT + (-4096).to_bytes(4, "little", signed=True)
          + pickle.TUPLE + pickle.REDUCE),
      "3 float32 dtype with flags": _p4(_array(_dtype("f4", flags), _SHAPE4, data16)),
      "4 record never built": _p4(_text("__main__") + _text("QuantizedWeight8bit")
                                  + pickle.STACK_GLOBAL + pickle.EMPTY_TUPLE + pickle.NEWOBJ),
      "5 tuple DAG as a dict key": _p4(*dag, pickle.EMPTY_DICT, pickle.BINGET + bytes([60]),
                                       pickle.NONE, pickle.SETITEM),
      "5 deeply nested tuple": _p4(pickle.EMPTY_TUPLE, pickle.TUPLE1 * 3000),
      "6 object array": _p4(_array(_dtype("O8", plain), pickle.LONG1 + b"\x04\0\0\0\x20"
                                   + pickle.TUPLE1, pickle.EMPTY_LIST)),
      "6 memo index 2**28": _p4(pickle.NONE, pickle.LONG_BINPUT + (2**28).to_bytes(4, "little")),
      "6 bytes longer than the file": _p4(pickle.BINBYTES8 + (2**40).to_bytes(8, "little")),
      "7 EXT1": _p4(pickle.EXT1 + b"\x01"),
      "7 persistent id": _p4(pickle.NONE, pickle.BINPERSID),
      "code execution": _p4(_text("posix") + _text("system") + pickle.STACK_GLOBAL
                            + _text("true") + pickle.TUPLE1 + pickle.REDUCE),
  }


def _entries():
  """[(file path, manifest entry)] of the demo checkpoint."""
  from grok_moe import checkpoint, config_file, manifest  # pylint: disable=import-outside-toplevel
  config = config_file.read_config_file(DEMO / "config.json")
  return [(DEMO / "ckpt-0" / checkpoint.tensor_file_name(entry.file_index), entry)
          for entry in manifest.checkpoint_manifest(config)]


def make_case(index: int, seed: int, entries, originals, hostile):
  """(kind, entry, bytes) of case `index`: deterministic in (seed, index)."""
  from grok_moe import manifest  # pylint: disable=import-outside-toplevel
  rng = random.Random(seed * 1_000_003 + index)
  if index % 10 == 0:  # one case in ten is a hostile payload, in turn
    names = sorted(hostile)
    name = names[(index // 10) % len(names)]
    return f"hostile: {name}", manifest.TensorEntry(1, "language_model/rms_norm/scale", (4,)), \
        hostile[name].ljust(16, b"\0")  # past the size check: the decoder must refuse it
  file_index = rng.randrange(len(entries))
  _, entry = entries[file_index]
  data = bytearray(originals[file_index])
  head = min(HEADER_BYTES, len(data))
  kind = rng.choice(["flip", "flip-header", "byte-header", "insert", "delete", "truncate",
                     "splice"])
  if kind == "flip":
    for _ in range(rng.randint(1, 4)):
      position = rng.randrange(len(data))
      data[position] ^= 1 << rng.randrange(8)
  elif kind == "flip-header":
    for _ in range(rng.randint(1, 4)):
      position = rng.randrange(head)
      data[position] ^= 1 << rng.randrange(8)
  elif kind == "byte-header":
    for _ in range(rng.randint(1, 4)):
      data[rng.randrange(head)] = rng.randrange(256)
  elif kind == "insert":
    position = rng.randrange(head)
    data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
  elif kind == "delete":
    position = rng.randrange(head)
    del data[position:position + rng.randint(1, 16)]
  elif kind == "truncate":
    del data[rng.randrange(len(data)):]
  else:  # splice: a piece of another file's header over this one's
    other = originals[rng.randrange(len(originals))]
    start, length = rng.randrange(min(HEADER_BYTES, len(other))), rng.randint(1, 64)
    position = rng.randrange(head)
    data[position:position + length] = other[start:start + length]
  return kind, entry, bytes(data)


def _status_kb(field: str) -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  return 0


def worker(start: int, end: int, seed: int) -> None:
  """Run cases [start, end) in this process, printing one JSON line per case."""
  resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
  from grok_moe import tensor_file  # pylint: disable=import-outside-toplevel
  from grok_moe.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  entries = _entries()
  originals = [path.read_bytes() for path, _ in entries]
  hostile = hostile_payloads()
  with tempfile.TemporaryDirectory() as scratch:
    for index in range(start, end):
      kind, entry, data = make_case(index, seed, entries, originals, hostile)
      path = pathlib.Path(scratch) / "tensor00000_000"
      path.write_bytes(data)
      try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
      except OSError:
        pass
      before = _status_kb("VmRSS")
      try:
        tensor_file.read_tensor_file(path, entry)
        outcome, detail = "ok", ""
      except CheckpointError as error:
        outcome, detail = "error", str(error)[:200]
      except BaseException as error:  # pylint: disable=broad-except
        outcome, detail = "raw", f"{type(error).__name__}: {error}"[:200]
      extra = max(0, _status_kb("VmHWM") - before) * 1024
      print(json.dumps({"index": index, "kind": kind, "outcome": outcome, "detail": detail,
                        "extra_bytes": extra}), flush=True)


def run(cases: int, seed: int = 0, progress=None) -> dict:
  """Run `cases` cases in worker subprocesses; returns the summary (see the module docstring)."""
  results: dict[int, dict] = {}
  start_time = time.perf_counter()
  next_index = 0
  while next_index < cases:
    command = [sys.executable, "-m", "benchmarks.fuzz_loader", "--worker", str(next_index),
               str(cases), "--seed", str(seed)]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    buffered = b""
    startup = True
    while next_index < cases:
      ready, _, _ = select.select([child.stdout], [], [],
                                  CASE_TIMEOUT_S * (6 if startup else 1))
      if not ready:
        child.kill()
        results[next_index] = {"index": next_index, "kind": "?", "outcome": "hang"}
        next_index += 1
        break
      chunk = os.read(child.stdout.fileno(), 1 << 16)
      if not chunk:
        code = child.wait()
        results[next_index] = {"index": next_index, "kind": "?", "outcome": "crash",
                               "detail": f"exit code {code}"}
        next_index += 1
        break
      startup = False
      buffered += chunk
      *lines, buffered = buffered.split(b"\n")
      for line in lines:
        record = json.loads(line)
        results[record["index"]] = record
        next_index = record["index"] + 1
        if progress and next_index % 500 == 0:
          progress(next_index)
    child.kill()
    child.wait()
  seconds = time.perf_counter() - start_time
  largest = max(path.stat().st_size for path in (DEMO / "ckpt-0").iterdir())
  counts: dict[str, int] = {}
  by_kind: dict[str, dict[str, int]] = {}
  for record in results.values():
    counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    kind = by_kind.setdefault(record["kind"], {})
    kind[record["outcome"]] = kind.get(record["outcome"], 0) + 1
  peak = max((record.get("extra_bytes", 0) for record in results.values()), default=0)
  return {
      "cases": cases, "seed": seed, "seconds": round(seconds, 1),
      "outcomes": {name: counts.get(name, 0) for name in ("ok", "error", "raw", "crash", "hang")},
      "by_kind": by_kind,
      "hostile_errors": {record["kind"]: record.get("detail", "") for record in results.values()
                         if record["kind"].startswith("hostile")},
      "bad_cases": [record for record in results.values()
                    if record["outcome"] in ("raw", "crash", "hang")][:20],
      "peak_extra_mb": round(peak / MB, 2),
      "largest_tensor_file_mb": round(largest / MB, 3),
      "peak_limit_mb": round((4 * largest + 16 * MB) / MB, 2),
  }


def passed(summary: dict) -> bool:
  outcomes = summary["outcomes"]
  return (outcomes["raw"] == outcomes["crash"] == outcomes["hang"] == 0
          and summary["peak_extra_mb"] <= summary["peak_limit_mb"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", type=int, default=5000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", help="also write the summary to this file")
  parser.add_argument("--worker", nargs=2, type=int, metavar=("START", "END"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(*args.worker, args.seed)
    return 0
  summary = run(args.cases, args.seed,
                progress=lambda done: print(f"{done} cases", file=sys.stderr))
  text = json.dumps(summary, indent=2)
  print(text)
  if args.json:
    pathlib.Path(args.json).write_text(text + "\n")
  return 0 if passed(summary) else 1


if __name__ == "__main__":
  sys.exit(main())

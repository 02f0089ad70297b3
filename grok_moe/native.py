"""The CPU's native int8-weight grouped matmul (csrc/int8_matmul.cc), built on first use.

XLA on CPU cannot convert int8 weights inside its matmuls: it writes a
float32 copy of the weight first, and its matmuls of a few dozen rows (an
expert's tile) run well below its large-matmul rate. The C++ kernel fuses the
conversion into the packing of an AVX-512 matmul and runs on XLA's own
intra-op threads, as an XLA FFI custom call.

It is compiled once per machine with the system's C++ compiler (`$CXX`, else
`c++`) and `-march=native` into a cache directory
(`$XDG_CACHE_HOME/grok_moe/native`, else `~/.cache/grok_moe/native`; where
that cannot be written, a private temporary directory, removed once the
library is loaded), keyed by the source, the compiler, the jaxlib version and
the host CPU, and written atomically. A cached file that does not load is
built again. Where it cannot be had (no compiler, no AVX-512, another CPU
architecture, or `GROK_MOE_NATIVE=0`, `false`, `no` or `off` in the
environment) `available()` is False and `quant.matmul` keeps XLA's
formulation; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jaxlib.version
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("csrc") / "int8_matmul.cc"
TARGET = "grok_moe_grouped_int8_matmul"   # the custom call's name
SYMBOL = "GrokMoeGroupedInt8Matmul"       # the handler the library exports
DISABLE_VARIABLE = "GROK_MOE_NATIVE"
COMPILE_SECONDS = 300


def _cache_dir() -> pathlib.Path:
  """Where built libraries are kept: the user's cache directory."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "grok_moe" / "native"


def _host_cpu() -> str:
  """What `-march=native` depends on: the CPU's model and feature flags (Linux), or the
  platform's description elsewhere."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  wanted = ("model name", "flags", "Features", "CPU part")
  return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compile(compiler: list[str], flags: list[str], target: pathlib.Path) -> None:
  """Build the library into `target`, atomically: a temporary file in its directory,
  renamed over it only once the compiler succeeded."""
  target.parent.mkdir(parents=True, exist_ok=True)
  handle, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(handle)
  try:
    result = subprocess.run([*compiler, *flags, str(SOURCE), "-o", staging],
                            capture_output=True, text=True, timeout=COMPILE_SECONDS)
    if result.returncode:
      errors = [line for line in result.stderr.splitlines() if "error" in line]
      raise RuntimeError(errors[0] if errors
                         else f"{compiler[0]} exited with {result.returncode}")
    os.replace(staging, target)
  finally:
    if os.path.exists(staging):
      os.unlink(staging)


def _library(compiler: list[str], flags: list[str], name: str) -> ctypes.CDLL:
  """The library `name` from the cache directory, built there first when it is missing
  or does not load (a stale or truncated file). Where the cache directory cannot be
  written (a read-only home), it is built in a private temporary directory (a shared
  one could be planted), loaded, and the directory removed."""
  target = _cache_dir() / name
  try:
    return ctypes.CDLL(str(target))
  except OSError:
    pass  # missing, or not a library this process can load
  try:
    _compile(compiler, flags, target)
  except OSError:  # the cache directory cannot be made or written
    with tempfile.TemporaryDirectory(prefix="grok_moe-native-") as private:
      target = pathlib.Path(private) / name
      _compile(compiler, flags, target)
      return ctypes.CDLL(str(target))  # stays mapped after its file is removed
  return ctypes.CDLL(str(target))


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
  """(the library, None) with its custom call registered, or (None, why not)."""
  setting = os.environ.get(DISABLE_VARIABLE, "1").strip().lower()
  if setting in ("0", "false", "no", "off"):
    return None, f"{DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]} in the environment"
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return None, f"the kernel is written for x86-64 AVX-512, this is {platform.machine()}"
  compiler = shlex.split(os.environ.get("CXX") or "c++")
  compiler[:1] = [shutil.which(compiler[0]) if compiler else None]
  if compiler[0] is None:
    return None, "no C++ compiler (set CXX, or install g++ or clang++)"
  try:
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *compiler, *flags,
                                    jaxlib.version.__version__, _host_cpu()]).encode())
    library = _library(compiler, flags, f"int8_matmul-{key.hexdigest()[:16]}.so")
    handler = getattr(library, SYMBOL)
  except (OSError, RuntimeError, AttributeError, subprocess.TimeoutExpired) as error:
    return None, f"building {SOURCE.name} failed: {error}"
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
  return library, None


def available() -> bool:
  """Whether the native kernel is built and registered (builds it on the first call)."""
  return _load()[0] is not None


def unavailable_reason() -> str | None:
  """Why the native kernel is not available, or None when it is."""
  return _load()[1]


def grouped_int8_matmul(x: jax.Array, weight: jax.Array, scales: jax.Array, group_sizes,
                        first=0, *, rows=None, targets=None, row_scales=None,
                        out_rows: int | None = None) -> jax.Array:
  """Sorted rows in groups, each group by its own int8 weight, in float32.

  Sorted row a is x[rows[a]] (x [T, K]; rows [A], or x's row a when None).
  Group g is the next group_sizes[g] sorted rows, multiplied by the int8
  weight [K, N] at entry first + g of its stack [S..., K, N] (the leading
  axes counted flattened, row-major), read in place, times the scales [R, N]
  at the same entry of theirs [S..., R, N] (bfloat16 or float32, by row block
  of K / R weight rows). Groups past the stack's end are cut off.
  Returns, with `targets` None, [A, N]: row a's product, 0 past the last
  group; else [out_rows, N]: zeros with each product, times row_scales[a]
  (1 when None), added to row targets[a] (an MoE's weighted scatter-add).
  Needs `available()`; not differentiable itself (see `quant.matmul`).
  """
  if not available():
    raise RuntimeError(f"grok_moe's native kernel is not available: {unavailable_reason()}")
  if (targets is None) != (out_rows is None) or (row_scales is not None and targets is None):
    raise ValueError("grouped_int8_matmul: targets and out_rows go together, and row_scales "
                     "needs targets")

  def indices(values):
    return jnp.zeros((0,), jnp.int32) if values is None else jnp.asarray(values, jnp.int32)

  sorted_rows = x.shape[0] if rows is None else rows.shape[0]
  shape = (sorted_rows if targets is None else out_rows, weight.shape[-1])
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")
  # The kernel's `mode` bits (csrc/int8_matmul.cc): which optional arguments are given.
  mode = (rows is not None) * 1 | (targets is not None) * 2 | (row_scales is not None) * 4
  return call(x.astype(jnp.float32), weight, scales,
              jnp.asarray(group_sizes, jnp.int32).reshape(-1),
              jnp.asarray(first, jnp.int32).reshape(()),
              indices(rows), indices(targets),
              jnp.zeros((0,), jnp.float32) if row_scales is None
              else jnp.asarray(row_scales, jnp.float32), mode=np.int32(mode))

"""The CPU's native int8-weight grouped matmul (csrc/int8_matmul.cc), built on first use.

XLA on CPU cannot convert int8 weights inside its matmuls: it writes a
float32 copy of the weight first, and its matmuls of a few dozen rows (an
expert's tile) run well below its large-matmul rate. The C++ kernel fuses the
conversion into the packing of an AVX-512 matmul and runs on XLA's own
intra-op threads, as an XLA FFI custom call.

It is compiled once per machine with the system's C++ compiler (`$CXX`, else
`c++`) and `-march=native` into a cache directory
(`$XDG_CACHE_HOME/grok_moe/native`, else `~/.cache/grok_moe/native`; where
that cannot be made, a private temporary directory, once per process), keyed
by the source, the compiler, the jaxlib version and the host CPU, and written
atomically. Where it cannot be had (no compiler, no AVX-512, another CPU
architecture, or `GROK_MOE_NATIVE=0` in the environment) `available()` is
False and `quant.matmul` keeps XLA's formulation; `unavailable_reason()` says
why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib.version
import jax.numpy as jnp

SOURCE = pathlib.Path(__file__).with_name("csrc") / "int8_matmul.cc"
TARGET = "grok_moe_grouped_int8_matmul"   # the custom call's name
SYMBOL = "GrokMoeGroupedInt8Matmul"       # the handler the library exports
DISABLE_VARIABLE = "GROK_MOE_NATIVE"
COMPILE_SECONDS = 300


def _cache_dir() -> pathlib.Path:
  """Where built libraries are kept: the user's cache directory, or where that cannot
  be made (a read-only home), a new private directory in the temporary directory."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  directory = pathlib.Path(base) / "grok_moe" / "native"
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError:  # a private directory of this process's (a shared one could be planted)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="grok_moe-native-"))
  return directory


def _host_cpu() -> str:
  """What `-march=native` depends on: the CPU's model and feature flags (Linux), or the
  platform's description elsewhere."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  wanted = ("model name", "flags", "Features", "CPU part")
  return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compile(compiler: str, flags: list[str], target: pathlib.Path) -> None:
  """Build the library into `target`, atomically: a temporary file in its directory,
  renamed over it only once the compiler succeeded."""
  target.parent.mkdir(parents=True, exist_ok=True)
  handle, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(handle)
  try:
    result = subprocess.run([compiler, *flags, str(SOURCE), "-o", staging],
                            capture_output=True, text=True, timeout=COMPILE_SECONDS)
    if result.returncode:
      errors = [line for line in result.stderr.splitlines() if "error" in line]
      raise RuntimeError(errors[0] if errors else f"{compiler} exited with {result.returncode}")
    os.replace(staging, target)
  finally:
    if os.path.exists(staging):
      os.unlink(staging)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
  """(the library, None) with its custom call registered, or (None, why not)."""
  if os.environ.get(DISABLE_VARIABLE, "1") == "0":
    return None, f"{DISABLE_VARIABLE}=0 in the environment"
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return None, f"the kernel is written for x86-64 AVX-512, this is {platform.machine()}"
  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if compiler is None:
    return None, "no C++ compiler (set CXX, or install g++ or clang++)"
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256("\n".join(
      [SOURCE.read_text(), compiler, *flags, jaxlib.version.__version__, _host_cpu()]).encode())
  target = _cache_dir() / f"int8_matmul-{key.hexdigest()[:16]}.so"
  try:
    if not target.exists():
      _compile(compiler, flags, target)
    library = ctypes.CDLL(str(target))
  except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
    return None, f"building {SOURCE.name} failed: {error}"
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, SYMBOL)),
                              platform="cpu")
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

  def indices(values):
    return jnp.zeros((0,), jnp.int32) if values is None else jnp.asarray(values, jnp.int32)

  sorted_rows = x.shape[0] if rows is None else rows.shape[0]
  shape = (sorted_rows if targets is None else out_rows, weight.shape[-1])
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")
  return call(x.astype(jnp.float32), weight, scales,
              jnp.asarray(group_sizes, jnp.int32).reshape(-1), jnp.asarray(first, jnp.int32),
              indices(rows), indices(targets),
              jnp.zeros((0,), jnp.float32) if row_scales is None
              else jnp.asarray(row_scales, jnp.float32))

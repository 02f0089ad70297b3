"""The native int8 grouped matmul (grok_moe/csrc/int8_matmul.cc) against float64 NumPy.

The kernel packs weight panels of 48 columns, blocks of 256 weight rows,
register tiles of 8 rows and row chunks of 256, so the sizes here are chosen
to leave a remainder at each (a wrong mask, a dropped tail row or column, a
block straddling a scale block, or a chunk boundary fails). Groups are checked
in both output modes (rows in order, and the weighted scatter-add onto target
rows), with gathered rows, empty groups, a stack offset, groups past the
stack's end and rows past the last group. `quant.matmul`'s native path is
held to its XLA formulation, values and gradients.
"""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok_moe import native, quant
from tests import helpers, oracle

# float32 sums of at most 300 products against float64: ~1e-6 relative
# measured; a wrong panel, tile, scale block or group is O(1).
TOLERANCE = 1e-5

REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl")


def _machine_lacks() -> str | None:
  """What this machine lacks for the kernel, or None when it has all it needs."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return f"an x86-64 CPU (this is {platform.machine()})"
  if shutil.which(os.environ.get("CXX", "c++")) is None:
    return "a C++ compiler"
  try:
    flags = next(line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split()
  except (OSError, StopIteration):
    return "/proc/cpuinfo to read the CPU's flags from"
  missing = [flag for flag in REQUIRED_FLAGS if flag not in flags]
  return f"the CPU flags {missing}" if missing else None


needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel: {native.unavailable_reason()}")


def test_native_kernel_builds_where_the_machine_allows():
  """A machine with a compiler and AVX-512 gets the kernel: a source that no longer
  compiles, a wrong symbol or a failed registration fails here instead of silently
  leaving every CPU user on XLA's slower path."""
  lacks = _machine_lacks()
  if lacks is not None:
    pytest.skip(f"this machine lacks {lacks}")
  assert native.available(), native.unavailable_reason()
  assert native.unavailable_reason() is None


def _stack(rng, count, depth, cols, blocks, float_scales=False):
  w = helpers.random_weight(rng, (count, depth, cols), blocks)
  if float_scales:
    w = quant.QuantizedWeight(w.weight, np.asarray(w.scales, np.float32))
  return w


def _expected(x, w, group_sizes, first, rows=None, targets=None, row_scales=None,
              out_rows=None):
  """The grouped product in float64, straight from the definition."""
  dense = oracle.dense_weight(w)                                     # [S, K, N]
  x = np.asarray(x, np.float64)
  sorted_rows = len(x) if rows is None else len(rows)
  gathered = x if rows is None else x[np.asarray(rows)]
  products = np.zeros((sorted_rows, dense.shape[-1]))
  begin = 0
  for g, size in enumerate(group_sizes):
    entry = first + g
    if entry >= len(dense):
      break
    end = min(sorted_rows, begin + size)
    products[begin:end] = gathered[begin:end] @ dense[entry]
    begin = end
  if targets is None:
    return products
  scales = np.ones(sorted_rows) if row_scales is None else np.asarray(row_scales, np.float64)
  out = np.zeros((out_rows, dense.shape[-1]))
  np.add.at(out, np.asarray(targets), products * scales[:, None])
  return out


@needs_native
@pytest.mark.parametrize("depth,cols,blocks,float_scales,group_sizes,first,stack", [
    (37, 5, 1, False, [1], 0, 1),              # one row, 5 of a panel's 48 columns
    (300, 100, 4, True, [13], 1, 3),           # 2 weight blocks, 8 + 5 row tiles, 2 panels + 4
    (64, 49, 8, False, [0, 9, 0, 270, 3], 1, 6),  # empty groups, a group over a 256-row chunk
    (16, 96, 1, False, [5, 7, 4], 4, 6),       # the last group is past the stack's end
    (24, 48, 2, True, [3, 2], 0, 2),           # rows past the last group are 0
    (300, 100, 3, False, [2, 1, 4], 0, 3),     # few-row chunks in depth pieces across blocks
    (1000, 70, 5, True, [1], 0, 1),            # one row, pieces (2 or more) across blocks
])
def test_grouped_rows_in_order(depth, cols, blocks, float_scales, group_sizes, first, stack):
  """Each group's rows by its own weight, rows past the groups (or past the stack) 0.
  Catches a wrong panel mask or offset, a dropped tile or chunk remainder, scales of
  the wrong block or dtype, a group matched to the wrong stack entry, and garbage left
  in rows that no group covers."""
  rng = np.random.default_rng(depth + cols)
  w = _stack(rng, stack, depth, cols, blocks, float_scales)
  total = sum(group_sizes) + (4 if group_sizes == [3, 2] else 0)
  x = rng.normal(size=(total, depth)).astype(np.float32)
  got = np.asarray(jax.jit(native.grouped_int8_matmul)(
      jnp.asarray(x), jnp.asarray(w.weight), jnp.asarray(w.scales), jnp.asarray(group_sizes),
      first))
  want = _expected(x, w, group_sizes, first)
  assert got.shape == want.shape
  assert helpers.relative_error(got, want) < TOLERANCE
  assert np.all(got[np.all(want == 0, axis=1)] == 0)


@needs_native
@pytest.mark.parametrize("depth,group_sizes", [(70, [30, 0, 41, 9]), (270, [3, 0, 1, 2, 30])])
@pytest.mark.parametrize("scatter", [False, True])
def test_grouped_gathers_rows_and_scatter_adds(scatter, depth, group_sizes):
  """Rows gathered from x by index (with repeats), and with targets each product times
  its row scale added onto its target row (several rows onto one target, and targets
  that no row reaches stay 0). Catches a gather that ignores `rows`, a scatter that
  overwrites instead of adding, a missing row scale, and two threads adding to one
  element (a lost or doubled addition is O(1) against the float64 sum). The second
  sizes mix groups of at most 4 rows (summed in depth pieces, added at the end)
  with a larger one adding onto the same targets."""
  rng = np.random.default_rng(int(scatter))
  cols, tokens = 130, 40
  w = _stack(rng, len(group_sizes), depth, cols, blocks=2)
  x = rng.normal(size=(tokens, depth)).astype(np.float32)
  rows = rng.integers(0, tokens, size=sum(group_sizes)).astype(np.int32)
  targets = row_scales = out_rows = None
  if scatter:
    out_rows = tokens + 3
    targets = rng.integers(0, tokens, size=len(rows)).astype(np.int32)
    row_scales = rng.uniform(0.1, 1.0, size=len(rows)).astype(np.float32)
  call = jax.jit(native.grouped_int8_matmul, static_argnames="out_rows")
  got = np.asarray(call(jnp.asarray(x), jnp.asarray(w.weight), jnp.asarray(w.scales),
                        jnp.asarray(group_sizes), 0, rows=rows, targets=targets,
                        row_scales=row_scales, out_rows=out_rows))
  want = _expected(x, w, group_sizes, 0, rows, targets, row_scales, out_rows)
  assert got.shape == want.shape
  assert helpers.relative_error(got, want) < TOLERANCE
  if scatter:
    untouched = np.setdiff1d(np.arange(out_rows), targets)
    assert len(untouched) and np.all(got[untouched] == 0)


@needs_native
def test_matmul_native_path_equals_xla_path_with_gradients():
  """quant.matmul of a [L, E, K, N] stack at a traced (layer, expert): the native path's
  value and its gradients in x and in the bfloat16 scales equal the XLA formulation's
  (native=False). Catches the kernel reading another stack entry, and a custom JVP
  whose tangent or transpose is wrong."""
  rng = np.random.default_rng(3)
  w = helpers.random_weight(rng, (2, 3, 90, 52), blocks=3)
  w = quant.QuantizedWeight(jnp.asarray(w.weight), jnp.asarray(w.scales))
  x = jnp.asarray(rng.normal(size=(2, 11, 90)).astype(np.float32))
  cotangent = jnp.asarray(rng.normal(size=(2, 11, 52)).astype(np.float32))

  def loss(x, scales, use_native):
    y = quant.matmul(x, quant.QuantizedWeight(w.weight, scales), index=(jnp.int32(1), 2),
                     native=use_native)                               # [2, 11, 52]
    return jnp.sum(y * cotangent), y

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  (native_dx, native_ds), native_y = grad(x, w.scales, True)
  (xla_dx, xla_ds), xla_y = grad(x, w.scales, False)
  assert helpers.relative_error(native_y, xla_y) < TOLERANCE
  assert helpers.relative_error(native_dx, xla_dx) < TOLERANCE
  native_ds, xla_ds = np.asarray(native_ds, np.float32), np.asarray(xla_ds, np.float32)
  assert np.any(xla_ds[1, 2] != 0) and np.all(xla_ds[0] == 0)
  assert helpers.relative_error(native_ds, xla_ds) < TOLERANCE
  hlo = jax.jit(lambda x: quant.matmul(x, w, index=(0, 1))).lower(x).as_text()
  assert native.TARGET in hlo


def test_failed_build_names_the_error_and_leaves_no_library(monkeypatch, tmp_path):
  """A source that does not compile makes the kernel unavailable with the compiler's
  error as the reason, and leaves nothing in the cache directory (no half-written
  library that a later process would load)."""
  if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler")
  if platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("the build is only tried on x86-64")
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++;\n")
  monkeypatch.setattr(native, "SOURCE", broken)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.delenv(native.DISABLE_VARIABLE, raising=False)
  library, reason = native._load.__wrapped__()
  assert library is None and "error" in reason
  assert [path for path in (tmp_path / "cache").rglob("*") if not path.is_dir()] == []


@needs_native
@pytest.mark.parametrize("scatter", [False, True])
def test_zero_depth_gives_zeros_after_another_call(scatter):
  """x [T, 0] @ w [0, N] is zeros in both modes, right after a call that left sums in the
  threads' buffers. Catches a K = 0 product copying the previous call's sums out."""
  rng = np.random.default_rng(5)
  w = _stack(rng, 1, 64, 20, blocks=1)
  x = rng.normal(size=(8, 64)).astype(np.float32)
  before = native.grouped_int8_matmul(jnp.asarray(x), jnp.asarray(w.weight),
                                      jnp.asarray(w.scales), jnp.asarray([8]))
  assert np.abs(np.asarray(before)).max() > 0
  targets = jnp.arange(8, dtype=jnp.int32) if scatter else None
  got = native.grouped_int8_matmul(
      jnp.zeros((8, 0), jnp.float32), jnp.zeros((1, 0, 20), jnp.int8),
      jnp.ones((1, 1, 20), jnp.bfloat16), jnp.asarray([8]), targets=targets,
      out_rows=8 if scatter else None)
  assert got.shape == (8, 20) and np.all(np.asarray(got) == 0)


@needs_native
def test_scatter_of_no_rows_is_zeros_and_bad_calls_are_refused():
  """A scatter with no sorted rows gives out_rows zero rows (not x @ w, as when an empty
  targets array was read as "no targets"); gathering from an x with no rows, or a
  `first` of two entries, is an error rather than a read out of bounds; row_scales
  without targets, or targets without out_rows, is a ValueError."""
  rng = np.random.default_rng(6)
  w = _stack(rng, 2, 16, 10, blocks=1)
  weight, scales = jnp.asarray(w.weight), jnp.asarray(w.scales)
  x = jnp.asarray(rng.normal(size=(4, 16)).astype(np.float32))
  got = native.grouped_int8_matmul(x, weight, scales, jnp.asarray([0, 0]),
                                   targets=jnp.zeros((0,), jnp.int32), out_rows=5)
  assert got.shape == (5, 10) and np.all(np.asarray(got) == 0)
  with pytest.raises(Exception, match="mismatched shapes"):
    native.grouped_int8_matmul(jnp.zeros((0, 16), jnp.float32), weight, scales,
                               jnp.asarray([3]), rows=jnp.asarray([0, 0, 0])).block_until_ready()
  with pytest.raises(TypeError):
    native.grouped_int8_matmul(x, weight, scales, jnp.asarray([4]), first=[0, 1])
  with pytest.raises(ValueError, match="row_scales needs targets"):
    native.grouped_int8_matmul(x, weight, scales, jnp.asarray([4]), row_scales=jnp.ones(4))
  with pytest.raises(ValueError, match="targets and out_rows go together"):
    native.grouped_int8_matmul(x, weight, scales, jnp.asarray([4]), targets=jnp.zeros(4, int))


@needs_native
def test_matmul_takes_the_native_path_only_for_what_the_kernel_reads():
  """quant.matmul with float16 scales, or with a stack but fewer index entries than its
  leading axes, behaves as native=False does (the XLA formulation's value, or its
  error) instead of failing in the kernel or multiplying by the wrong stack entry."""
  rng = np.random.default_rng(7)
  w = helpers.random_weight(rng, (2, 3, 32, 16), blocks=1)
  x = jnp.asarray(rng.normal(size=(5, 32)).astype(np.float32))
  half = quant.QuantizedWeight(jnp.asarray(w.weight[0, 1]), jnp.asarray(w.scales[0, 1], np.float16))
  assert not quant.fuses_int8(jnp.float32, half)
  np.testing.assert_array_equal(quant.matmul(x, half, native=True),
                                quant.matmul(x, half, native=False))
  stack = quant.QuantizedWeight(jnp.asarray(w.weight), jnp.asarray(w.scales))
  for index in ((), (1,)):
    with pytest.raises((TypeError, ValueError)):
      quant.matmul(x, stack, index=index, native=False)
    with pytest.raises((TypeError, ValueError)):
      quant.matmul(x, stack, index=index, native=True)
  with pytest.raises(ValueError, match="needs 1 index entries"):
    quant.grouped_matmul(x, stack, jnp.asarray([5]))


@pytest.mark.parametrize("setting", ["0", "false", "No", " off "])
def test_disabled_by_any_false_setting(monkeypatch, setting):
  """GROK_MOE_NATIVE=0, false, no or off (any case, spaces around) turns the kernel off,
  with the setting named in the reason."""
  monkeypatch.setenv(native.DISABLE_VARIABLE, setting)
  library, reason = native._load.__wrapped__()
  assert library is None and f"{native.DISABLE_VARIABLE}={setting}" in reason


def _copying_compiler(monkeypatch, built: list):
  """native._compile replaced by a copy of this process's built library (no compiler
  run), recording each target it was asked for."""
  source = native._load()[0]._name

  def fake_compile(compiler, flags, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    built.append(target)
  monkeypatch.setattr(native, "_compile", fake_compile)


@needs_native
def test_a_cached_file_that_does_not_load_is_built_again(monkeypatch, tmp_path):
  """A truncated or stale file at the cache path is replaced by a fresh build, not
  reported as a failure forever (nor loaded)."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  built = []
  _copying_compiler(monkeypatch, built)
  target = tmp_path / "grok_moe" / "native" / "int8_matmul-test.so"
  target.parent.mkdir(parents=True)
  target.write_bytes(b"\x7fELF truncated")
  library = native._library(["c++"], [], target.name)
  assert built == [target] and hasattr(library, native.SYMBOL)
  native._library(["c++"], [], target.name)
  assert built == [target]  # loaded from the cache the second time


@needs_native
def test_an_unwritable_cache_builds_in_a_private_directory_removed_after(monkeypatch, tmp_path):
  """Where the cache directory cannot be made (here its parent is a file), the library is
  built in a private temporary directory, loaded, and the directory removed: the
  kernel stays available and nothing is left in the temporary directory."""
  (tmp_path / "not-a-directory").write_text("")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-directory"))
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  built = []
  _copying_compiler(monkeypatch, built)
  library = native._library(["c++"], [], "int8_matmul-test.so")
  assert hasattr(library, native.SYMBOL)
  assert len(built) == 1 and built[0].parent.parent == scratch
  assert list(scratch.iterdir()) == []

"""Compile once: JAX's persistent compilation cache, and a count of the time spent compiling.

`use_persistent_cache()` points JAX's compilation cache at a directory (by
default `$XDG_CACHE_HOME/grok_moe/jax`, else `~/.cache/grok_moe/jax`), so that a
second run with the same shapes loads its programs from disk instead of
compiling them again. The environment variable GROK_MOE_COMPILATION_CACHE moves
it (a directory) or turns it off ("off", "0", "none" or empty). Every program
is cached, however fast it compiled.

`CompileTimer` listens to JAX's own compile events (tracing, lowering and
backend compilation), so the time spent compiling can be told apart from the
time spent running.
"""

from __future__ import annotations

import os
import pathlib
import threading

import jax

ENVIRONMENT_VARIABLE = "GROK_MOE_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
_COMPILE_EVENT_PREFIX = "/jax/core/compile/"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> pathlib.Path:
  """$XDG_CACHE_HOME/grok_moe/jax, or ~/.cache/grok_moe/jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "grok_moe" / "jax"


def resolve_cache_dir(cache_dir=None) -> pathlib.Path | None:
  """The directory to use: `cache_dir` if given (False or "off" for none), else
  GROK_MOE_COMPILATION_CACHE if set, else the default."""
  if cache_dir is False:
    return None
  if cache_dir is None:
    cache_dir = os.environ.get(ENVIRONMENT_VARIABLE)
    if cache_dir is None:
      return default_cache_dir()
  if str(cache_dir).strip().lower() in _OFF:
    return None
  return pathlib.Path(cache_dir).expanduser()


def use_persistent_cache(cache_dir=None) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on in `cache_dir` (see resolve_cache_dir),
  or off; returns the directory in use, or None.

  Applies to the whole process (JAX has one cache); a directory that cannot be
  created turns the cache off rather than failing the run.
  """
  directory = resolve_cache_dir(cache_dir)
  if directory is not None:
    try:
      directory.mkdir(parents=True, exist_ok=True)
    except OSError:
      directory = None
  if directory is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


class CompileTimer:
  """Seconds JAX spent compiling (tracing, lowering, XLA) and programs loaded from the
  persistent cache, in this process since it was created.

  Example:
    >>> timer = CompileTimer()
    >>> before = timer.seconds
    >>> ...  # run something
    >>> compiled_for = timer.seconds - before
  """

  _lock = threading.Lock()
  _seconds = 0.0
  _cache_hits = 0
  _listening = False

  def __init__(self):
    with CompileTimer._lock:
      if not CompileTimer._listening:
        jax.monitoring.register_event_duration_secs_listener(CompileTimer._on_duration)
        jax.monitoring.register_event_listener(CompileTimer._on_event)
        CompileTimer._listening = True

  @staticmethod
  def _on_duration(event: str, duration: float, **_) -> None:
    if event.startswith(_COMPILE_EVENT_PREFIX):
      with CompileTimer._lock:
        CompileTimer._seconds += duration

  @staticmethod
  def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT_EVENT:
      with CompileTimer._lock:
        CompileTimer._cache_hits += 1

  @property
  def seconds(self) -> float:
    return CompileTimer._seconds

  @property
  def cache_hits(self) -> int:
    return CompileTimer._cache_hits

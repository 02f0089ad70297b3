"""Where a checkpoint's files live, and how a save replaces them atomically.

Layout written by `staged_save` in a checkpoint directory D:

  D/.ckpt-0.v-<hex>/             one complete version: tensor{i:05d}_000 files + config.json
  D/ckpt-0 -> .ckpt-0.v-<hex>    a relative symlink: the current version
  D/config.json -> ckpt-0/config.json

The release layout (a plain D/ckpt-0/ directory, D/config.json or none) loads
as before; config.json inside ckpt-0 wins over D/config.json when both exist.

A save in a layout whose readers expect the files in D itself (Hugging Face:
config.json, model*.safetensors, the index) is `published`: the version holds
those files and each is linked as D/<name> -> ckpt-0/<name>, exactly as
config.json is, so the one swap of ckpt-0 switches them all at once.

A save is atomic at every instant:
  1. Lock D (flock on the directory; a second save into D is refused).
  2. Write every tensor and config.json into a new version directory, fsync
     each file and the directory. A kill here leaves the old checkpoint as it
     was, plus a version directory nothing points to.
  3. Swap D/ckpt-0 to the new version in one step: a symlink renamed over the
     old symlink (rename(2) is atomic), or, over a plain release-layout
     directory, renameat2(RENAME_EXCHANGE), which swaps the two names at once.
     Before the swap every reader sees the old tensors and config; after it,
     the new ones (config.json is read through ckpt-0, so it swaps with them).
  4. Point D/config.json at ckpt-0/config.json (for people and tools reading
     D/config.json; the loader already prefers ckpt-0/config.json); when
     published, link every file of the version the same way, after removing
     the previous checkpoint's files the new one does not have. Links into
     ckpt-0 that the new version does not fill are removed. Published names
     that stay the same switch atomically with step 3; a name that appears or
     disappears (another shard count) changes in this step, one rename each.
  5. Remove the old version. A kill before this leaves it behind.
The next save, and the next load, remove what steps 2 and 5 left behind:
version directories ckpt-0 does not point to and the names this module gives
its temporary links (and the staging names of earlier grok_moe versions),
only while D/ckpt-0 exists, and only under the lock (never a save in progress).

Where renameat2 is missing (not Linux, or a file system without
RENAME_EXCHANGE), replacing a plain ckpt-0 directory falls back to two
renames, with a moment in between where D has no ckpt-0; the old tensors are
then in D/.ckpt-0.link-<hex>/. Replacing a symlinked ckpt-0 is always atomic.
A load resolves ckpt-0 once, so it reads one version even if a save swaps it
meanwhile (and fails with a CheckpointError if that save deletes the files).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pathlib
import shutil
import uuid
from typing import Callable

from grok_moe.errors import CheckpointError

try:
  import fcntl
except ImportError:  # not POSIX: no lock
  fcntl = None

TENSOR_DIR = "ckpt-0"
CONFIG_FILE = "config.json"
VERSION_PREFIX = f".{TENSOR_DIR}.v-"
_LINK_PREFIX = f".{TENSOR_DIR}.link-"
_CONFIG_LINK_PREFIX = f".{CONFIG_FILE}.link-"
_LEGACY_PREFIXES = (f".{TENSOR_DIR}.partial-", f".{CONFIG_FILE}.partial-")


def locate(path) -> tuple[pathlib.Path, pathlib.Path]:
  """(root D, tensor directory) for a path to D or D/ckpt-0; ckpt-0's symlink is resolved once."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(
        f"checkpoint directory {path} does not exist. Download the release's "
        "ckpt-0/ into checkpoints/, or pass the directory that holds ckpt-0/.")
  if (path / TENSOR_DIR).is_dir():
    root, tensor_dir = path, path / TENSOR_DIR
  elif path.name == TENSOR_DIR:
    root, tensor_dir = path.parent, path
  else:
    raise CheckpointError(
        f"{path} has no {TENSOR_DIR}/ directory. Pass the directory that holds "
        f"{TENSOR_DIR}/ (or {TENSOR_DIR}/ itself).")
  if tensor_dir.is_symlink():
    tensor_dir = pathlib.Path(os.path.realpath(tensor_dir))
  return root, tensor_dir


def config_path(root: pathlib.Path, tensor_dir: pathlib.Path) -> pathlib.Path | None:
  """The checkpoint's config.json: in the tensor directory, else beside it; None if neither."""
  for candidate in (tensor_dir / CONFIG_FILE, root / CONFIG_FILE):
    if os.path.lexists(candidate):
      return candidate
  return None


def file_sizes(file_paths: list[pathlib.Path], names: list[str]) -> list[int]:
  """Sizes of the tensor files; CheckpointError naming file and tensor if one cannot be stat'ed."""
  sizes = []
  for file_path, name in zip(file_paths, names):
    try:
      sizes.append(file_path.stat().st_size)
    except OSError as error:
      raise CheckpointError(
          f"cannot read tensor file {file_path} ({name}): {error.strerror or error} "
          f"(a dangling symlink or a symlink loop?); re-download {file_path.name}.") from None
  return sizes


# --- Locking and cleanup. ---

@contextlib.contextmanager
def _locked(root: pathlib.Path, *, blocking: bool):
  """Yields True holding an exclusive flock on directory `root`, False if not held."""
  if fcntl is None:
    yield True
    return
  try:
    descriptor = os.open(root, os.O_RDONLY)
  except OSError:
    yield False
    return
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
      yield False
      return
    yield True
  finally:
    os.close(descriptor)  # releases the lock


def _current_version(root: pathlib.Path) -> str | None:
  link = root / TENSOR_DIR
  return os.readlink(link) if link.is_symlink() else None


def leftovers(root: pathlib.Path) -> list[pathlib.Path]:
  """Entries of root that an interrupted save left: unreferenced versions, temporary links."""
  if not (root / TENSOR_DIR).is_dir():
    return []  # a save died between two renames: keep everything for recovery
  current = _current_version(root)
  try:
    names = os.listdir(root)
  except OSError:
    return []
  return [root / name for name in names
          if (name.startswith(VERSION_PREFIX) and name != current)
          or name.startswith((_LINK_PREFIX, _CONFIG_LINK_PREFIX) + _LEGACY_PREFIXES)]


def _remove(path: pathlib.Path) -> None:
  """Remove a leftover file, link or directory; errors (a read-only directory) are ignored."""
  try:
    if path.is_symlink() or not path.is_dir():
      path.unlink(missing_ok=True)
    else:
      shutil.rmtree(path, ignore_errors=True)
  except OSError:
    pass


def remove_leftovers(root) -> None:
  """Remove what interrupted saves left in `root`, unless a save holds the lock; errors ignored."""
  root = pathlib.Path(root)
  if not leftovers(root):
    return
  with _locked(root, blocking=False) as held:
    if held:
      for path in leftovers(root):
        _remove(path)


# --- Saving. ---

def write_synced(path: pathlib.Path, text: str) -> None:
  """Write `text` (UTF-8) to the file `path` and fsync it."""
  with open(path, "w", encoding="utf-8") as file:
    file.write(text)
    file.flush()
    os.fsync(file.fileno())


def _fsync_directory(path: pathlib.Path) -> None:
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _exchange(first: pathlib.Path, second: pathlib.Path) -> bool:
  """Swap two names atomically with renameat2(RENAME_EXCHANGE); False where unsupported."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second),
               rename_exchange) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(code, os.strerror(code), str(first), None, str(second))


def _swap_in(root: pathlib.Path, version: pathlib.Path) -> None:
  """Make root/ckpt-0 point to `version` in one step (module docstring, step 3)."""
  tensor_dir = root / TENSOR_DIR
  link = root / f"{_LINK_PREFIX}{uuid.uuid4().hex}"
  os.symlink(version.name, link)
  if tensor_dir.is_symlink() or not os.path.lexists(tensor_dir):
    os.replace(link, tensor_dir)
  elif not _exchange(link, tensor_dir):  # `link` now names the old directory
    aside = root / f"{_LINK_PREFIX}{uuid.uuid4().hex}"
    os.rename(tensor_dir, aside)
    os.replace(link, tensor_dir)
  _fsync_directory(root)


def _link(root: pathlib.Path, name: str) -> None:
  """root/name -> ckpt-0/name, replacing whatever was there in one rename."""
  target = f"{TENSOR_DIR}/{name}"
  path = root / name
  if path.is_symlink() and os.readlink(path) == target:
    return
  link = root / f"{_CONFIG_LINK_PREFIX}{uuid.uuid4().hex}"
  os.symlink(target, link)
  os.replace(link, path)


def _link_files(root: pathlib.Path, names: list[str],
                published: Callable[[str], bool] | None) -> None:
  """Step 4 of the module docstring: link `names` (the new version's files) into root;
  first remove root's entries that `published` claims and the new version lacks, and
  links into ckpt-0 that now lead nowhere."""
  # An old index goes first: a reader then never follows it to shards of the old version.
  for entry in sorted(os.listdir(root), key=lambda name: not name.endswith(".json")):
    path = root / entry
    claimed = published is not None and published(entry) and entry not in names
    dangling = (path.is_symlink() and os.readlink(path).startswith(f"{TENSOR_DIR}/")
                and not path.exists())
    if (claimed or dangling) and not path.is_dir():
      path.unlink(missing_ok=True)
  for name in names:
    _link(root, name)
  _fsync_directory(root)


def _make_readable_by_all(directory: pathlib.Path) -> None:
  """Give a directory the permissions a plain mkdir would (0777 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  directory.chmod(0o777 & ~umask)


@contextlib.contextmanager
def staged_save(root, config_json: str, *, published: Callable[[str], bool] | None = None):
  """Yields a new, empty version directory; on a clean exit commits it as root's checkpoint.

  The caller writes (and fsyncs) every tensor file into the yielded directory.
  Then config.json is written beside them and steps 3-5 of the module
  docstring make it the checkpoint. On an exception (KeyboardInterrupt
  included) the version directory is removed and the old checkpoint is
  untouched.

  `published(name)`, when given, says which names in root belong to a
  checkpoint of a layout read from root itself: every file of the version is
  then linked into root, and root's entries it claims that the new version
  lacks (the previous checkpoint's) are removed.
  """
  root = pathlib.Path(root)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise CheckpointError(f"cannot make the checkpoint directory {root}: "
                          f"{error.strerror or error}. Pass a directory path.") from None
  with _locked(root, blocking=False) as held:
    if not held:
      raise CheckpointError(f"another process is saving a checkpoint into {root}; wait "
                            "for it to finish, or choose another directory.")
    for path in leftovers(root):
      _remove(path)
    version = root / f"{VERSION_PREFIX}{uuid.uuid4().hex}"
    version.mkdir()
    _make_readable_by_all(version)
    try:
      yield version
      write_synced(version / CONFIG_FILE, config_json)
      _fsync_directory(version)
    except BaseException:
      shutil.rmtree(version, ignore_errors=True)
      raise
    _swap_in(root, version)  # if this fails, `version` is a leftover the next save removes
    _link_files(root, sorted(os.listdir(version)) if published else [CONFIG_FILE], published)
    for path in leftovers(root):  # the previous version, or the exchanged release directory
      _remove(path)

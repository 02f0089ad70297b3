"""Reading a config.json: a size cap, strict UTF-8, then `ModelConfig.from_json`'s field checks.

Every error is a ConfigError that starts with the file's path and names the
field (or the JSON problem), so nothing is allocated from a config that a
real model could not have.
"""

from __future__ import annotations

import os
import pathlib
import stat

from grok_moe.config import MAX_JSON_CHARS, ModelConfig
from grok_moe.errors import ConfigError


def read_config_file(path) -> ModelConfig:
  """The ModelConfig in the JSON file at `path`; ConfigError("{path}: ...") if it is not one.

  At most MAX_JSON_CHARS + 1 bytes are read, so a huge (or sparse) file is
  refused without reading it whole; only a regular file is opened for reading
  (a FIFO or device is refused).
  """
  path = pathlib.Path(path)
  try:
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  except OSError as error:
    raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
  try:
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
      raise ConfigError(f"{path} is not a regular file")
    os.set_blocking(descriptor, True)
    with os.fdopen(descriptor, "rb", closefd=False) as file:
      data = file.read(MAX_JSON_CHARS + 1)
  except OSError as error:
    raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
  finally:
    os.close(descriptor)
  if len(data) > MAX_JSON_CHARS:
    raise ConfigError(f"{path} is over {MAX_JSON_CHARS} bytes; a config.json is a few "
                      "hundred")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as error:
    raise ConfigError(f"{path} is not UTF-8 text (byte {error.start})") from None
  try:
    return ModelConfig.from_json(text)
  except ConfigError as error:
    raise ConfigError(f"{path}: {error}") from None

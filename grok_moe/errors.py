"""The exceptions grok_moe raises for bad input (each message says what to do), and its warning."""


class GrokMoeError(Exception):
  """Base class of every error grok_moe raises on purpose."""


class ConfigError(GrokMoeError, ValueError):
  """A ModelConfig that cannot describe a model."""


class CheckpointError(GrokMoeError):
  """A checkpoint that is missing, unsafe, corrupt or does not fit the config."""


class TokenizerError(GrokMoeError):
  """A tokenizer that is missing, unreadable or does not fit the model."""


class InputError(GrokMoeError, ValueError):
  """Bad arguments to generation or scoring (prompt too long, temperature < 0, ...)."""


class MeshError(GrokMoeError, ValueError):
  """A device mesh that does not fit the devices present or cannot split the model."""


class UnknownCharactersWarning(UserWarning):
  """Text holds characters the tokenizer has no piece for; each becomes <unk>."""

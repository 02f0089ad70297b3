"""Tokenizers (SentencePiece, and Hugging Face tokenizer.json), with clear errors, and text
that streams cleanly."""

from __future__ import annotations

import os
from typing import Iterable

import sentencepiece as spm

from grok_moe.config import ModelConfig
from grok_moe.errors import InputError, TokenizerError


class Tokenizer:
  """A SentencePiece model. Prompts are encoded without BOS, as the release does."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise TokenizerError(f"tokenizer not found: {self.path}; pass the path of a "
                           "SentencePiece tokenizer.model (--tokenizer)")
    self.processor = spm.SentencePieceProcessor()
    try:
      self.processor.Load(self.path)
    except (OSError, RuntimeError) as error:
      raise TokenizerError(f"cannot read tokenizer {self.path}: it is not a SentencePiece "
                           f"model ({str(error).splitlines()[0]})") from None

  @property
  def vocab_size(self) -> int:
    return self.processor.GetPieceSize()

  def check_fits(self, config: ModelConfig) -> None:
    """Raise TokenizerError if the tokenizer can produce ids the model does not have."""
    if self.vocab_size > config.vocab_size:
      raise TokenizerError(
          f"tokenizer {self.path} has {self.vocab_size} pieces but the model's vocabulary "
          f"is {config.vocab_size}; use the tokenizer the checkpoint was trained with")

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without BOS; InputError for anything but valid Unicode text."""
    _check_text(text)
    return list(self.processor.EncodeAsIds(text))

  def unknown_characters(self, text: str) -> list[str]:
    """The distinct characters of `text` that encode as <unk>, in order of appearance.

    Consecutive unknown characters share one <unk>, so they are found by
    encoding each distinct character alone, and only when <unk> occurs at all.
    """
    unknown = self.processor.unk_id()
    if unknown not in self.encode(text):
      return []
    return [char for char in dict.fromkeys(text)
            if unknown in self.processor.EncodeAsIds(char)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.DecodeIds([int(i) for i in ids])

  def piece(self, token_id: int) -> str:
    return self.processor.IdToPiece(int(token_id))


class JsonTokenizer(Tokenizer):
  """A Hugging Face tokenizer.json, through the `tokenizers` library; the same interface.

  Prompts are encoded without the special tokens the file's post-processor
  would add (BOS), as with SentencePiece.
  """

  def __init__(self, path: str | os.PathLike):  # pylint: disable=super-init-not-called
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise TokenizerError(f"tokenizer not found: {self.path}; pass the path of a "
                           "tokenizer.json (--tokenizer)")
    import tokenizers  # only checkpoints with a tokenizer.json need it
    try:
      self.processor = tokenizers.Tokenizer.from_file(self.path)
    except Exception as error:  # the library raises its own exception types
      raise TokenizerError(f"cannot read tokenizer {self.path}: it is not a tokenizer.json "
                           f"({str(error).splitlines()[0] if str(error) else error})") from None

  @property
  def vocab_size(self) -> int:
    return self.processor.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    _check_text(text)
    return list(self.processor.encode(text, add_special_tokens=False).ids)

  def unknown_characters(self, text: str) -> list[str]:
    unknown = self.processor.model.unk_token if hasattr(self.processor.model, "unk_token") else None
    unknown_id = self.processor.token_to_id(unknown) if unknown else None
    if unknown_id is None or unknown_id not in self.encode(text):
      return []
    return [char for char in dict.fromkeys(text) if unknown_id in self.encode(char)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece(self, token_id: int) -> str:
    return self.processor.id_to_token(int(token_id)) or ""


def open_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer in `path`: a tokenizer.json (any *.json) or a SentencePiece model."""
  return JsonTokenizer(path) if os.fspath(path).endswith(".json") else Tokenizer(path)


def _check_text(text) -> None:
  """InputError unless `text` is a str that UTF-8 can encode (no lone surrogates)."""
  if not isinstance(text, str):
    raise InputError(f"text must be a str, got {type(text).__name__}")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as error:
    char = text[error.start]
    raise InputError(
        f"the text holds U+{ord(char):04X} at character {error.start}, which is not valid "
        "Unicode (a byte that was not UTF-8, decoded with surrogateescape); pass text "
        "decoded from valid UTF-8") from None


class TextStream:
  """Turns generated ids into text pieces as they come, and stops at stop strings.

  SentencePiece text depends on neighbouring pieces (leading spaces, bytes of
  one UTF-8 character), so the whole row is decoded each step and only the new
  suffix is released. Text that could still become a stop string, or ends in
  an incomplete character, is held back until it is decided.
  """

  def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
    self.tokenizer = tokenizer
    self.stop = tuple(s for s in stop if s)
    self.ids: list[int] = []
    self.released = 0
    self.stopped = False

  def add(self, token_id: int) -> str:
    """Adds one id; returns the text now safe to show (possibly empty)."""
    self.ids.append(int(token_id))
    text = self.tokenizer.decode(self.ids)
    for stop in self.stop:
      at = text.find(stop)
      if at >= 0:
        self.stopped = True
        return self._release(text[:at], len(text[:at]))
    safe = len(text)
    if text.endswith("\ufffd"):
      safe -= 1
    for stop in self.stop:
      for size in range(min(len(stop) - 1, safe), 0, -1):
        if text[safe - size:safe] == stop[:size]:
          safe -= size
          break
    return self._release(text, safe)

  def finish(self) -> str:
    """The held-back text once the row has ended without a stop string."""
    if self.stopped:
      return ""
    text = self.tokenizer.decode(self.ids)
    return self._release(text, len(text))

  def _release(self, text: str, upto: int) -> str:
    piece = text[self.released:upto] if upto > self.released else ""
    self.released = max(self.released, upto)
    return piece

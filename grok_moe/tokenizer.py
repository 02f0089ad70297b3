"""Tokenizers (SentencePiece, Hugging Face tokenizer.json, Grok-2's tokenizer.tok.json), with
clear errors, and text that streams cleanly."""

from __future__ import annotations

import json
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
    if unknown_id is None:
      return []
    _check_text(text)
    encoding = self.processor.encode(text, add_special_tokens=False)
    # The characters the unknown tokens stand for, by their offsets in the text (not by
    # encoding each character alone, which would flag the "<" of a special token's text).
    spans = [text[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets)
             if token == unknown_id]
    return list(dict.fromkeys(char for span in spans for char in span))

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece(self, token_id: int) -> str:
    return self.processor.id_to_token(int(token_id)) or ""


# Grok-2's pre-tokenizer "V1" (docs/GROK2_SPEC.md, "The tokenizer file"), alternatives in
# order: English contractions; one optional non-letter, non-number, non-newline before
# letters; ONE number character (digits split singly); punctuation runs with an optional
# leading space and trailing newlines; newlines with the whitespace before them;
# whitespace not followed by a non-space; any whitespace.
GROK2_WORD_SPLIT_V1 = "|".join((
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
    r"[^\r\n\p{L}\p{N}]?\p{L}+",
    r"\p{N}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
))
MAX_TOK_JSON_BYTES = 256 * 1024 * 1024
# Text a pre-tokenizer pattern must split into non-empty pieces that cover it: tiktoken
# silently drops text no piece covers, and panics on an empty piece.
_PATTERN_PROBE = "Human: It's 2024, isn't it?<|eos|>\n\n  héllo\tworld 日本語 -- $x_1 \r\n end  "


class TiktokenTokenizer(Tokenizer):
  """Grok-2's tokenizer.tok.json, a byte-level BPE run by tiktoken; the same interface.

  The file (docs/GROK2_SPEC.md): `regular_tokens`, a list of {"bytes": [0..255],
  "token": id}, each byte string's merge rank its id; `special_tokens`, the same
  for the special tokens, whose bytes are their UTF-8 text; `word_split`, which
  must be "V1" (the pre-tokenizer GROK2_WORD_SPLIT_V1), or `pat_str`, a pattern
  that replaces it; optionally `vocab_size`, which must count the tokens exactly
  and exceed the largest id by one. Text is encoded without BOS (Grok-2 has
  none), and special-token text in it (<|separator|>, <|eos|>, ...) becomes the
  special token. Every byte string encodes, so no character is unknown.
  """

  def __init__(self, path: str | os.PathLike):  # pylint: disable=super-init-not-called
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise TokenizerError(f"tokenizer not found: {self.path}; pass the path of Grok-2's "
                           "tokenizer.tok.json (--tokenizer)")
    try:
      with open(self.path, "rb") as file:
        raw = file.read(MAX_TOK_JSON_BYTES + 1)
      if len(raw) > MAX_TOK_JSON_BYTES:
        raise TokenizerError(f"{self.path} is over {MAX_TOK_JSON_BYTES} bytes; not a "
                             "tokenizer.tok.json")
      data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
      raise TokenizerError(f"cannot read tokenizer {self.path}: it is not JSON ({error})") from None
    ranks, special, pattern, vocab_size = _read_tok_json(data, self.path)
    import tiktoken  # only Grok-2's tokenizer needs it
    try:
      self.encoding = tiktoken.Encoding(
          name=os.path.basename(self.path), pat_str=pattern, mergeable_ranks=ranks,
          special_tokens=special, explicit_n_vocab=vocab_size)
    except (ValueError, AssertionError) as error:  # tiktoken: a pattern that does not compile
      raise TokenizerError(f"{self.path}: tiktoken refuses it ({error}); the file is "
                           "corrupt") from None

  @property
  def vocab_size(self) -> int:
    return self.encoding.n_vocab

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without BOS; special-token text becomes its special token."""
    _check_text(text)
    return self.encoding.encode(text, allowed_special="all", disallowed_special=())

  def unknown_characters(self, text: str) -> list[str]:
    return []  # byte-level: every character is some tokens' bytes

  def _bytes(self, token_id: int) -> bytes:
    try:
      return self.encoding.decode_single_token_bytes(int(token_id))
    except (KeyError, OverflowError, ValueError):  # an id the file does not define
      return "\ufffd".encode()

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; bytes that are not UTF-8 and ids the file lacks become U+FFFD."""
    return b"".join(self._bytes(i) for i in ids).decode("utf-8", errors="replace")

  def piece(self, token_id: int) -> str:
    return self._bytes(token_id).decode("utf-8", errors="replace")


def _read_tok_json(data, path: str):
  """(mergeable ranks {bytes: id}, special tokens {text: id}, pattern, vocab size or None)
  of a parsed tokenizer.tok.json; TokenizerError naming the file for anything else."""
  def fail(problem: str) -> TokenizerError:
    return TokenizerError(f"{path} is not a valid tokenizer.tok.json: {problem}")

  if not isinstance(data, dict):
    raise fail("not a JSON object")

  def tokens(field: str) -> list[tuple[bytes, int]]:
    entries = data.get(field)
    if not isinstance(entries, list):
      raise fail(f"{field} is not a list")
    out = []
    for entry in entries:
      if not isinstance(entry, dict):
        raise fail(f"{field} holds {str(entry)[:80]}, not a {{bytes, token}} object")
      values, token = entry.get("bytes"), entry.get("token")
      if (not isinstance(values, list) or not values
          or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                     for b in values)):
        raise fail(f"a {field} entry's bytes {str(values)[:80]} are not a non-empty list of "
                   "integers 0..255")
      if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < 2**31:
        raise fail(f"a {field} entry's token {token!r} is not an id in [0, 2**31)")
      out.append((bytes(values), token))
    return out

  regular, special_entries = tokens("regular_tokens"), tokens("special_tokens")
  ranks = dict(regular)
  ids = [token for _, token in regular + special_entries]
  if len(ranks) != len(regular):
    raise fail("two regular tokens have the same bytes")
  if len(set(ids)) != len(ids):
    raise fail("two tokens have the same id")
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise fail(f"no regular token for the single byte(s) {missing[:8]}; a byte-level BPE "
               "needs all 256")
  special = {}
  for value, token in special_entries:
    try:
      special[value.decode("utf-8")] = token
    except UnicodeDecodeError:
      raise fail(f"the special token {token}'s bytes are not UTF-8 text") from None
  if len(special) != len(special_entries):
    raise fail("two special tokens have the same text")
  if data.get("word_split") != "V1":
    raise fail(f"word_split is {data.get('word_split')!r}; only \"V1\" is known")
  pattern = data.get("pat_str", GROK2_WORD_SPLIT_V1)
  if not isinstance(pattern, str) or not pattern:
    raise fail("pat_str is not a non-empty string")
  _check_pattern(pattern, fail)
  vocab_size = data.get("vocab_size")
  if vocab_size is not None and (vocab_size != len(ids) or vocab_size != max(ids) + 1
                                 or isinstance(vocab_size, bool)):
    raise fail(f"vocab_size {vocab_size!r} is not the number of tokens ({len(ids)}) with ids "
               f"0 .. {vocab_size - 1 if isinstance(vocab_size, int) else '?'}")
  return ranks, special, pattern, vocab_size


def _check_pattern(pattern: str, fail) -> None:
  """Raises fail(...) unless `pattern` compiles and splits _PATTERN_PROBE into non-empty
  pieces that cover all of it (the `regex` module reads tiktoken's pattern syntax)."""
  import regex  # installed with tiktoken
  try:
    pieces = [match.span() for match in regex.finditer(pattern, _PATTERN_PROBE)]
  except (regex.error, RecursionError) as error:
    raise fail(f"pat_str does not compile ({error})") from None
  covered = 0
  for start, end in pieces + [(len(_PATTERN_PROBE), None)]:
    if start > covered:
      raise fail(f"pat_str skips the text {_PATTERN_PROBE[covered:start]!r}; it must split "
                 "all text into pieces")
    if end == start:
      raise fail(f"pat_str matches empty text before {_PATTERN_PROBE[start:start + 10]!r}; "
                 "it must split all text into non-empty pieces")
    covered = end


def open_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer in `path`, by its name: Grok-2's *.tok.json, a Hugging Face
  tokenizer.json (any other *.json), or a SentencePiece model."""
  name = os.fspath(path)
  if name.endswith(".tok.json"):
    return TiktokenTokenizer(path)
  return JsonTokenizer(path) if name.endswith(".json") else Tokenizer(path)


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

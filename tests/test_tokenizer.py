"""Tokenizer loading errors and streaming text with stop strings."""

import pathlib

import pytest

from grok_moe.config import TINY
from grok_moe.errors import InputError, TokenizerError
from grok_moe.tokenizer import JsonTokenizer, TextStream, Tokenizer
from tests.helpers import train_char_tokenizer

FAMILY_TOKENIZER = (pathlib.Path(__file__).parent / "data" / "families" / "qwen2_moe"
                    / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  train_char_tokenizer(path)
  return Tokenizer(path)


def stream_all(tokenizer, text, stop=()):
  stream = TextStream(tokenizer, tuple(stop))
  pieces = []
  for token in tokenizer.encode(text):
    pieces.append(stream.add(token))
    if stream.stopped:
      break
  pieces.append(stream.finish())
  return pieces


def test_streamed_pieces_add_up_to_the_text(tokenizer):
  text = "ROMEO: But soft, what light"
  pieces = stream_all(tokenizer, text)
  assert "".join(pieces) == tokenizer.decode(tokenizer.encode(text)) == text
  assert sum(1 for piece in pieces if piece) > 5  # it streams, not all at the end


def test_stop_string_ends_the_text_before_it(tokenizer):
  pieces = stream_all(tokenizer, "ROMEO: But soft, what light", stop=["soft"])
  assert "".join(pieces) == "ROMEO: But "
  # A partial match is held back, and released once it stops matching.
  stream = TextStream(tokenizer, ("soft",))
  released = ""
  for token in tokenizer.encode("ROMEO: so"):
    released += stream.add(token)
  assert released == "ROMEO: "
  for token in tokenizer.encode(" But"):
    released += stream.add(token)
  assert released + stream.finish() == "ROMEO: so But"


def test_missing_and_unreadable_tokenizer(tmp_path):
  with pytest.raises(TokenizerError, match="not found"):
    Tokenizer(tmp_path / "missing.model")
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a sentencepiece model")
  with pytest.raises(TokenizerError, match="not a SentencePiece model"):
    Tokenizer(garbage)


def test_tokenizer_wider_than_the_model_is_refused(tmp_path, tokenizer):
  tokenizer.check_fits(TINY)
  wide = tmp_path / "wide.model"
  train_char_tokenizer(wide, extra_pieces=TINY.vocab_size)
  with pytest.raises(TokenizerError, match="vocabulary"):
    Tokenizer(wide).check_fits(TINY)


def test_unknown_characters_are_named_once_in_order(tokenizer):
  """unknown_characters names each character that becomes <unk>, once, in order of
  appearance, even where several unknown characters share one <unk> piece ("éü"); known
  text gives none. Catches the warning of item 9 missing or naming known characters."""
  assert tokenizer.unknown_characters("ROMEO: But soft") == []
  assert tokenizer.unknown_characters("ROMEO: éü~é!") == ["é", "ü", "~", "!"]


def test_text_that_is_not_valid_unicode_is_refused(tokenizer):
  """A str with a lone surrogate (bytes that were not UTF-8, decoded with surrogateescape)
  or a non-str gets an InputError, not SentencePiece's "Unable to cast" RuntimeError."""
  with pytest.raises(InputError, match="U\\+DCFF at character 5"):
    tokenizer.encode("ROMEO\udcff:")
  with pytest.raises(InputError, match="must be a str"):
    tokenizer.encode(b"ROMEO:")


def test_json_tokenizer_names_unknown_characters_not_special_token_text():
  """A tokenizer.json's unknown characters are found by their offsets in the encoded text:
  a special token's text ("<|im_end|>", one id) beside a truly unknown "é" names only
  "é". Catches the character-by-character check, which also named "<", "|" and ">"."""
  tokenizer = JsonTokenizer(FAMILY_TOKENIZER)
  tokenizer.processor.add_special_tokens(["<|im_end|>"])
  assert len(tokenizer.encode("<|im_end|>")) == 1
  assert tokenizer.unknown_characters("hello<|im_end|>") == []
  assert tokenizer.unknown_characters("é hello<|im_end|> é~") == ["é", "~"]

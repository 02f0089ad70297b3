"""Writes a character-level tokenizer.json into each tiny family fixture (tests/data/families).

The fixtures' models are random, so any tokenizer whose ids fit their
vocabulary of 101 will do; this one maps each of 72 characters (letters,
digits, space, newline and common punctuation) to one id, 1..72, with id 0 for
<unk>, through the `tokenizers` library (a WordLevel model over single
characters, decoded by joining the pieces). With it, `python run.py --checkpoint
tests/data/families/<family> --prompt ...` runs each family end to end.

    python scripts/build_family_tokenizers.py
"""

from __future__ import annotations

import pathlib
import string

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

FAMILIES_DIR = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "families"
CHARACTERS = string.ascii_letters + string.digits + " \n.,;:!?'-"


def build() -> tokenizers.Tokenizer:
  """The tokenizer: <unk> is 0, the characters 1.. in CHARACTERS' order."""
  vocab = {"<unk>": 0, **{char: index + 1 for index, char in enumerate(CHARACTERS)}}
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
  tokenizer.decoder = decoders.Fuse()
  return tokenizer


def main() -> None:
  tokenizer = build()
  # The Hugging Face families' fixtures; grok2/ has Grok-2's own tokenizer.tok.json.
  for family in sorted(path for path in FAMILIES_DIR.iterdir()
                       if path.is_dir() and not (path / "tokenizer.tok.json").exists()):
    tokenizer.save(str(family / "tokenizer.json"))
    print(f"wrote {family / 'tokenizer.json'} ({tokenizer.get_vocab_size()} ids)")


if __name__ == "__main__":
  main()

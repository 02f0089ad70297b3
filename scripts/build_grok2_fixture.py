"""Writes tests/data/families/grok2: a tiny random checkpoint in Grok-2's released layout.

Grok-2 has no reference implementation to run here (docs/GROK2_SPEC.md), so
unlike the other family fixtures this one holds no reference outputs: it is
random params (`params.init_params(CONFIG, SEED)`) saved by grok_moe's own
writer in the release's layout (config.json in the release's spelling, the
three expert kinds split over 8 `pytorch_model-NNNNN-TP-RRR.safetensors` rank
files, everything else in `-TP-common` files, float32), and a byte-level
`tokenizer.tok.json`. With it, `python run.py --checkpoint
tests/data/families/grok2 --prompt ...` runs Grok-2's layout end to end, and
tests/test_grok2_checkpoint.py checks that the weight files and config.json are
exactly what the package's writer gives for CONFIG and SEED (the tokenizer file
is copied, not rebuilt there: tests do not import scripts/).

CONFIG is TINY_GROK_2 with 8 query heads (2, 4 and 8 devices split them), an
expert FFN of 24 (2, 3, 4 and 8 ranks split it) and a vocabulary of 263: the
special tokens <|pad|>, <|separator|>, <|eos|> at 0..2 (EOS 2, as Grok-2's),
the 256 bytes at 3..258 and three merges.

    python scripts/build_grok2_fixture.py
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

from grok_moe import checkpoint
from grok_moe import params as param_table
from grok_moe.config import TINY_GROK_2

FIXTURE_DIR = (pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "families"
               / "grok2")
CONFIG = TINY_GROK_2.replace(num_q_heads=8, expert_ffn_size=24, vocab_size=263,
                             widening_factor=24 / 40, bos_token=2)
SEED = 3
RANKS = 8
SPECIAL_TOKENS = ("<|pad|>", "<|separator|>", "<|eos|>")
MERGES = ("ab", "abc", " t")


def tokenizer_json() -> dict:
  """tokenizer.tok.json (docs/GROK2_SPEC.md): the specials at ids 0..2, the 256 bytes at
  3..258 (a byte's rank is its id), then MERGES."""
  special = [{"bytes": list(text.encode()), "token": i} for i, text in enumerate(SPECIAL_TOKENS)]
  regular = [{"bytes": [b], "token": 3 + b} for b in range(256)]
  regular += [{"bytes": list(text.encode()), "token": 259 + i} for i, text in enumerate(MERGES)]
  return {"regular_tokens": regular, "special_tokens": special, "word_split": "V1"}


def main() -> None:
  params = param_table.init_params(CONFIG, SEED)
  with tempfile.TemporaryDirectory() as scratch:
    saved = pathlib.Path(scratch) / "grok2"
    checkpoint.save_checkpoint(params, saved, CONFIG, format="safetensors", ranks=RANKS,
                               progress=False)
    if FIXTURE_DIR.exists():
      shutil.rmtree(FIXTURE_DIR)
    FIXTURE_DIR.mkdir(parents=True)
    # The top-level files only, as plain files (the save links them into its versions).
    for path in sorted(saved.iterdir()):
      if path.is_file() and not path.name.startswith("."):
        shutil.copyfile(path, FIXTURE_DIR / path.name)
  (FIXTURE_DIR / "tokenizer.tok.json").write_text(json.dumps(tokenizer_json()))
  total = sum(path.stat().st_size for path in FIXTURE_DIR.iterdir())
  print(f"wrote {FIXTURE_DIR}: {len(list(FIXTURE_DIR.iterdir()))} files, {total} bytes")


if __name__ == "__main__":
  main()

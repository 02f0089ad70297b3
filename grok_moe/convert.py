"""python -m grok_moe.convert SRC DST --format FORMAT: a checkpoint saved in another format.

    python -m grok_moe.convert my_qwen my_qwen_int8 --format release
    python -m grok_moe.convert my_mixtral_int8 my_mixtral --format safetensors --dtype bfloat16

SRC is any checkpoint `Model.from_checkpoint` reads: the release format, or a
Hugging Face directory of a supported family. DST gets the same model in
FORMAT (`grok_moe.save_checkpoint`): "release" quantizes float weights to int8
with bfloat16 scales; "safetensors" writes the family's Hugging Face layout
(Mixtral, Qwen2-MoE, Qwen3-MoE and Grok-2 configs; int8 weights dequantized, to
float32 unless --dtype; Grok-2 split into --ranks rank files as its release).
The tokenizer files beside SRC (tokenizer.model, tokenizer.json,
tokenizer.tok.json) are copied beside DST where DST has none. The weights are
loaded on the default device, then written one tensor at a time.

Bad input ends with one line `error: ...` and exit status 2, Ctrl-C with 130;
an interrupted conversion leaves DST as it was (the save is atomic).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import uuid

from grok_moe import api, checkpoint, hf_checkpoint, hf_save
from grok_moe.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from grok_moe.errors import CheckpointError, GrokMoeError


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m grok_moe.convert",
      description="Save a checkpoint in the other format: the release's int8 tensors, or a "
                  "Hugging Face safetensors checkpoint of the model's family.")
  parser.add_argument("source", metavar="SRC", help="the checkpoint to read (a directory)")
  parser.add_argument("destination", metavar="DST", help="the directory to write")
  parser.add_argument("--format", choices=checkpoint.SAVE_FORMATS, required=True,
                      help="release: int8 weights, one pickled tensor per file; safetensors: "
                      "the family's Hugging Face layout")
  parser.add_argument("--dtype", choices=hf_save.DTYPES,
                      help="safetensors only: write every tensor in this dtype (default: as "
                      "loaded; int8 weights dequantized to float32)")
  parser.add_argument("--max-shard-bytes", type=int,
                      help=f"safetensors only: the largest file (default: "
                      f"{hf_save.MAX_SHARD_BYTES}, 5 GB)")
  parser.add_argument("--ranks", type=int,
                      help=f"safetensors, Grok-2 only: the number of tensor-parallel rank "
                      f"files the expert tensors are split into (default: {hf_save.RANKS}, as "
                      "the release)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a checkpoint already in DST")
  return parser


def copy_tokenizer(source: pathlib.Path, destination: pathlib.Path) -> None:
  """Copy the tokenizer files beside `source` that `destination` lacks (each to a
  temporary name, then renamed)."""
  root = source.parent if source.name == checkpoint.TENSOR_DIR else source
  for name in api.TOKENIZER_FILES:
    if (root / name).is_file() and not (destination / name).exists():
      temporary = destination / f".{name}.{uuid.uuid4().hex}"
      shutil.copyfile(root / name, temporary)
      os.replace(temporary, destination / name)


def convert(args: argparse.Namespace) -> pathlib.Path:
  """Load SRC, save it to DST in the format asked; returns DST."""
  source = pathlib.Path(args.source)
  if not source.is_dir():
    raise CheckpointError(f"{source} is not a checkpoint directory")
  config = checkpoint.checkpoint_config(source)
  if args.format == "safetensors":
    hf_checkpoint.hf_config(config)  # a config of no family is refused before loading
  if hf_checkpoint.is_hf_checkpoint(source):
    _, params = hf_checkpoint.load(source, config)
  else:
    params = checkpoint.load_checkpoint(source, config)
  destination = checkpoint.save_checkpoint(
      params, args.destination, config, format=args.format, overwrite=args.overwrite,
      dtype=args.dtype, max_shard_bytes=args.max_shard_bytes, ranks=args.ranks)
  copy_tokenizer(source, destination)
  return destination


def main(argv: list[str] | None = None) -> int:
  """The exit status of converting as `argv` (default: sys.argv[1:]) says."""
  args = build_parser().parse_args(argv)
  try:
    destination = convert(args)
  except GrokMoeError as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  print(f"saved {destination} ({args.format})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

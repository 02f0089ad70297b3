#!/usr/bin/env python3
"""Text completion with a Grok-style model: python run.py --prompt "ROMEO:"."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent
RELEASE_DIR = REPO / "checkpoints" / "ckpt-0"
RELEASE_TOKENIZER = REPO / "checkpoints" / "tokenizer.model"
DEMO_DIR = REPO / "checkpoints" / "demo"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Complete a prompt with a Grok-style mixture-of-experts model, streaming "
                  "the text as it is generated. Load time and speed go to stderr.")
  parser.add_argument("--prompt", help="the text to complete; read from stdin when omitted "
                      "(an empty prompt starts from BOS)")
  parser.add_argument("--checkpoint", help="a directory holding ckpt-0/ (or ckpt-0/ itself). "
                      "Default: checkpoints/ckpt-0 (Grok-1) when present, else the bundled "
                      "demo model in checkpoints/demo")
  parser.add_argument("--tokenizer", help="SentencePiece tokenizer.model. Default: the one "
                      "beside the checkpoint (checkpoints/tokenizer.model for Grok-1)")
  parser.add_argument("--config", help="a preset name (grok-1, bench, tiny) or a config.json; "
                      "only needed for a checkpoint without config.json that is not Grok-1")
  parser.add_argument("--max-new-tokens", type=int, default=128,
                      help="stop after this many new tokens (default: %(default)s)")
  parser.add_argument("--temperature", type=float, default=0.8,
                      help="sampling temperature; 0 is greedy (default: %(default)s)")
  parser.add_argument("--top-p", type=float, default=0.95,
                      help="nucleus sampling: keep the most likely tokens up to this "
                      "probability mass, in (0, 1]; 1 turns it off (default: %(default)s)")
  parser.add_argument("--top-k", type=int, default=0,
                      help="keep only the k most likely tokens; 0 turns it off "
                      "(default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="random seed; the same seed gives the same text (default: %(default)s)")
  parser.add_argument("--stop", action="append", default=[],
                      help="stop before this string (may be given several times)")
  parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                      help="activation dtype; auto is float32 on CPU, bfloat16 on GPU/TPU")
  parser.add_argument("--truncate", action="store_true",
                      help="keep the last tokens of a prompt longer than the context "
                      "instead of stopping with an error")
  return parser.parse_args(argv)


def resolve_checkpoint(args) -> tuple[pathlib.Path, str | None, object, str]:
  """(checkpoint, tokenizer, config, description) from the flags and what is present."""
  import grok_moe
  config = None
  if args.config:
    if args.config in grok_moe.PRESETS:
      config = grok_moe.PRESETS[args.config]
    else:
      try:
        config = grok_moe.ModelConfig.from_json(pathlib.Path(args.config).read_text())
      except OSError as error:
        raise grok_moe.ConfigError(f"cannot read --config {args.config}: {error.strerror}; "
                                   f"give a preset ({', '.join(grok_moe.PRESETS)}) or a "
                                   "config.json") from None
  if args.checkpoint:
    return pathlib.Path(args.checkpoint), args.tokenizer, config, args.checkpoint
  if RELEASE_DIR.is_dir():
    tokenizer = args.tokenizer or os.fspath(RELEASE_TOKENIZER)
    return RELEASE_DIR, tokenizer, config or grok_moe.GROK_1, f"Grok-1 ({RELEASE_DIR})"
  return DEMO_DIR, args.tokenizer, config, f"the bundled demo model ({DEMO_DIR})"


def main(argv=None) -> int:
  args = parse_args(argv)
  prompt = args.prompt if args.prompt is not None else sys.stdin.read()
  import jax
  import grok_moe

  try:
    checkpoint, tokenizer, config, description = resolve_checkpoint(args)
    dtype = args.dtype
    if dtype == "auto":
      dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    grok_moe.SamplingConfig(**settings)  # reject bad settings before loading
    print(f"loading {description}", file=sys.stderr)
    start = time.perf_counter()
    model = grok_moe.Model.from_checkpoint(checkpoint, config=config, tokenizer=tokenizer,
                                           dtype=dtype)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    sys.stdout.write(prompt)
    for piece in model.stream(prompt, stop=args.stop, truncate=args.truncate, **settings):
      sys.stdout.write(piece)
      sys.stdout.flush()
    sys.stdout.write("\n")
    stats = model.last_stats
    print(f"{stats.new_tokens} tokens in {stats.total_s:.1f} s: first token after "
          f"{stats.first_token_s:.1f} s (prefill and compilation), then "
          f"{stats.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
  except grok_moe.GrokMoeError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

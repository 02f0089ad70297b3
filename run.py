#!/usr/bin/env python3
"""Text completion with a Grok-style model: python run.py --prompt "ROMEO:".

On several devices:  python run.py --mesh 1x8 --prompt "..."
On several hosts, the same command on each, with its own --process-id:
    python run.py --mesh 2x8 --coordinator host0:1234 --num-processes 2 --process-id 0 ...
Memory plan only:    python run.py --plan --config grok-1 --mesh 1x8
Every core of a CPU: python run.py --cpu-devices 2 --prompt "..."
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from grok_moe import plan_command  # jax is imported but starts no backend: XLA_FLAGS still apply

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

  devices = parser.add_argument_group(
      "devices and hosts", "Run one model over a DATAxMODEL mesh of devices, on one or more "
      "hosts. Every process runs the same command (with its own --process-id) and the same "
      "prompt; process 0 prints the text.")
  devices.add_argument("--mesh", metavar="DATAxMODEL",
                       help="device mesh, e.g. 1x8 or 2x4: the batch is split DATA ways, "
                       "attention heads and experts MODEL ways; DATA x MODEL must be the "
                       "number of devices on all hosts together. Default: one device "
                       "(1xN over all devices with several processes)")
  devices.add_argument("--moe-sharding", choices=("tensor", "expert"), default="tensor",
                       help="tensor: every device holds a slice of every expert; expert: "
                       "every device holds whole experts (MODEL must divide the experts) "
                       "(default: %(default)s)")
  devices.add_argument("--cpu-devices", type=int, metavar="N",
                       help="on a CPU: make it N XLA devices (one a core) and run on a 1xN "
                       "mesh over them, so that decoding uses every core instead of one "
                       "(default: one device)")
  devices.add_argument("--coordinator", metavar="HOST:PORT",
                       help="with several processes: the address of process 0, where the "
                       "coordinator listens (the same on every process)")
  devices.add_argument("--num-processes", type=int, default=1,
                       help="number of processes (hosts) taking part (default: %(default)s)")
  devices.add_argument("--process-id", type=int, default=0,
                       help="this process's index, 0 .. num-processes - 1 (default: %(default)s)")

  plan_command.add_arguments(parser)
  args = parser.parse_args(argv)
  if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id must be in [0, {args.num_processes}) and --num-processes >= 1")
  if args.num_processes > 1 and not args.coordinator:
    parser.error("--num-processes > 1 needs --coordinator HOST:PORT (process 0's address)")
  if args.cpu_devices is not None and args.cpu_devices < 1:
    parser.error("--cpu-devices must be positive")
  plan_command.check_arguments(args, parser)
  return args


CPU_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def set_cpu_device_count(count: int) -> None:
  """Asks XLA for `count` CPU devices; must come before jax is imported."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith(CPU_DEVICE_FLAG)]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"{CPU_DEVICE_FLAG}={count}"])


def start_distributed(args) -> None:
  """Joins the processes into one set of devices; must come before anything touches devices."""
  import jax
  # CPU hosts exchange data through gloo; the setting does not concern GPUs or TPUs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id)


def print_plan(args) -> int:
  """The memory plan for the flags, computed from shapes: nothing is loaded."""
  from grok_moe import checkpoint
  path, _, config, _ = resolve_checkpoint(args)
  label = args.config if args.config else str(path)
  if config is None:
    config = checkpoint.checkpoint_config(path, None)  # reads config.json only
  return plan_command.run(args, config, label)


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
  if args.cpu_devices:
    set_cpu_device_count(args.cpu_devices)
  if args.num_processes > 1:
    start_distributed(args)
  import jax
  import grok_moe

  if args.plan:
    try:
      return print_plan(args)
    except grok_moe.GrokMoeError as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
  prompt = args.prompt if args.prompt is not None else sys.stdin.read()
  main_process = jax.process_index() == 0  # the one process that prints

  def say(text: str) -> None:
    if main_process:
      print(text, file=sys.stderr)

  def show(text: str) -> None:
    if main_process:
      sys.stdout.write(text)
      sys.stdout.flush()

  try:
    mesh = None
    if args.mesh:
      mesh = grok_moe.make_mesh(*grok_moe.sharding.parse_mesh(args.mesh))
    elif args.num_processes > 1:
      mesh = grok_moe.make_mesh()  # 1 x all devices
    elif args.cpu_devices and jax.default_backend() == "cpu":
      mesh = grok_moe.make_mesh(1, args.cpu_devices,
                                devices=jax.devices("cpu")[:args.cpu_devices])
    checkpoint, tokenizer, config, description = resolve_checkpoint(args)
    dtype = args.dtype
    if dtype == "auto":
      dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    grok_moe.SamplingConfig(**settings)  # reject bad settings before loading
    where = "" if mesh is None else (
        f" onto a {mesh.shape['data']}x{mesh.shape['model']} mesh ({args.moe_sharding} "
        f"MoE sharding, {args.num_processes} process(es))")
    say(f"loading {description}{where}")
    start = time.perf_counter()
    model = grok_moe.Model.from_checkpoint(checkpoint, config=config, tokenizer=tokenizer,
                                           dtype=dtype, mesh=mesh,
                                           moe_sharding=args.moe_sharding,
                                           progress=main_process)
    say(f"loaded in {time.perf_counter() - start:.1f} s")

    show(prompt)
    for piece in model.stream(prompt, stop=args.stop, truncate=args.truncate, **settings):
      show(piece)
    show("\n")
    stats = model.last_stats
    say(f"{stats.new_tokens} tokens in {stats.total_s:.1f} s: first token after "
        f"{stats.first_token_s:.1f} s (prefill and compilation), second after "
        f"{stats.second_token_s:.1f} s (decode step compilation), then "
        f"{stats.decode_tokens_per_s:.1f} tokens/s")
  except grok_moe.GrokMoeError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

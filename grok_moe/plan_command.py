"""`run.py --plan`: bytes per device of a config on a mesh, from shapes alone.

With the mesh's devices present (on a CPU: `--cpu-devices N` makes N of
them), every program generation runs is compiled and XLA's own per-device
memory is printed (`grok_moe.compiled_plan`), as a table or, with `--json`,
as one JSON object. Without them, the weights and KV cache are counted from
the parameter table (`grok_moe.memory.memory_plan`), and stderr says how to
get XLA's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

GB = 1e9
DEFAULT_BATCH = 1
DEFAULT_PREFILL_CHUNK = 1024
DEFAULT_DEVICE_MEMORY_GB = 80.0
# The plan's own flags: given without --plan they are an error (see check_arguments).
PLAN_ONLY_FLAGS = ("batch", "prompt_len", "cache_len", "prefill_chunk", "num_layers",
                   "device_memory", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The memory-plan flags, as one argument group of run.py's parser."""
  plan = parser.add_argument_group(
      "memory plan", "--plan prints what one device holds for --config on --mesh, without "
      "loading any weights. With the mesh's devices present (on a CPU, --cpu-devices N), it "
      "compiles every program generation runs and prints XLA's figures. These flags are for "
      "--plan only.")
  plan.add_argument("--plan", action="store_true",
                    help="print the memory plan and exit")
  plan.add_argument("--batch", type=int,
                    help=f"rows of the batch to plan for (default: {DEFAULT_BATCH})")
  plan.add_argument("--prompt-len", type=int,
                    help="prompt tokens to plan for (default: the cache length)")
  plan.add_argument("--cache-len", type=int,
                    help="KV cache length to plan for (default: the config's sequence_len)")
  plan.add_argument("--prefill-chunk", type=int,
                    help="longest prefill pass in tokens; longer prompts are prefilled chunk "
                    f"by chunk (default: {DEFAULT_PREFILL_CHUNK})")
  plan.add_argument("--num-layers", type=int,
                    help="override the config's number of decoder layers")
  plan.add_argument("--device-memory", type=float, metavar="GB",
                    help="memory of one device in GB (1e9 bytes) "
                    f"(default: {DEFAULT_DEVICE_MEMORY_GB:g})")
  plan.add_argument("--json", action="store_const", const=True,
                    help="print the compiled plan as one JSON object")


def check_arguments(args, parser: argparse.ArgumentParser) -> None:
  """parser.error for plan flags without --plan, and for values no model could have."""
  if not args.plan:
    given = [name for name in PLAN_ONLY_FLAGS if getattr(args, name) is not None]
    if given:
      flag = "--" + given[0].replace("_", "-")
      parser.error(f"{flag} is for the memory plan only: add --plan, or leave it out (to "
                   "complete several prompts as one batch, use Model.generate([...]) in Python)")
    return
  for flag in ("batch", "prompt_len", "cache_len", "prefill_chunk", "num_layers"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      parser.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
  if args.device_memory is not None and not (args.device_memory > 0
                                             and math.isfinite(args.device_memory)):
    parser.error(f"--device-memory must be a positive number of GB, got {args.device_memory}")


def run(args, config, config_label: str) -> int:
  """Prints the plan for `config` (already resolved from --config or the checkpoint)."""
  import jax

  from grok_moe import compiled_plan, memory, sharding
  from grok_moe.errors import InputError

  if args.num_layers:
    config = config.replace(num_layers=args.num_layers)
  cache_len = args.cache_len or config.sequence_len
  if cache_len > config.sequence_len:
    raise InputError(f"--cache-len {cache_len} exceeds the model's context of "
                     f"{config.sequence_len} tokens; give at most {config.sequence_len}")
  prompt_len = args.prompt_len or cache_len
  if prompt_len > cache_len:
    raise InputError(f"--prompt-len {prompt_len} does not fit a cache of {cache_len} tokens; "
                     "raise --cache-len or shorten the prompt")
  data, model_size = (sharding.parse_mesh(args.mesh) if args.mesh else (1, jax.device_count()))
  device_bytes = (args.device_memory or DEFAULT_DEVICE_MEMORY_GB) * GB
  batch = args.batch or DEFAULT_BATCH
  prefill_chunk = args.prefill_chunk or DEFAULT_PREFILL_CHUNK
  needed = data * model_size
  if jax.device_count() >= needed:
    mesh = sharding.make_mesh(data, model_size, devices=jax.devices()[:needed])
    plan = compiled_plan.compiled_plan(
        config, mesh, moe_mode=args.moe_sharding, batch_size=batch, prompt_len=prompt_len,
        cache_len=cache_len, prefill_chunk=prefill_chunk,
        dtype="bfloat16" if args.dtype == "auto" else args.dtype, device_bytes=device_bytes,
        config_name=config_label)
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.format())
    return 0
  hint = (f"XLA's own figures need the {needed} devices of the mesh; there are "
          f"{jax.device_count()}" + (f": on a CPU add --cpu-devices {needed}"
                                     if jax.default_backend() == "cpu" else ""))
  if args.json:
    raise InputError(f"--json prints the compiled plan, and {hint}")
  analytic = memory.memory_plan(config, (data, model_size), batch, cache_len,
                                args.moe_sharding)
  print(analytic.format(device_bytes))
  print(f"note: counted from the parameter table, not compiled; {hint}", file=sys.stderr)
  return 0

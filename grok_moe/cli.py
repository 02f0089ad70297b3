"""The command line: complete a prompt with a Grok-style model, streaming the text.

One program under three names: `grok-moe` (the console script pip installs),
`python -m grok_moe`, and `python run.py` in a clone.

    grok-moe --prompt "ROMEO:"
    grok-moe --checkpoint DIR --chat --prompt "Hi"     the reply, with DIR's chat template
    grok-moe --mesh 1x8 --prompt "..."                  several devices
    grok-moe --mesh 2x8 --coordinator host0:1234 --num-processes 2 --process-id 0 ...
    grok-moe --plan --config grok-1 --mesh 1x8          memory plan only
    grok-moe --cpu-devices 2 --prompt "..."             every core of a CPU

The text goes to stdout, everything else (what is loaded, speed, warnings) to
stderr. Bad input ends with one line `error: ...` and exit status 2; Ctrl-C
with exit status 130 and a reader that goes away (`| head`) with 141, both
without a word.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
import warnings

from grok_moe import plan_command

CHECKPOINTS = "checkpoints"
RELEASE_TENSORS = "ckpt-0"
RELEASE_TOKENIZER = "tokenizer.model"
DEMO = "demo"
CONFIG_FILE = "config.json"
SEED_LIMIT = 2 ** 32
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130    # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141    # 128 + SIGPIPE, as a shell reports `yes | head`


def checkpoint_roots() -> list[pathlib.Path]:
  """Where the default checkpoints are looked for, in order.

  First checkpoints/ in the clone this package was imported from (run.py, or
  an editable install); then checkpoints/ in the current directory, which is
  how a pip-installed grok-moe finds them outside a clone.
  """
  clone = pathlib.Path(__file__).resolve().parent.parent / CHECKPOINTS
  here = pathlib.Path.cwd() / CHECKPOINTS
  return [clone] if here.resolve() == clone else [clone, here]


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line, `error: ...`, with exit status 2."""

  def error(self, message: str):
    self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  from grok_moe import __version__
  roots = " or ".join(str(root) for root in checkpoint_roots())
  parser = _Parser(
      prog="grok-moe",
      description="Complete a prompt with a Grok-style mixture-of-experts model, streaming "
                  "the text as it is generated. Load time and speed go to stderr.",
      epilog=f"Default checkpoint: the first of {roots} that holds ckpt-0/ (the Grok-1 "
             "release, with tokenizer.model beside it) or demo/ (the small demo model a "
             "clone of grok_moe bundles). Installed with pip outside a clone, run from a "
             "directory holding checkpoints/, or pass --checkpoint.")
  parser.add_argument("--version", action="version", version=f"grok_moe {__version__}")
  parser.add_argument("--prompt", help="the text to complete; read from stdin when omitted "
                      "(an empty prompt starts from BOS)")
  parser.add_argument("--checkpoint", help="a directory holding ckpt-0/ (or ckpt-0/ itself), "
                      "or a Hugging Face directory (Mixtral, Qwen MoE, Grok-2). Default: see "
                      "below")
  parser.add_argument("--tokenizer", help="SentencePiece tokenizer.model, Hugging Face "
                      "tokenizer.json or Grok-2's tokenizer.tok.json. Default: the one beside "
                      "the checkpoint (checkpoints/tokenizer.model for Grok-1)")
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
                      help="random seed in [0, 2**32); the same seed gives the same text "
                      "(default: %(default)s)")
  parser.add_argument("--stop", action="append", default=[],
                      help="stop before this string (may be given several times)")
  parser.add_argument("--chat", action="store_true",
                      help="send the prompt as one user message, rendered with the "
                      "checkpoint's chat template, and print only the assistant's reply")
  parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                      help="activation dtype; auto is float32 on CPU, bfloat16 on GPU/TPU, "
                      "as in the Python API")
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
  parser.add_argument("--compilation-cache", metavar="DIR",
                      help="directory of JAX's persistent compilation cache, so that a second "
                      "run with the same shapes compiles nothing; 'off' turns it off "
                      "(default: $GROK_MOE_COMPILATION_CACHE, else ~/.cache/grok_moe/jax)")
  return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """parser.error, naming the flag, for values the flags' types let through."""
  if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id must be in [0, {args.num_processes}) and --num-processes >= 1")
  if args.num_processes > 1 and not args.coordinator:
    parser.error("--num-processes > 1 needs --coordinator HOST:PORT (process 0's address)")
  if args.cpu_devices is not None and args.cpu_devices < 1:
    parser.error("--cpu-devices must be positive")
  if args.max_new_tokens < 0:
    parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
  if not (args.temperature >= 0 and math.isfinite(args.temperature)):
    parser.error(f"--temperature must be a number >= 0 (0 is greedy), got {args.temperature}")
  if not 0 < args.top_p <= 1:
    parser.error(f"--top-p must be in (0, 1] (1 turns it off), got {args.top_p}")
  if args.top_k < 0:
    parser.error(f"--top-k must be >= 0 (0 turns it off), got {args.top_k}")
  if not 0 <= args.seed < SEED_LIMIT:
    parser.error(f"--seed must be in [0, 2**32) = [0, {SEED_LIMIT}), got {args.seed}")
  plan_command.check_arguments(args, parser)


def parse_args(argv=None) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_args(parser, args)
  return args


CPU_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def set_cpu_device_count(count: int) -> None:
  """Asks XLA for `count` CPU devices; must come before jax starts its CPU backend."""
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


def read_prompt(args, say) -> str:
  """--prompt, or all of stdin (decoded as UTF-8); InputError for bytes that are not UTF-8."""
  from grok_moe.errors import InputError
  if args.prompt is not None:
    try:
      args.prompt.encode("utf-8")
    except UnicodeEncodeError as error:
      # Arguments that are not UTF-8 arrive with each bad byte as a surrogate U+DC80..U+DCFF.
      code = ord(args.prompt[error.start])
      what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
      raise InputError(f"--prompt is not valid UTF-8 ({what} at character {error.start}); "
                       "pass UTF-8 text") from None
    return args.prompt
  if sys.stdin is None:
    return ""
  if sys.stdin.isatty():
    say("reading the prompt from stdin (end it with Ctrl-D; or pass --prompt)")
  data = sys.stdin.buffer.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as error:
    raise InputError(f"the prompt on stdin is not valid UTF-8 (byte 0x{data[error.start]:02x}"
                     f" at offset {error.start}); convert it first, e.g. with iconv -t UTF-8"
                     ) from None


def config_from_flag(text: str | None):
  """The ModelConfig that --config names (a preset or a config.json), or None."""
  import grok_moe
  if not text:
    return None
  if text in grok_moe.PRESETS:
    return grok_moe.PRESETS[text]
  try:
    return grok_moe.ModelConfig.from_json(pathlib.Path(text).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError) as error:
    reason = error.strerror if isinstance(error, OSError) else "not a UTF-8 text file"
    raise grok_moe.ConfigError(f"cannot read --config {text}: {reason}; give a preset "
                               f"({', '.join(grok_moe.PRESETS)}) or a config.json") from None
  except grok_moe.ConfigError as error:
    raise grok_moe.ConfigError(f"--config {text}: {error}") from None


def _saved_config_file(path: pathlib.Path) -> pathlib.Path:
  """Where the checkpoint at `path` (D or D/ckpt-0) keeps its config.json."""
  return (path.parent if path.name == RELEASE_TENSORS else path) / CONFIG_FILE


def resolve_checkpoint(args) -> tuple[pathlib.Path, str | None, object, str]:
  """(checkpoint, tokenizer, config, description) from the flags and what is present.

  With --checkpoint, --config must agree with its config.json (when it has
  one); without, the first checkpoint root holding the Grok-1 release, else
  the demo model, is used.
  """
  import grok_moe
  from grok_moe.errors import CheckpointError, ConfigError
  config = config_from_flag(args.config)
  if args.checkpoint:
    path = pathlib.Path(args.checkpoint)
    if path.exists() and not path.is_dir():
      raise CheckpointError(f"--checkpoint {path} is a file; pass the directory that holds "
                            f"{RELEASE_TENSORS}/ (or {RELEASE_TENSORS}/ itself)")
    saved_file = _saved_config_file(path)
    if config is not None and saved_file.is_file():
      saved = grok_moe.checkpoint_config(path)
      if saved != config:
        differing = [field for field, value in config.to_dict().items()
                     if saved.to_dict()[field] != value]
        raise ConfigError(f"--config {args.config} differs from {saved_file} in {differing}; "
                          "leave out --config to use the checkpoint's own config")
    return path, args.tokenizer, config, args.checkpoint
  for root in checkpoint_roots():
    if (root / RELEASE_TENSORS).is_dir():
      tokenizer = args.tokenizer or os.fspath(root / RELEASE_TOKENIZER)
      release = root / RELEASE_TENSORS
      return release, tokenizer, config or grok_moe.GROK_1, f"Grok-1 ({release})"
    if (root / DEMO / RELEASE_TENSORS).is_dir():
      demo = root / DEMO
      if config is not None and config != grok_moe.checkpoint_config(demo):
        raise ConfigError(f"--config {args.config} is not the config of the demo model "
                          f"({_saved_config_file(demo)}); leave out --config, or pass "
                          "--checkpoint with the checkpoint it describes")
      return demo, args.tokenizer, config, f"the bundled demo model ({demo})"
  looked = " and ".join(str(root) for root in checkpoint_roots())
  raise CheckpointError(f"no checkpoint given and none in {looked}; pass --checkpoint DIR "
                        "(a clone of grok_moe has the demo model in checkpoints/demo)")


def print_plan(args) -> int:
  """The memory plan for the flags, from shapes: nothing is loaded (see plan_command)."""
  from grok_moe import checkpoint
  config = config_from_flag(args.config)
  label = args.config
  if config is None:
    path, _, config, description = resolve_checkpoint(args)
    config = config or checkpoint.checkpoint_config(path, None)  # reads config.json only
    label = description
  return plan_command.run(args, config, label)


def _say_warnings_in_one_line(say):
  """A warnings.showwarning that prints `warning: message` (no file, line or source)."""
  def show(message, category, filename, lineno, file=None, line=None):
    say(f"warning: {message}")
  return show


def complete(args) -> int:
  """Loads the model and streams the completion of the prompt; the program proper."""
  import jax
  import grok_moe
  from grok_moe import api

  main_process = jax.process_index() == 0  # the one process that prints

  def say(text: str) -> None:
    if main_process:
      print(text, file=sys.stderr, flush=True)

  def show(text: str) -> None:
    if main_process:
      sys.stdout.write(text)
      sys.stdout.flush()

  prompt = read_prompt(args, say)
  mesh = None
  if args.mesh:
    mesh = grok_moe.make_mesh(*grok_moe.sharding.parse_mesh(args.mesh))
  elif args.num_processes > 1:
    mesh = grok_moe.make_mesh()  # 1 x all devices
  elif args.cpu_devices and jax.default_backend() == "cpu":
    mesh = grok_moe.make_mesh(1, args.cpu_devices,
                              devices=jax.devices("cpu")[:args.cpu_devices])
  checkpoint, tokenizer_path, config, description = resolve_checkpoint(args)
  config = grok_moe.checkpoint_config(checkpoint, config)  # a missing checkpoint stops here
  tokenizer_path = tokenizer_path or api.find_tokenizer(checkpoint)
  if tokenizer_path is None:
    raise grok_moe.TokenizerError(
        f"no {' or '.join(api.TOKENIZER_FILES)} beside {checkpoint}; pass --tokenizer with "
        "the checkpoint's tokenizer")
  tokenizer = grok_moe.tokenizer.open_tokenizer(tokenizer_path)
  messages = [{"role": "user", "content": prompt}]
  chat_template = None
  if args.chat:
    chat_template = api.find_chat_template(checkpoint, tokenizer_path)
    if chat_template is None:
      raise grok_moe.TokenizerError(
          f"--chat: {checkpoint} has no chat template ({grok_moe.chat.NO_TEMPLATE_FILES}); "
          "leave out --chat to complete the prompt as it is")
    # Rendered before loading, so that a template's refusal stops the command first.
    chat_prompt = chat_template.render(messages, add_generation_prompt=True)
  dtype = api.default_dtype(mesh) if args.dtype == "auto" else args.dtype
  settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
  where = "" if mesh is None else (
      f" onto a {mesh.shape['data']}x{mesh.shape['model']} mesh ({args.moe_sharding} "
      f"MoE sharding, {args.num_processes} process(es))")
  say(f"loading {description}{where}")
  start = time.perf_counter()
  model = grok_moe.Model.from_checkpoint(checkpoint, config=config, tokenizer=tokenizer,
                                         dtype=dtype, mesh=mesh,
                                         moe_sharding=args.moe_sharding,
                                         progress=main_process,
                                         compilation_cache=args.compilation_cache,
                                         chat_template=chat_template)
  say(f"loaded in {time.perf_counter() - start:.1f} s")

  with warnings.catch_warnings():
    warnings.showwarning = _say_warnings_in_one_line(say)
    warnings.simplefilter("always", grok_moe.errors.UnknownCharactersWarning)
    # Names the unknown characters before the prompt is echoed.
    model.encode(chat_prompt if args.chat else prompt)
    warnings.simplefilter("ignore", grok_moe.errors.UnknownCharactersWarning)  # stream: again
    if args.chat:
      pieces = model.chat_stream(messages, stop=args.stop, truncate=args.truncate, **settings)
    else:
      show(prompt)
      pieces = model.stream(prompt, stop=args.stop, truncate=args.truncate, **settings)
    for piece in pieces:
      show(piece)
    show("\n")
  stats = model.last_stats
  say(f"{stats.new_tokens} tokens in {stats.total_s:.1f} s ({stats.compile_s:.1f} s "
      f"compiling, {stats.total_s - stats.compile_s:.1f} s running): first token after "
      f"{stats.first_token_s:.1f} s, second after {stats.second_token_s:.1f} s, then "
      f"{stats.decode_tokens_per_s:.1f} tokens/s"
      + ("" if model.compilation_cache is None else
         f"; compilation cache {model.compilation_cache}"))
  return 0


def _run(argv) -> int:
  args = parse_args(argv)
  if args.cpu_devices:
    set_cpu_device_count(args.cpu_devices)
  if args.num_processes > 1:
    start_distributed(args)
  from grok_moe.errors import GrokMoeError
  try:
    return print_plan(args) if args.plan else complete(args)
  except GrokMoeError as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _silence_stdout() -> None:
  """Points stdout at /dev/null, so that Python's flush at exit finds no broken pipe."""
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
  except (OSError, ValueError, AttributeError):
    pass  # stdout is not a file descriptor (captured): nothing is flushed to a pipe


def main(argv: list[str] | None = None) -> int:
  """The exit status of the command `argv` (default: sys.argv[1:])."""
  try:
    return _run(argv)
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  except BrokenPipeError:
    _silence_stdout()
    return EXIT_BROKEN_PIPE

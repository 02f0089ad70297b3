"""Compile time and XLA's per-device memory of every generation program, at Grok-1 size.

  python -m benchmarks.compile [--quick] [--repeats N] [--json PATH]

On 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set here before jax starts), GROK_1 with bfloat16 activations and cache,
batch 1 and an 8192-slot KV cache is compiled from shapes alone by
`grok_moe.compiled_plan.compiled_plan` (persistent compilation cache off) for
these generation settings:

  layers   mesh   MoE      prompt   chunk    programs reported
  8        1x8    tensor   8192     1024     prefill_chunk_1024 (run 8 times), decode_step
  16       1x8    tensor   8192     1024     the same
  64       1x8    tensor   8192     1024     the same
  64       1x8    tensor   512      512      prefill_chunk_512 (its decode step is the one above)
  64       2x4    tensor   8192     1024     prefill_chunk_1024 (run 8 times), decode_step
  64       1x8    expert   8192     1024     the same

Each program is compiled --repeats times (default 3), with jax's in-memory
caches cleared before each compile so that none is served from memory, and
the median is reported; a 1-layer setting is compiled first and not
reported, so that one-time start-up costs do not land on the first row. It
prints one row per program (compile seconds; arguments, temporaries and
peak = arguments + temporaries + outputs - reused, per device, GB = 1e9
bytes; and the seconds compiled_plan spent on the rest, nearly all of it
tracing and lowering the setting's programs, which the compile column leaves
out), then the issue's targets as verdicts, judged on the 1x8 tensor mesh
at the most layers measured:

- the decode step compiles in <= 10 s and a prefill chunk in <= 15 s;
- compiling the most layers takes at most 1.5x as long as the fewest, per
  program (the scan compiles one layer whatever the count);
- an 8192-token prompt needs at most 48 GB a device, arguments plus
  temporaries, in every program.

The 2x4 mesh and expert mode are reported against the same bounds, as
information. 2x4 keeps a whole copy of the model on each of its 2 data rows
(the weights split 4 ways, not 8): about 80 GB of weights a device at 64
layers, so it does not fit an 80 GB device, as expected.

--quick compiles only the 8- and 16-layer settings once each (the targets
are then judged at 16 layers, the ratio as 16 against 8). Results go to
benchmarks/results/compile-latest.json (--json PATH to choose).
"""

from __future__ import annotations

import os

DEVICES = 8
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):  # XLA reads it once, when jax starts
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}={DEVICES}".strip()

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from grok_moe import compiled_plan, sharding
from grok_moe.config import GROK_1, ModelConfig

GB = 1e9
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CACHE_LEN = 8192
LONG_PROMPT = 8192

DECODE_COMPILE_S = 10.0
PREFILL_COMPILE_S = 15.0
LAYER_COMPILE_RATIO = 1.5
LONG_PROMPT_BYTES = 48 * GB


@dataclasses.dataclass(frozen=True)
class Setting:
  """One generation setting: its programs are compiled together by compiled_plan."""

  layers: int
  mesh: tuple[int, int] = (1, 8)
  moe_mode: str = "tensor"
  prompt_len: int = LONG_PROMPT
  prefill_chunk: int = 1024
  only: str = ""          # report only the programs whose name starts with this

  @property
  def main_mesh(self) -> bool:
    """On the mesh the targets are judged on (1x8, tensor mode)."""
    return self.mesh == (1, 8) and self.moe_mode == "tensor"

  @property
  def label(self) -> str:
    return (f"{self.layers} layers, {self.mesh[0]}x{self.mesh[1]} {self.moe_mode}, "
            f"{self.prompt_len}-token prompt in chunks of {self.prefill_chunk}")


FULL = (Setting(8), Setting(16), Setting(64),
        Setting(64, prompt_len=512, prefill_chunk=512, only="prefill_chunk"),
        Setting(64, mesh=(2, 4)), Setting(64, moe_mode="expert"))
QUICK = (Setting(8), Setting(16))
WARM_UP = Setting(1)  # compiled first and not reported


@dataclasses.dataclass(frozen=True)
class Result:
  """A setting's plan, each program's compile_s the median of `compile_times[name]`;
  `lower_s`: the median seconds of everything else compiled_plan did, almost all of it
  tracing and lowering its programs (not in compile_s)."""

  setting: Setting
  plan: compiled_plan.CompiledPlan
  compile_times: dict[str, list[float]]
  lower_s: float


@dataclasses.dataclass(frozen=True)
class Verdict:
  target: str
  measured: str
  passed: bool | None     # None: reported for information, not a target

  @property
  def word(self) -> str:
    return {True: "PASS", False: "FAIL", None: "info"}[self.passed]


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.compile",
      description="Compile every generation program of GROK_1 on 8 forced CPU devices and "
                  "report compile time and XLA's per-device memory against issue 11's targets.")
  parser.add_argument("--quick", action="store_true",
                      help="only the 8- and 16-layer settings on 1x8 (about a minute)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="compiles of each program; the median is reported (default: 3, "
                           "1 with --quick)")
  parser.add_argument("--json", type=pathlib.Path, default=RESULTS / "compile-latest.json",
                      help="write the results here (default: %(default)s)")
  return parser.parse_args(argv)


def measure(settings, config: ModelConfig = GROK_1, *, repeats: int = 1,
            cache_len: int = CACHE_LEN, config_name: str = "grok-1") -> list[Result]:
  """Every setting's programs compiled `repeats` times on its mesh.

  jax keeps compiled programs in memory, and a program compiled again would
  come from there in no time (the 512-token setting's decode step is the
  8192-token one's), so its caches are cleared before every compile.
  """
  results = []
  for setting in settings:
    data, model_size = setting.mesh
    mesh = sharding.make_mesh(data, model_size, devices=jax.devices()[:data * model_size])
    start = time.perf_counter()
    plans, lower_s = [], []
    for _ in range(repeats):
      jax.clear_caches()
      plan_start = time.perf_counter()
      plan = compiled_plan.compiled_plan(
          config.replace(num_layers=setting.layers), mesh, moe_mode=setting.moe_mode,
          batch_size=1, prompt_len=setting.prompt_len, cache_len=cache_len,
          prefill_chunk=setting.prefill_chunk, dtype=jnp.bfloat16, config_name=config_name)
      lower_s.append(time.perf_counter() - plan_start - sum(p.compile_s for p in plan.programs))
      plans.append(plan)
    results.append(summarize(setting, plans, lower_s))
    print(f"  {setting.label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
  return results


def summarize(setting: Setting, plans, lower_s) -> Result:
  """One Result of a setting's repeated CompiledPlans: the first plan's memory (the same
  in every repeat) with each program's median compile time, keeping only the programs
  named `setting.only*`."""
  times = {program.name: [plan.programs[index].compile_s for plan in plans]
           for index, program in enumerate(plans[0].programs)}
  programs = tuple(dataclasses.replace(program, compile_s=statistics.median(times[program.name]))
                   for program in plans[0].programs if program.name.startswith(setting.only))
  return Result(setting, dataclasses.replace(plans[0], programs=programs),
                {program.name: times[program.name] for program in programs},
                statistics.median(lower_s))


def _gb(value: float) -> str:
  return f"{value / GB:.2f} GB"


def format_table(results) -> str:
  """The Markdown table: one row per program of every setting."""
  lines = ["| layers | mesh | MoE | prompt / chunk | program | runs | compile | arguments / device "
           "| temporaries / device | peak / device | trace + lower, whole setting |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for result in results:
    setting = result.setting
    for program in result.plan.programs:
      lines.append(
          f"| {setting.layers} | {setting.mesh[0]}x{setting.mesh[1]} | {setting.moe_mode} "
          f"| {setting.prompt_len} / {setting.prefill_chunk} | {program.name} | {program.runs} "
          f"| {program.compile_s:.1f} s | {_gb(program.argument_bytes)} "
          f"| {_gb(program.temp_bytes)} | {_gb(program.peak_bytes)} | {result.lower_s:.1f} s |")
  return "\n".join(lines)


def _held_bytes(program: compiled_plan.ProgramMemory) -> int:
  """What the memory target counts: arguments plus temporaries."""
  return program.argument_bytes + program.temp_bytes


def _compile_verdict(kind: str, bound: float, pairs, judged: bool) -> list[Verdict]:
  """The slowest compile of the programs named `kind*` in [(setting, plan)] against
  `bound` seconds; `judged` False reports it as information."""
  programs = [(s, p) for s, plan in pairs for p in plan.programs if p.name.startswith(kind)]
  if not programs:
    return []
  setting, slowest = max(programs, key=lambda pair: pair[1].compile_s)
  where = "" if judged else f" on {setting.mesh[0]}x{setting.mesh[1]} {setting.moe_mode}"
  return [Verdict(
      f"{kind} compiles in <= {bound:g} s ({setting.layers} layers{where})",
      f"{slowest.compile_s:.1f} s (slowest of {len(programs)}: "
      + ", ".join(f"{p.name} {p.compile_s:.1f} s" for _, p in programs) + ")",
      slowest.compile_s <= bound if judged else None)]


def _layer_ratio_verdicts(main, fewest: int, most: int) -> list[Verdict]:
  """Per program of the long-prompt settings: compile at `most` layers / at `fewest`."""
  def by_name(layers):
    plans = [p for s, p in main if s.layers == layers and s.prompt_len == LONG_PROMPT]
    return {program.name: program for plan in plans[:1] for program in plan.programs}
  small, large = by_name(fewest), by_name(most)
  out = []
  for name in sorted(small.keys() & large.keys()):
    ratio = large[name].compile_s / small[name].compile_s
    out.append(Verdict(
        f"{name}: compile at {most} layers <= {LAYER_COMPILE_RATIO:g}x at {fewest}",
        f"{large[name].compile_s:.1f} s / {small[name].compile_s:.1f} s = {ratio:.2f}x",
        ratio <= LAYER_COMPILE_RATIO))
  return out


def _memory_verdict(setting: Setting, plan: compiled_plan.CompiledPlan) -> Verdict:
  """A long-prompt setting's largest arguments + temporaries against LONG_PROMPT_BYTES;
  judged on the main mesh only."""
  held = max(_held_bytes(p) for p in plan.programs)
  where = f"{setting.layers} layers on {setting.mesh[0]}x{setting.mesh[1]} {setting.moe_mode}"
  measured = (f"{_gb(held)} (largest of: "
              + ", ".join(f"{p.name} {_gb(_held_bytes(p))}" for p in plan.programs) + ")")
  if setting.mesh[0] > 1:
    measured += (f"; expected over: the {setting.mesh[0]} data rows each hold the whole "
                 f"model, so weights alone are {_gb(plan.weight_bytes)} a device and it "
                 f"{'fits' if plan.fits else 'does not fit'} {plan.device_bytes / GB:g} GB")
  return Verdict(
      f"{LONG_PROMPT}-token prompt: arguments + temporaries <= {LONG_PROMPT_BYTES / GB:g} GB "
      f"a device, every program ({where})",
      measured, held <= LONG_PROMPT_BYTES if setting.main_mesh else None)


def verdicts(results) -> list[Verdict]:
  """The targets (see the module docstring), judged on 1x8 tensor mode at the most layers;
  other meshes' figures against the same bounds, as information."""
  pairs = [(result.setting, result.plan) for result in results]
  main = [(s, p) for s, p in pairs if s.main_mesh]
  most = max(s.layers for s, _ in main)
  fewest = min(s.layers for s, _ in main)
  at_most = [(s, p) for s, p in main if s.layers == most]
  out = (_compile_verdict("decode_step", DECODE_COMPILE_S, at_most, True)
         + _compile_verdict("prefill_chunk", PREFILL_COMPILE_S, at_most, True))
  if most > fewest:
    out += _layer_ratio_verdicts(main, fewest, most)
  out += [_memory_verdict(s, p) for s, p in pairs
          if s.prompt_len == LONG_PROMPT and s.layers == most]
  for setting, plan in pairs:
    if not setting.main_mesh:
      out += (_compile_verdict("decode_step", DECODE_COMPILE_S, [(setting, plan)], False)
              + _compile_verdict("prefill_chunk", PREFILL_COMPILE_S, [(setting, plan)], False))
  return out


def format_verdicts(found) -> str:
  lines = ["| target | measured | verdict |", "| --- | --- | --- |"]
  lines += [f"| {v.target} | {v.measured} | {v.word} |" for v in found]
  return "\n".join(lines)


def _machine() -> dict:
  return {"backend": jax.default_backend(), "devices": jax.device_count(),
          "cpus": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
          "platform": platform.platform(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def to_json(results, found, repeats: int) -> dict:
  return {
      "machine": _machine(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "repeats": repeats,
      "settings": [dict(result.plan.to_json(), label=result.setting.label,
                        compile_s_each=result.compile_times,
                        trace_and_lower_s=result.lower_s) for result in results],
      "verdicts": [dataclasses.asdict(v) for v in found],
  }


def main(argv=None) -> int:
  args = _parse_args(argv)
  if jax.device_count() < DEVICES:
    print(f"error: this benchmark needs {DEVICES} devices, jax has {jax.device_count()}; "
          f"run it without {_DEVICE_FLAG} in XLA_FLAGS, or with it set to {DEVICES}",
          file=sys.stderr)
    return 2
  if args.repeats is not None and args.repeats < 1:
    print(f"error: --repeats must be at least 1, got {args.repeats}", file=sys.stderr)
    return 2
  settings = QUICK if args.quick else FULL
  repeats = args.repeats or (1 if args.quick else 3)
  print(f"compiling {len(settings)} settings of GROK_1 {repeats} times each (bfloat16, batch 1, "
        f"{CACHE_LEN}-slot cache) on {jax.device_count()} {jax.default_backend()} devices, "
        "persistent compilation cache off:", file=sys.stderr)
  measure([WARM_UP])  # XLA's and jax's one-time start-up costs, kept out of the first row
  results = measure(settings, repeats=repeats)
  found = verdicts(results)
  print(format_table(results))
  print()
  print(format_verdicts(found))
  if any(result.setting.mesh[0] > 1 for result in results):
    print("\n2x4 keeps a whole copy of the model on each of its 2 data rows (weights split 4 "
          "ways, not 8), so it does not fit an 80 GB device at 64 layers: expected.")
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(to_json(results, found, repeats), indent=1) + "\n")
  print(f"\nwrote {args.json}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Speed of grok_moe against this machine's own limits (issue 7).

  python -m benchmarks.run [--quick] [--json PATH] [--dtype float32]
                           [--residency int8|bfloat16|float32] [--grok1-width]
                           [--config PRESET] [--only PART[,PART...]]

One run measures, on the BENCH config (or a preset's model with --config;
--grok1-width is --config grok-1) with random int8 weights:

- the machine's limits: read bandwidth (a float32 sum over 1 GiB) and matmul
  FLOP/s (a square matmul in the activation dtype);
- prefill of 256 tokens (batch 1) into a cache;
- decode time per token (batch 1) with 128, 1024 and 4096 tokens cached;
- one MoE layer on 1024 tokens, sparse against all experts computed densely;
- generated tokens/s for batches of 1, 4 and 16 (prefill included);
- bytes of weights on the device and the peak RSS of the process;

then checks the issue's targets as ratios within the same run, prints a table
and writes JSON. `--only` measures the limits and the named parts alone (see PARTS). Every time is the median of repeated calls after a first
(compiling) call, with inputs rotated between calls. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import counts, limits, process_memory
from grok_moe import params as param_table
from grok_moe import moe, native, quant, random_weights, sampling, sharded_ops, sharding
from grok_moe.config import BENCH, PRESETS, ModelConfig
from grok_moe.kv_cache import KVCache

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 16
# Tokens a generation leaves room for after the prompt; sizes the cache of
# the prefill and decode measurements as the sampler sizes it.
NEW_TOKENS = 64
GIB = 1 << 30

# Targets on the 2-core CPU (issue 7), as (name, measured ratio key, bound).
TARGETS = (
    ("prefill / FLOP limit", "prefill_vs_flop_limit", 2.0),
    ("decode / bandwidth limit", "decode_vs_bandwidth_limit", 3.0),
    ("decode at the longest / at the shortest cache", "decode_longest_vs_shortest", 1.5),
    ("sparse MoE / dense MoE", "moe_sparse_vs_dense", 0.35),
    ("many-experts MoE / FLOP limit of its active work", "many_experts_vs_flop_limit", 1.5),
)

# One MoE layer of Qwen3-30B-A3B's shape (issue 14): 128 experts, 8 chosen, expert FFN
# 768 at width 2048, here at half the width (1024, FFN 384) to fit the 2-core machine's
# time; int8 weights with per-channel scales, SiLU experts, renormalised routing.
MANY_EXPERTS = (128, 8, 1024, 384)  # experts, chosen, width, expert FFN

# The measurements one run makes after the limits, in order (--only chooses some).
PARTS = ("prefill", "decode", "moe", "many-experts", "generate")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures; the defaults are the issue's sizes."""
  config: ModelConfig
  dtype: str
  residency: str = "int8"
  repeats: int = 20
  bandwidth_bytes: int = GIB
  matmul_size: int = 2048
  prefill_tokens: int = 256
  decode_cache_lengths: tuple[int, ...] = (128, 1024, 4096)
  moe_tokens: int = 1024
  generate_batches: tuple[int, ...] = (1, 4, 16)
  generate_new_tokens: int = NEW_TOKENS
  peak_bandwidth: float | None = None   # bytes/s from a data sheet, for utilisation
  peak_flops: float | None = None       # FLOP/s from a data sheet, for utilisation
  many_experts: tuple[int, int, int, int] = MANY_EXPERTS  # the many-experts MoE layer
  mesh: tuple[int, int] | None = None   # (data, model): run on a mesh of devices
  parts: tuple[str, ...] = PARTS        # what to measure after the limits


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.run",
      description="Measure grok_moe's prefill, decode, MoE and generation speed against "
                  "this machine's measured read bandwidth and matmul FLOP/s, check the "
                  "issue-7 targets, print a table and write JSON.")
  parser.add_argument("--quick", action="store_true",
                      help="fewer repeats and smaller limit measurements (a smoke run; "
                           "figures are noisier)")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="where to write the results (default: benchmarks/results/"
                           "latest.json for the default settings, latest-<variant>.json "
                           "otherwise, e.g. latest-weights-float32.json)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="activation dtype (default: float32 on CPU, where XLA's "
                           "bfloat16 arithmetic is slow; bfloat16 on GPU and TPU)")
  parser.add_argument("--residency", choices=quant.RESIDENCIES, default="int8",
                      help="how weights are held on the device (default: int8, the "
                           "release's format; see quant.with_residency)")
  parser.add_argument("--grok1-width", action="store_true",
                      help="Grok-1's widths (emb 6144, 8 experts, FFN 32768, vocab "
                           "131072) with --layers layers, instead of BENCH; meant for a "
                           "GPU, and reports bandwidth and FLOP utilisation")
  parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                      help="measure a preset's model (any family: grok-2, mixtral-8x7b, "
                           "qwen3-30b-a3b, ...) with --layers layers, instead of BENCH; "
                           "--grok1-width is --config grok-1")
  parser.add_argument("--layers", type=int, default=None,
                      help="decoder layers (default: BENCH's 4, or 2 with --config or "
                           "--grok1-width)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per measurement (default: 20, or 5 with --quick)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
  parser.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB_PER_S",
                      help="the device's nominal memory bandwidth in GB/s (e.g. 3350 for an "
                           "H100 SXM): also report decode's bandwidth utilisation against it")
  parser.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOP_PER_S",
                      help="the device's nominal dense FLOP/s in TFLOP/s for --dtype (e.g. "
                           "989 for an H100 SXM in bfloat16): also report prefill's FLOP "
                           "utilisation against it")
  parser.add_argument("--mesh", metavar="DATAxMODEL", default=None,
                      help="run the model on a mesh of devices (tensor-sharded experts), "
                           "as run.py --mesh does. On a CPU, "
                           "XLA_FLAGS=--xla_force_host_platform_device_count=2 with "
                           "--mesh 1x2 runs one device a core")
  parser.add_argument("--only", type=_parts, default=PARTS, metavar="PART[,PART...]",
                      help="measure the limits and only these parts, of "
                           f"{', '.join(PARTS)} (default: all); e.g. --only "
                           "moe,many-experts")
  return parser.parse_args(argv)


def _parts(text: str) -> tuple[str, ...]:
  """--only's value: known part names, in the run's order."""
  names = [name.strip() for name in text.split(",") if name.strip()]
  unknown = [name for name in names if name not in PARTS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
        f"unknown part {', '.join(unknown) or repr(text)}; known: {', '.join(PARTS)}")
  return tuple(part for part in PARTS if part in names)


def _settings(args) -> Settings:
  backend = jax.default_backend()
  dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  preset = "grok-1" if args.grok1_width else args.config
  if args.grok1_width and args.config not in (None, "grok-1"):
    raise SystemExit(f"error: --grok1-width is --config grok-1; drop one of it and "
                     f"--config {args.config}")
  base = PRESETS[preset] if preset else BENCH
  layers = args.layers or (2 if preset else BENCH.num_layers)
  # Room for the longest decode measurement: a cache of 4096 tokens plus new ones.
  config = base.replace(num_layers=layers, sequence_len=8192)
  repeats = args.repeats or (5 if args.quick else 20)
  on_cpu = backend == "cpu"
  return Settings(
      config=config, dtype=dtype, residency=args.residency, repeats=repeats,
      bandwidth_bytes=(GIB // 4 if args.quick else GIB) * (1 if on_cpu else 4),
      matmul_size=(1024 if args.quick else 2048) * (1 if on_cpu else 4),
      generate_new_tokens=16 if args.quick else NEW_TOKENS,
      peak_bandwidth=args.peak_bandwidth and args.peak_bandwidth * 1e9,
      peak_flops=args.peak_tflops and args.peak_tflops * 1e12,
      mesh=sharding.parse_mesh(args.mesh) if args.mesh else None, parts=args.only)


# --- Measurements. ---

def _tokens(rng: np.random.Generator, config: ModelConfig, shape) -> np.ndarray:
  """Random non-special token ids."""
  return rng.integers(3, config.vocab_size, size=shape).astype(np.int32)


def _greedy(config: ModelConfig):
  """The sampler's settings (temperature, top_p, top_k, vocab_limit) for greedy decoding."""
  return jax.block_until_ready(
      (jnp.float32(0.0), jnp.float32(1.0), jnp.int32(0), jnp.int32(config.vocab_size)))


def _filled_cache(config: ModelConfig, batch: int, length: int, capacity: int, dtype,
                  key) -> KVCache:
  """A cache of `capacity` slots whose first `length` hold random keys and values."""
  shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.key_size)
  filled = (jnp.arange(capacity) < length)[None, :, None, None]
  keys_key, values_key = jax.random.split(key)
  keys = jnp.where(filled, jax.random.normal(keys_key, shape, jnp.float32), 0).astype(dtype)
  values = jnp.where(filled, jax.random.normal(values_key, shape, jnp.float32), 0).astype(dtype)
  valid = jnp.broadcast_to(jnp.arange(capacity) < length, (batch, capacity))
  return jax.block_until_ready(KVCache(keys=keys, values=values, valid=valid,
                                       lengths=jnp.full((batch,), length, jnp.int32)))


def _placer(plan):
  """Puts host values where the jitted steps want them: replicated on the plan's mesh."""
  return (lambda tree: tree) if plan is None else plan.put


def measure_prefill(params, settings: Settings, rng, plan=None) -> dict:
  """Seconds to prefill settings.prefill_tokens tokens (batch 1) into a cache, sampling included."""
  config, dtype = settings.config, settings.dtype
  put = _placer(plan)
  capacity = sampling.bucket(settings.prefill_tokens + NEW_TOKENS, config.sequence_len)
  last = put(jnp.asarray([settings.prefill_tokens - 1], jnp.int32))
  last_logits = put(jnp.zeros((1, config.vocab_size), jnp.float32))
  valid, first = put(jnp.ones((1, settings.prefill_tokens), bool)), put(jnp.int32(0))
  prompts = [put(_tokens(rng, config, (1, settings.prefill_tokens))) for _ in range(3)]
  settings_greedy = put(_greedy(config))
  keys = [put(jax.random.PRNGKey(i)) for i in range(settings.repeats + 1)]
  times = []
  for i in range(settings.repeats + 1):  # call 0 compiles
    cache = jax.block_until_ready(
        sampling.init_cache(config, 1, capacity, dtype) if plan is None
        else plan.init_cache(1, capacity, dtype))
    start = time.perf_counter()
    jax.block_until_ready(sampling._prefill_chunk_jit(
        params, prompts[i % 3], valid, first, cache, last, last_logits, keys[i],
        settings_greedy, config=config, dtype=dtype, sharding=plan))
    times.append(time.perf_counter() - start)
  times = times[1:]
  return {"tokens": settings.prefill_tokens, "cache_capacity": capacity,
          "seconds": statistics.median(times), "times": times}


def measure_decode(params, settings: Settings, length: int, rng, plan=None) -> dict:
  """Seconds per decoded token (batch 1, sampling included) with `length` tokens cached.

  The cache holds capacity = the sampler's bucket for length + NEW_TOKENS
  slots, as generation would size it; each timed step appends one token.
  """
  config, dtype = settings.config, settings.dtype
  capacity = sampling.bucket(length + NEW_TOKENS, config.sequence_len)
  put = _placer(plan)
  cache = _filled_cache(config, 1, length, capacity, dtype, jax.random.PRNGKey(length))
  if plan is not None:
    cache = plan.shard_cache(cache)
  steps = [put(jnp.asarray(_tokens(rng, config, (1,)))) for _ in range(settings.repeats + 1)]
  keys = [put(jax.random.PRNGKey(i)) for i in range(settings.repeats + 1)]
  settings_greedy = put(_greedy(config))
  valid = put(jnp.ones((1,), bool))
  times = []
  for i, tokens in enumerate(steps):  # step 0 compiles
    start = time.perf_counter()
    next_tokens, _, _, cache = sampling._decode_step_jit(
        params, tokens, valid, cache, keys[i], settings_greedy, config=config, dtype=dtype,
        sharding=plan)
    jax.block_until_ready((next_tokens, cache))
    times.append(time.perf_counter() - start)
  times = times[1:]
  return {"cached_tokens": length, "cache_capacity": capacity,
          "seconds": statistics.median(times), "times": times,
          "cache_bytes_read": counts.cache_bytes_read(config, length, dtype)}


_sparse_moe = jax.jit(moe.sparse_moe, static_argnames=("tile_size", "activation"))
_dense_moe = jax.jit(moe.dense_moe, static_argnames="activation")


def measure_moe(params, settings: Settings, rng, plan=None) -> dict:
  """One MoE layer (layer 0's weights) on settings.moe_tokens tokens: sparse and dense seconds.

  On a mesh the sparse MoE is the plan's shard_map one, and the dense one is
  left to XLA's partitioner (its weights are placed by the plan).
  """
  config, dtype = settings.config, settings.dtype
  flat = param_table.flatten(params)
  expert_params = (param_table.EXPERT_IN, param_table.EXPERT_GATE, param_table.EXPERT_OUT)
  weights = [quant.take(flat[spec.path], 0) for spec in expert_params]  # layer 0 [E, ...]
  router = flat[param_table.ROUTER.path][0]
  inputs = []
  for _ in range(3):
    x = jnp.asarray(rng.standard_normal((settings.moe_tokens, config.emb_size), np.float32)).astype(dtype)
    gates, indices = moe.route(x, router, config.num_selected_experts,
                               config.router_renormalize, config.router_logit_cap)
    inputs.append((x, gates, indices, *weights))
  if plan is None:
    sparse_moe = functools.partial(_sparse_moe, activation=config.expert_activation)
  else:  # the model's sharded dispatch, on layer 0 of a one-layer stack
    weights = [plan.place(spec.path, jax.tree.map(lambda a: a[None], w))
               for spec, w in zip(expert_params, weights)]
    inputs = [(*args[:3], *weights) for args in inputs]
    sparse_moe = jax.jit(lambda x, g, i, *w: sharded_ops.sparse_moe(
        x, g, i, *w, expert_params, plan, layer=jnp.int32(0),
        activation=config.expert_activation))
  if plan is not None:
    inputs = [(*plan.put(list(args[:3])), *args[3:]) for args in inputs]
  sparse, sparse_times = limits.median_seconds(sparse_moe, inputs, settings.repeats)
  dense_inputs = [(*args[:3], *(jax.tree.map(lambda a: a[0], w) if plan is not None else w
                                for w in args[3:])) for args in inputs]
  dense_moe = functools.partial(_dense_moe, activation=config.expert_activation)
  dense, dense_times = limits.median_seconds(dense_moe, dense_inputs,
                                             max(3, settings.repeats // 2))
  counts_per_expert = np.bincount(np.asarray(inputs[0][2]).ravel(), minlength=config.num_experts)
  return {"tokens": settings.moe_tokens, "sparse_seconds": sparse, "dense_seconds": dense,
          "sparse_times": sparse_times, "dense_times": dense_times,
          "tokens_per_expert": counts_per_expert.tolist()}


def measure_many_experts(settings: Settings, rng) -> dict:
  """One MoE layer of MANY_EXPERTS' shape: sparse seconds on settings.moe_tokens tokens and
  on one token (decode), with the FLOPs of the active work and the weight bytes one token
  reads (its k experts' int8 weights and scales).

  The tokens' time is measured in rounds with the FLOP limit's matmul
  (`limits.seconds_at_flop_limit`): "flop_limit_ratio" is the median of the
  rounds' ratios, each against the limit measured just before it.
  """
  num_experts, k, width, ffn = settings.many_experts
  shape = dict(experts=num_experts, k=k, width=width, ffn=ffn)
  key = jax.random.PRNGKey(7)

  weights = jax.block_until_ready([  # per-channel scales
      random_weights.quantized(jax.random.fold_in(key, index), (num_experts, rows, cols))
      for index, (rows, cols) in enumerate(((width, ffn), (width, ffn), (ffn, width)))])
  router = jax.random.normal(jax.random.fold_in(key, 3), (width, num_experts)) / math.sqrt(width)
  dtype = settings.dtype

  def inputs(tokens):
    rows = []
    for _ in range(3):
      x = jnp.asarray(rng.standard_normal((tokens, width), np.float32)).astype(dtype)
      gates, indices = moe.route(x, router, k, renormalize=True)
      rows.append((x, gates, indices, *weights))
    return rows

  run = jax.jit(functools.partial(moe.sparse_moe, activation="silu"))
  active_flops = 2 * settings.moe_tokens * k * 3 * width * ffn
  prefill = limits.seconds_at_flop_limit(run, inputs(settings.moe_tokens), active_flops,
                                         settings.matmul_size, dtype, settings.repeats)
  decode, decode_times = limits.median_seconds(run, inputs(1), settings.repeats)
  expert_bytes = sum(w.nbytes for w in weights) // num_experts
  return {"shape": shape, "tokens": settings.moe_tokens, "sparse_seconds": prefill["seconds"],
          "sparse_times": prefill["times"], "flop_limit_ratio": prefill["ratio"],
          "flop_limit_ratios": prefill["ratios"], "paired_flops_per_s": prefill["flops_per_s"],
          "paired_matmul_times": prefill["matmul_times"],
          "decode_seconds": decode, "decode_times": decode_times,
          "active_flops": active_flops, "decode_bytes": k * expert_bytes}


def measure_generate(params, settings: Settings, batch: int, rng, plan=None) -> dict:
  """Generated tokens/s of sampling.generate (greedy; prefill and every step included)."""
  config = settings.config
  new_tokens = settings.generate_new_tokens
  sampling_config = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)

  def run(prompts):
    generated = 0
    for step in sampling.generate(params, config, prompts, sampling_config,
                                  dtype=settings.dtype, sharding=plan):
      generated += int(step.active.sum())
    return generated

  run(_tokens(rng, config, (batch, PROMPT_TOKENS)).tolist())  # compiles
  times, generated = [], []
  for _ in range(max(2, settings.repeats // 5)):
    prompts = _tokens(rng, config, (batch, PROMPT_TOKENS)).tolist()
    start = time.perf_counter()
    generated.append(run(prompts))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"batch": batch, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens,
          "seconds": seconds, "times": times, "generated": generated,
          "tokens_per_s": statistics.median(generated) / seconds}


def _peak_rss_bytes() -> int:
  peak = process_memory.status_bytes("VmHWM")
  return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bytes_per_device(params) -> int:
  """Bytes of params one device holds (all of them on one device; its shards on a mesh)."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))


def _device_memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {key: stats[key] for key in ("bytes_in_use", "peak_bytes_in_use") if key in stats}


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine() -> dict:
  device = jax.devices()[0]
  on_cpu = jax.default_backend() == "cpu"
  return {"backend": jax.default_backend(), "device": device.device_kind,
          "devices": jax.device_count(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
          "python": platform.python_version(), "platform": platform.platform(),
          # The CPU's int8 matmuls: the native kernel, or XLA's path and why.
          "native_int8": (native.available() if on_cpu else None),
          "native_int8_off_because": native.unavailable_reason() if on_cpu else None}


# --- The run. ---

def run(settings: Settings, log=print, seed: int = 0) -> dict:
  """Every measurement of one run, its ratios and its targets, as a JSON-ready dict."""
  config = settings.config
  rng = np.random.default_rng(seed)
  results: dict = {"machine": machine(), "config": config.to_dict(),
                   "settings": {key: value for key, value in dataclasses.asdict(settings).items()
                                if key != "config"}}

  log(f"limits: read bandwidth over {settings.bandwidth_bytes / GIB:.2f} GiB ...")
  bandwidth = limits.read_bandwidth(settings.bandwidth_bytes, settings.repeats)
  log(f"limits: {settings.matmul_size}^3 {settings.dtype} matmul ...")
  flops = limits.matmul_flops(settings.matmul_size, settings.dtype, settings.repeats)
  results["limits"] = {"read_bandwidth": bandwidth, "matmul": flops}
  # The limits' arrays are gone: from here the peak RSS is the model's.
  peak_reset = process_memory.reset_peak_rss()
  rss_before_weights = process_memory.status_bytes("VmRSS")

  parts, params, plan = settings.parts, None, None
  if set(parts) - {"many-experts"}:  # the many-experts layer makes weights of its own
    log("weights ...")
    int8_params = random_weights.release_params(config, seed)
    int8_bytes_per_token = counts.bytes_per_token(int8_params, config)
    params = jax.block_until_ready(quant.with_residency(int8_params, settings.residency))
    del int8_params
    if settings.mesh is not None:
      data, model = settings.mesh
      mesh = sharding.make_mesh(data, model, devices=jax.devices()[:data * model])
      plan = sharding.ShardingPlan(config, mesh, "tensor")
      params = plan.shard_params(params)
    results["counts"] = {
        "active_parameters": counts.active_parameters(config),
        "bytes_per_token_int8": int8_bytes_per_token,
        "bytes_per_token_resident": counts.bytes_per_token(params, config),
        "weight_bytes": counts.weight_bytes(params)}

  if "prefill" in parts:
    log(f"prefill {settings.prefill_tokens} tokens ...")
    results["prefill"] = measure_prefill(params, settings, rng, plan)
  if "decode" in parts:
    results["decode"] = []
    for length in settings.decode_cache_lengths:
      log(f"decode with {length} cached tokens ...")
      results["decode"].append(measure_decode(params, settings, length, rng, plan))
  if "moe" in parts:
    log(f"MoE layer on {settings.moe_tokens} tokens ...")
    results["moe"] = measure_moe(params, settings, rng, plan)
  if "many-experts" in parts:
    log(f"MoE layer of {settings.many_experts[0]} experts on {settings.moe_tokens} tokens ...")
    results["many_experts"] = measure_many_experts(settings, rng)
  if "generate" in parts:
    results["generate"] = []
    for batch in settings.generate_batches:
      log(f"generate, batch {batch} ...")
      results["generate"].append(measure_generate(params, settings, batch, rng, plan))
  if params is not None:
    results["memory"] = {"weight_bytes": counts.weight_bytes(params),
                         "weight_bytes_per_device": _bytes_per_device(params),
                         "rss_before_weights_bytes": rss_before_weights,
                         "peak_rss_bytes": _peak_rss_bytes(),
                         "peak_rss_excludes_limits": peak_reset, **_device_memory()}
  results["ratios"] = ratios(results, settings)
  results["targets"] = check_targets(results)
  return results


def ratios(results: dict, settings: Settings) -> dict:
  """Measured time over the time at the machine's limit, and utilisations (their inverses),
  for the parts the run measured."""
  flop_per_s = results["limits"]["matmul"]["flops_per_s"]
  bytes_per_s = results["limits"]["read_bandwidth"]["bytes_per_s"]
  out = {}
  if "prefill" in results:
    prefill = results["prefill"]
    # Every prompt token goes through the layers; the output projection runs for the
    # last one only (batch 1: the logits the sampler needs).
    active = results["counts"]["active_parameters"]
    prefill_flops = 2 * ((active["total"] - active["output_projection"]) * prefill["tokens"]
                         + active["output_projection"])
    prefill_limit = prefill_flops / flop_per_s
    out.update({
        "prefill_flop_limit_seconds": prefill_limit,
        "prefill_vs_flop_limit": prefill["seconds"] / prefill_limit,
        "model_flop_utilisation_prefill": prefill_limit / prefill["seconds"]})
    if settings.peak_flops:
      out["model_flop_utilisation_prefill_nominal"] = (
          prefill_flops / settings.peak_flops / prefill["seconds"])
  if "decode" in results:
    decode = {d["cached_tokens"]: d["seconds"] for d in results["decode"]}
    shortest, longest = min(decode), max(decode)
    token_bytes = results["counts"]["bytes_per_token_int8"]["total"]
    decode_limit = token_bytes / bytes_per_s
    resident_limit = results["counts"]["bytes_per_token_resident"]["total"] / bytes_per_s
    out.update({
        "decode_bandwidth_limit_seconds": decode_limit,
        "decode_vs_bandwidth_limit": decode[shortest] / decode_limit,
        "decode_vs_resident_bandwidth_limit": decode[shortest] / resident_limit,
        "bandwidth_utilisation_decode": decode_limit / decode[shortest],
        "decode_longest_vs_shortest": decode[longest] / decode[shortest]})
    if settings.peak_bandwidth:
      out["bandwidth_utilisation_decode_nominal"] = (
          token_bytes / settings.peak_bandwidth / decode[shortest])
  if "moe" in results:
    out["moe_sparse_vs_dense"] = (results["moe"]["sparse_seconds"]
                                  / results["moe"]["dense_seconds"])
  if "many_experts" in results:
    many = results["many_experts"]
    # Against the limit measured beside it (measure_many_experts); against the run's
    # limit, measured minutes earlier, for comparison with earlier runs.
    out["many_experts_vs_flop_limit"] = many["flop_limit_ratio"]
    out["many_experts_vs_run_flop_limit"] = (many["sparse_seconds"]
                                             / (many["active_flops"] / flop_per_s))
    out["many_experts_decode_vs_bandwidth_limit"] = (many["decode_seconds"]
                                                     / (many["decode_bytes"] / bytes_per_s))
  return out


def check_targets(results: dict) -> list[dict]:
  """The issue's targets (set for the 2-core CPU) of the parts measured: PASS/FAIL there,
  "info" elsewhere."""
  on_cpu = results["machine"]["backend"] == "cpu"
  checks = []
  for name, key, bound in TARGETS:
    if key not in results["ratios"]:
      continue
    if key == "decode_longest_vs_shortest":
      decode = [d["cached_tokens"] for d in results["decode"]]
      name = f"decode at {max(decode)} / at {min(decode)} cached"
    value = results["ratios"][key]
    verdict = ("PASS" if value <= bound else "FAIL") if on_cpu else "info"
    checks.append({"target": name, "ratio": value, "bound": bound, "verdict": verdict})
  return checks


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.1f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def _native_note(machine_info: dict) -> str:
  """How the CPU's int8 matmuls ran: the native kernel or XLA (and why); nothing off CPU."""
  if machine_info.get("native_int8") is None:
    return ""
  if machine_info["native_int8"]:
    return "; int8 matmuls in the native kernel"
  return f"; int8 matmuls in XLA ({machine_info['native_int8_off_because']})"


def table(results: dict) -> str:
  """The results as Markdown: one table of figures, one of the targets."""
  m, lim, r = results["machine"], results["limits"], results["ratios"]
  cfg, run_settings = results["config"], results["settings"]
  rows = [
      ("machine", f"{m['cpu']}, {m['cpus']} CPUs; {m['backend']} ({m['device']}); jax {m['jax']}"
                  + _native_note(m)),
      ("model", f"D {cfg['emb_size']}, F {ModelConfig.from_dict(cfg).ffn_size}, "
                f"{cfg['num_layers']} layers, {cfg['num_experts']} experts (top "
                f"{cfg['num_selected_experts']}), vocab {cfg['vocab_size']}; activations "
                f"{run_settings['dtype']}, weights held as {run_settings['residency']}"
                + ("" if not run_settings.get("mesh") else
                   "; on a {}x{} mesh (tensor-sharded)".format(*run_settings["mesh"]))),
      ("read bandwidth (limit)", f"{lim['read_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s"),
      (f"matmul {lim['matmul']['dtype']} (limit)",
       f"{lim['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s"),
  ]
  if "counts" in results:
    c = results["counts"]
    rows += [
        ("active parameters / token", f"{c['active_parameters']['total'] / 1e6:.2f} M"),
        ("weight bytes read / decoded token",
         f"{c['bytes_per_token_int8']['total'] / 1e6:.2f} MB as int8"
         + ("" if run_settings["residency"] == "int8" else
            f", {c['bytes_per_token_resident']['total'] / 1e6:.2f} MB as held"))]
  if "prefill" in results:
    rows.append((f"prefill {results['prefill']['tokens']} tokens",
                 f"{_ms(results['prefill']['seconds'])} (at the FLOP limit "
                 f"{_ms(r['prefill_flop_limit_seconds'])}; MFU "
                 f"{100 * r['model_flop_utilisation_prefill']:.0f}%)"))
  if "decode" in results:
    for d in results["decode"]:
      rows.append((f"decode / token, {d['cached_tokens']} cached",
                   f"{_ms(d['seconds'])} (cache of {d['cache_capacity']} slots)"))
    rows.append(("decode at the bandwidth limit",
                 f"{_ms(r['decode_bandwidth_limit_seconds'])} / token (MBU "
                 f"{100 * r['bandwidth_utilisation_decode']:.0f}% at "
                 f"{min(d['cached_tokens'] for d in results['decode'])} cached)"))
  if "moe" in results:
    moe_result = results["moe"]
    rows.append((f"MoE layer, {moe_result['tokens']} tokens",
                 f"sparse {_ms(moe_result['sparse_seconds'])}, "
                 f"all {cfg['num_experts']} experts dense {_ms(moe_result['dense_seconds'])}"))
  if "many_experts" in results:
    many = results["many_experts"]
    rows.append((f"MoE layer, {many['shape']['experts']} experts (top {many['shape']['k']}), "
                 f"{many['tokens']} tokens",
                 f"sparse {_ms(many['sparse_seconds'])} ({r['many_experts_vs_flop_limit']:.2f}x "
                 f"the FLOP limit of its active work measured beside it, "
                 f"{r['many_experts_vs_run_flop_limit']:.2f}x the run's); "
                 f"1 token {_ms(many['decode_seconds'])} "
                 f"({r['many_experts_decode_vs_bandwidth_limit']:.1f}x its bandwidth limit)"))
  for g in results.get("generate", []):
    rows.append((f"generate, batch {g['batch']}",
                 f"{g['tokens_per_s']:.0f} tokens/s ({g['prompt_tokens']}-token prompts, "
                 f"{g['new_tokens']} new, prefill included)"))
  if "memory" in results:
    mem = results["memory"]
    rows.append(("weights on device", f"{mem['weight_bytes'] / 1e6:.1f} MB"
                 + ("" if mem["weight_bytes_per_device"] == mem["weight_bytes"] else
                    f" ({mem['weight_bytes_per_device'] / 1e6:.1f} MB a device)")))
    rows.append(("peak RSS", f"{mem['peak_rss_bytes'] / 1e6:.0f} MB"
                 + ("" if mem["peak_rss_excludes_limits"] else " (includes the limits' arrays)")))
    if "peak_bytes_in_use" in mem:
      rows.append(("peak device memory", f"{mem['peak_bytes_in_use'] / 1e9:.2f} GB"))
  for key, label in (("bandwidth_utilisation_decode_nominal", "decode MBU, nominal peak"),
                     ("model_flop_utilisation_prefill_nominal", "prefill MFU, nominal peak")):
    if key in r:
      rows.append((label, f"{100 * r[key]:.1f}%"))
  lines = ["| measure | value |", "| --- | --- |"]
  lines += [f"| {name} | {value} |" for name, value in rows]
  lines += ["", "| target (2-core CPU) | ratio | bound | verdict |", "| --- | --- | --- | --- |"]
  lines += [f"| {t['target']} | {t['ratio']:.2f} | <= {t['bound']} | {t['verdict']} |"
            for t in results["targets"]]
  return "\n".join(lines)


def _default_json(args, settings: Settings) -> pathlib.Path:
  variant = []
  if args.grok1_width:
    variant.append("grok1-width")
  elif args.config:
    variant.append(args.config)
  if settings.residency != "int8":
    variant.append(f"weights-{settings.residency}")
  if args.dtype and args.dtype != ("float32" if jax.default_backend() == "cpu" else "bfloat16"):
    variant.append(f"act-{args.dtype}")
  if settings.mesh is not None:
    variant.append("mesh-{}x{}".format(*settings.mesh))
  if settings.parts != PARTS:
    variant.append("only-" + "-".join(settings.parts))
  if args.quick:
    variant.append("quick")
  return RESULTS_DIR / ("-".join(["latest", *variant]) + ".json")


def main(argv=None) -> None:
  args = _parse_args(argv)
  settings = _settings(args)
  results = run(settings, log=lambda message: print(message, file=sys.stderr, flush=True),
                seed=args.seed)
  print(table(results))
  path = args.json or _default_json(args, settings)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1) + "\n")
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

"""A memory plan that XLA confirms: compile every program generation runs, from shapes alone.

Generating with a prompt of P tokens and a cache of S slots on a mesh runs
two kinds of program (`grok_moe.sampling`):

    prefill_chunk_C   C = the prefill chunk for P (`sampling.prefill_shapes`),
                      run once per chunk;
    decode_step       one token per row, run once per new token.

`compiled_plan` lowers each with ShapeDtypeStructs in the plan's shardings
(the release's int8 weights, the KV cache, the small inputs), compiles it
with the persistent compilation cache off (so the times are real) and reads
`compiled.memory_analysis()`: per device, the bytes of the arguments, the
temporaries XLA allocates, the outputs, and the outputs that reuse a donated
argument's buffer (the cache). A program's peak is arguments + temporaries +
outputs - reused; the plan's peak is the largest, and it fits when that is
at most the device's memory.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grok_moe import compilation, memory, sampling
from grok_moe.config import ModelConfig
from grok_moe.sharding import ShardingPlan

GB = memory.GB


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """What XLA reports for one compiled program, per device."""

  name: str
  runs: int              # times generation runs it
  compile_s: float
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int       # outputs that reuse a donated argument's buffer

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
  """The programs of one generation setting on one mesh, compiled; see the module docstring."""

  config_name: str
  num_layers: int
  mesh_shape: tuple[int, int]
  moe_mode: str
  batch_size: int
  prompt_len: int
  cache_len: int
  prefill_chunk: int
  dtype: str
  device_bytes: float
  programs: tuple[ProgramMemory, ...]
  weight_bytes: int      # the analytic plan's weights per device, for comparison

  @property
  def peak_bytes(self) -> int:
    return max(program.peak_bytes for program in self.programs)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.device_bytes

  def to_json(self) -> dict:
    return {
        "config": self.config_name, "num_layers": self.num_layers,
        "mesh": "{}x{}".format(*self.mesh_shape), "moe_sharding": self.moe_mode,
        "batch": self.batch_size, "prompt_len": self.prompt_len, "cache_len": self.cache_len,
        "prefill_chunk": self.prefill_chunk, "dtype": self.dtype,
        "programs": [dict(dataclasses.asdict(program), peak_bytes=program.peak_bytes)
                     for program in self.programs],
        "weight_bytes": self.weight_bytes, "peak_bytes": self.peak_bytes,
        "device_memory_bytes": self.device_bytes, "fits": self.fits,
    }

  def format(self) -> str:
    data, model_size = self.mesh_shape
    lines = [
        f"compiled memory plan: {self.config_name} ({self.num_layers} layers) on a "
        f"{data}x{model_size} mesh, MoE sharding {self.moe_mode}; batch {self.batch_size}, "
        f"prompt {self.prompt_len} tokens in chunks of {self.prefill_chunk}, KV cache "
        f"{self.cache_len} tokens, {self.dtype} activations",
        "per device, as XLA reports it (GB = 1e9 bytes):",
        f"  {'program':<22}{'runs':>6}{'compile':>10}{'arguments':>12}{'temporaries':>13}"
        f"{'outputs':>10}{'reused':>9}{'peak':>9}",
    ]
    for p in self.programs:
      lines.append(
          f"  {p.name:<22}{p.runs:>6}{p.compile_s:>9.1f}s{p.argument_bytes / GB:>12.2f}"
          f"{p.temp_bytes / GB:>13.2f}{p.output_bytes / GB:>10.2f}{p.alias_bytes / GB:>9.2f}"
          f"{p.peak_bytes / GB:>9.2f}")
    verdict = "fits" if self.fits else "does NOT fit"
    lines.append(f"peak {self.peak_bytes / GB:.2f} GB a device (weights {self.weight_bytes / GB:.2f}"
                 f" GB of it): {verdict} {data * model_size} x {self.device_bytes / GB:g} GB")
    return "\n".join(lines)


def _abstract(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def lower_programs(plan: ShardingPlan, batch_size: int, prompt_len: int, cache_len: int,
                   prefill_chunk: int = sampling.DEFAULT_PREFILL_CHUNK, dtype=jnp.bfloat16):
  """[(name, runs, lowered)] of the programs generating with these sizes runs, lowered
  from shapes alone (weights as the release stores them)."""
  config = plan.config
  dtype = jnp.dtype(dtype).name
  params = memory.release_abstract_params(config, plan)
  cache = memory.abstract_cache(plan, batch_size, cache_len, dtype)
  rows = plan.batch_axis(batch_size)
  batch = lambda *rest: plan.sharding(P(rows, *([None] * len(rest))))  # noqa: E731
  replicated = plan.sharding(P())
  key = _abstract((2,), jnp.uint32, replicated)
  settings = (_abstract((), jnp.float32, replicated), _abstract((), jnp.float32, replicated),
              _abstract((), jnp.int32, replicated), _abstract((), jnp.int32, replicated))
  chunk, num_chunks = sampling.prefill_shapes(prompt_len, config, prefill_chunk)
  static = dict(config=config, dtype=dtype, sharding=plan)
  prefill = sampling._prefill_chunk_jit.lower(  # pylint: disable=protected-access
      params, _abstract((batch_size, chunk), jnp.int32, batch(0)),
      _abstract((batch_size, chunk), bool, batch(0)), _abstract((), jnp.int32, replicated),
      cache, _abstract((batch_size,), jnp.int32, batch()),
      _abstract((batch_size, config.vocab_size), jnp.float32, batch(0)), key, settings,
      **static)
  decode = sampling._decode_step_jit.lower(  # pylint: disable=protected-access
      params, _abstract((batch_size,), jnp.int32, batch()), _abstract((batch_size,), bool, batch()),
      cache, key, settings, **static)
  return [(f"prefill_chunk_{chunk}", num_chunks, prefill), ("decode_step", 1, decode)]


def compiled_plan(config: ModelConfig, mesh, *, moe_mode: str = "tensor", batch_size: int = 1,
                  prompt_len: int | None = None, cache_len: int | None = None,
                  prefill_chunk: int = sampling.DEFAULT_PREFILL_CHUNK, dtype=jnp.bfloat16,
                  device_bytes: float = 80 * GB, config_name: str | None = None) -> CompiledPlan:
  """Compiles every program of generating with these sizes on `mesh` (a Mesh of real
  devices: forced CPU devices will do) and collects XLA's per-device memory."""
  cache_len = cache_len or config.sequence_len
  prompt_len = prompt_len or cache_len
  plan = ShardingPlan(config, mesh, moe_mode)
  programs = []
  was_enabled = jax.config.jax_enable_compilation_cache
  compilation.use_persistent_cache(False)  # real compile times
  try:
    for name, runs, lowered in lower_programs(plan, batch_size, prompt_len, cache_len,
                                              prefill_chunk, dtype):
      start = time.perf_counter()
      compiled = lowered.compile()
      seconds = time.perf_counter() - start
      stats = compiled.memory_analysis()
      programs.append(ProgramMemory(
          name=name, runs=runs, compile_s=seconds,
          argument_bytes=int(stats.argument_size_in_bytes),
          temp_bytes=int(stats.temp_size_in_bytes),
          output_bytes=int(stats.output_size_in_bytes),
          alias_bytes=int(stats.alias_size_in_bytes)))
  finally:
    jax.config.update("jax_enable_compilation_cache", was_enabled)
  analytic = memory.memory_plan(config, mesh, batch_size, cache_len, moe_mode, dtype)
  return CompiledPlan(
      config_name=config_name or memory.config_name(config), num_layers=config.num_layers,
      mesh_shape=memory.mesh_shape_of(mesh), moe_mode=moe_mode, batch_size=batch_size,
      prompt_len=prompt_len, cache_len=cache_len, prefill_chunk=prefill_chunk,
      dtype=jnp.dtype(dtype).name, device_bytes=device_bytes, programs=tuple(programs),
      weight_bytes=analytic.weights_total)

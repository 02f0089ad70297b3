"""Model configuration: one frozen dataclass and its named presets.

Field names follow the configuration of the original Grok-1 release, so a
config.json written by grok_moe reads like the release's own settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from grok_moe.errors import ConfigError


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and constants of a Grok-1-style MoE transformer.

  Derived sizes (`ffn_size`, `num_kv_groups`, ...) are properties; impossible
  combinations raise `ConfigError` at construction.
  """

  vocab_size: int
  emb_size: int
  key_size: int
  num_q_heads: int
  num_kv_heads: int
  num_layers: int
  num_experts: int
  num_selected_experts: int
  widening_factor: float
  sequence_len: int
  attn_output_multiplier: float
  embedding_multiplier_scale: float
  output_multiplier_scale: float = 3 ** -0.5
  pad_token: int = 0
  bos_token: int = 1
  eos_token: int = 2                 # NO_EOS (-1): generation ends only by length
  attn_logit_cap: float = 30.0       # soft cap of the attention logits; 0: none
  rms_norm_eps: float = 1e-5
  rope_base: float = 10_000.0
  # Switches by which other Grok-style MoE families differ; each default is Grok-1's.
  expert_ffn_size: int = 0           # expert hidden size; 0: Grok's widening formula
  expert_activation: str = "gelu"    # "gelu" (tanh form, Grok-1), "gelu_exact" (erf form,
                                     # Grok-2) or "silu" (Mixtral, Qwen)
  router_renormalize: bool = False   # gates renormalised over the k chosen experts
  router_logit_cap: float = 0.0      # soft cap c*tanh(g/c) of the router logits; 0: none
  post_norms: bool = True            # Grok's RMSNorms after attention and MoE; False: none
  qkv_bias: bool = False             # biases on the query, key and value projections
  qk_norm: bool = False              # RMSNorm over each head of q and k, before RoPE
  tie_embeddings: bool = True        # logits from the embedding table; False: an lm_head
  shared_expert_ffn_size: int = 0    # hidden size of an expert every token uses; 0: none
  shared_expert_gate: bool = False   # the shared expert's output times sigmoid(x @ w)
  dense_ffn_size: int = 0            # a dense gated MLP beside the experts (Grok-2's residual
                                     # MoE): FFN out = (mlp + moe) / sqrt(2); 0: none
  attn_temperature_len: int = 0      # Grok-2: scores times log2(p)/log2(this) at query
                                     # positions p above it; 0: none
  final_logit_cap: float = 0.0       # soft cap of the output logits; 0: none

  def __post_init__(self):
    for name, (low, high) in _INTEGER_RANGES.items():
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
      if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}] (sizes a real model has), "
                          f"got {value}")
    for name in ("attn_logit_cap", "router_logit_cap", "final_logit_cap"):
      cap = getattr(self, name)
      if (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not math.isfinite(cap)
          or not 0 <= cap <= 1e6):
        raise ConfigError(f"{name} must be a finite number in [0, 1e6] (0: no cap), "
                          f"got {cap!r}")
    for name, (high, what) in _FLOAT_RANGES.items():
      value = getattr(self, name)
      if (not isinstance(value, (int, float)) or isinstance(value, bool)
          or not math.isfinite(value) or not 0 < value <= high):
        raise ConfigError(f"{name} must be a finite number in (0, {high}] ({what}), "
                          f"got {value!r}")
    if self.num_q_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_q_heads ({self.num_q_heads}) must be a multiple of "
          f"num_kv_heads ({self.num_kv_heads})")
    if self.num_selected_experts > self.num_experts:
      raise ConfigError(
          f"num_selected_experts ({self.num_selected_experts}) cannot exceed "
          f"num_experts ({self.num_experts})")
    if self.key_size % 2:
      raise ConfigError(f"key_size must be even for RoPE, got {self.key_size}")
    for name in ("pad_token", "bos_token", "eos_token"):
      token = getattr(self, name)
      if not isinstance(token, int) or isinstance(token, bool):
        raise ConfigError(f"{name} must be an integer token id, got {token!r}")
      if name == "eos_token" and token == NO_EOS:
        continue
      if not 0 <= token < self.vocab_size:
        raise ConfigError(f"{name} {token} is outside the vocabulary "
                          f"[0, {self.vocab_size})")
    for name, high in (("expert_ffn_size", 2**20), ("shared_expert_ffn_size", 2**20),
                       ("dense_ffn_size", 2**20), ("attn_temperature_len", 2**22)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise ConfigError(f"{name} must be an integer in [0, {high}] (0: none), got {value!r}")
    if self.attn_temperature_len == 1:
      raise ConfigError("attn_temperature_len must be 0 (no temperature) or at least 2: "
                        "the temperature divides by log2 of it")
    if self.expert_activation not in EXPERT_ACTIVATIONS:
      raise ConfigError(f"expert_activation must be one of {EXPERT_ACTIVATIONS}, "
                        f"got {self.expert_activation!r}")
    for name in ("router_renormalize", "post_norms", "qkv_bias", "qk_norm", "tie_embeddings",
                 "shared_expert_gate"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
    if self.shared_expert_gate and not self.shared_expert_ffn_size:
      raise ConfigError("shared_expert_gate needs a shared expert (shared_expert_ffn_size > 0)")
    if self.ffn_size < 1:
      raise ConfigError(f"widening_factor {self.widening_factor} with emb_size "
                        f"{self.emb_size} gives an expert hidden size of 0")

  @property
  def ffn_size(self) -> int:
    """Expert hidden size: expert_ffn_size when given, else Grok's formula
    int(widening * D) * 2 // 3, rounded up to a multiple of 8."""
    if self.expert_ffn_size:
      return self.expert_ffn_size
    return _round_up(int(self.widening_factor * self.emb_size) * 2 // 3, 8)

  @property
  def num_kv_groups(self) -> int:
    """Query heads that share one KV head."""
    return self.num_q_heads // self.num_kv_heads

  @property
  def q_size(self) -> int:
    return self.num_q_heads * self.key_size

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.key_size

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
    try:
      return cls(**values)
    except TypeError as error:
      raise ConfigError(f"incomplete config: {error}") from None

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2) + "\n"

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    """The config in a JSON object of field: value, every field checked (see __post_init__).

    Refused with a ConfigError naming the problem: text over MAX_JSON_CHARS,
    nested objects or arrays, duplicate fields, integers of more than 20
    digits; NaN and Infinity parse, then fail the finite-number checks.
    """
    if len(text) > MAX_JSON_CHARS:
      raise ConfigError(f"config JSON of {len(text)} characters; a config is a few hundred "
                        f"(at most {MAX_JSON_CHARS})")
    if _json_nesting(text) > 1:
      raise ConfigError("config JSON nests objects or arrays; every field is a number, "
                        "a string or true/false")
    try:
      values = json.loads(text, parse_int=_parse_json_int,
                          object_pairs_hook=_object_without_duplicates)
    except ConfigError:
      raise
    except (ValueError, RecursionError) as error:
      raise ConfigError(f"config is not valid JSON: {error}") from None
    if not isinstance(values, dict):
      raise ConfigError("config JSON must be an object of field: value")
    return cls.from_dict(values)


# Ranges of the size fields: generous bounds on the models that exist (Grok-1
# has V 131072, D 6144, 64 layers, 8 experts), so that a corrupt or hostile
# config is refused before anything is allocated from it.
_INTEGER_RANGES = {
    "vocab_size": (1, 2**22),
    "emb_size": (1, 2**16),
    "key_size": (1, 2**12),
    "num_q_heads": (1, 2**10),
    "num_kv_heads": (1, 2**10),
    "num_layers": (1, 2**10),
    "num_experts": (1, 2**12),
    "num_selected_experts": (1, 2**12),
    "sequence_len": (1, 2**22),
}
# Float fields: (largest allowed value, what it is); each must be finite and > 0.
_FLOAT_RANGES = {
    "widening_factor": (64.0, "expert hidden size over emb_size"),
    "attn_output_multiplier": (1e6, "attention logit scale"),
    "embedding_multiplier_scale": (1e6, "embedding scale"),
    "output_multiplier_scale": (1e6, "logit scale"),
    "rms_norm_eps": (1.0, "RMSNorm epsilon"),
    "rope_base": (1e12, "RoPE wavelength base"),
}
EXPERT_ACTIVATIONS = ("gelu", "gelu_exact", "silu")
NO_EOS = -1
MAX_JSON_CHARS = 64 * 1024
_MAX_JSON_INT_DIGITS = 20


def _parse_json_int(digits: str) -> int:
  if len(digits.lstrip("-")) > _MAX_JSON_INT_DIGITS:
    raise ConfigError(f"config JSON has an integer of {len(digits)} digits "
                      f"(the largest field needs < {_MAX_JSON_INT_DIGITS})")
  return int(digits)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  values = {}
  for key, value in pairs:
    if key in values:
      raise ConfigError(f"config JSON sets {key} twice")
    values[key] = value
  return values


def _json_nesting(text: str) -> int:
  """How deep objects and arrays nest in JSON `text` (strings skipped); no recursion."""
  depth = deepest = 0
  in_string = escaped = False
  for char in text:
    if in_string:
      if escaped:
        escaped = False
      elif char == "\\":
        escaped = True
      elif char == '"':
        in_string = False
    elif char == '"':
      in_string = True
    elif char in "[{":
      depth += 1
      deepest = max(deepest, depth)
    elif char in "]}":
      depth -= 1
  return deepest


def _preset(emb_size: int, key_size: int, **fields: Any) -> ModelConfig:
  """A config whose multipliers follow the Grok-1 formulas for its sizes."""
  return ModelConfig(
      emb_size=emb_size,
      key_size=key_size,
      embedding_multiplier_scale=math.sqrt(emb_size),
      attn_output_multiplier=key_size ** -0.5,
      **fields)


GROK_1 = _preset(
    vocab_size=131_072, emb_size=6144, key_size=128, num_q_heads=48,
    num_kv_heads=8, num_layers=64, num_experts=8, num_selected_experts=2,
    widening_factor=8, sequence_len=8192)

# The speed benchmark's model (issue 7): Grok-1 proportions at width 512.
BENCH = _preset(
    vocab_size=4096, emb_size=512, key_size=64, num_q_heads=8, num_kv_heads=2,
    num_layers=4, num_experts=8, num_selected_experts=2, widening_factor=8,
    sequence_len=1024)

# Tests: odd, mutually distinct sizes so that a swapped axis fails loudly.
TINY = _preset(
    vocab_size=97, emb_size=40, key_size=8, num_q_heads=6, num_kv_heads=2,
    num_layers=2, num_experts=4, num_selected_experts=2, widening_factor=2.5,
    sequence_len=64)



def _llama_style_moe(emb_size: int, key_size: int, expert_ffn_size: int, **fields: Any):
  """A config of the Mixtral / Qwen MoE shape: SiLU experts, pre-norms only, no soft cap,
  no embedding or output multiplier, an untied output projection (the published sizes
  of each preset below are those of its config.json)."""
  return ModelConfig(
      emb_size=emb_size, key_size=key_size, expert_ffn_size=expert_ffn_size,
      widening_factor=expert_ffn_size / emb_size, attn_output_multiplier=key_size ** -0.5,
      embedding_multiplier_scale=1.0, output_multiplier_scale=1.0, attn_logit_cap=0.0,
      expert_activation="silu", post_norms=False, tie_embeddings=False, **fields)


# mistralai/Mixtral-8x7B-v0.1.
MIXTRAL_8X7B = _llama_style_moe(
    vocab_size=32_000, emb_size=4096, key_size=128, expert_ffn_size=14_336, num_q_heads=32,
    num_kv_heads=8, num_layers=32, num_experts=8, num_selected_experts=2,
    sequence_len=32_768, rms_norm_eps=1e-5, rope_base=1e6, router_renormalize=True,
    bos_token=1, eos_token=2)

# Qwen/Qwen1.5-MoE-A2.7B: 60 experts, top 4 not renormalised, a gated shared expert.
QWEN1_5_MOE_A2_7B = _llama_style_moe(
    vocab_size=151_936, emb_size=2048, key_size=128, expert_ffn_size=1408, num_q_heads=16,
    num_kv_heads=16, num_layers=24, num_experts=60, num_selected_experts=4,
    sequence_len=8192, rms_norm_eps=1e-6, rope_base=1e6, qkv_bias=True,
    shared_expert_ffn_size=5632, shared_expert_gate=True, bos_token=151_643,
    eos_token=151_643)

# Qwen/Qwen3-30B-A3B: 128 experts, top 8 renormalised, per-head q/k norms.
QWEN3_30B_A3B = _llama_style_moe(
    vocab_size=151_936, emb_size=2048, key_size=128, expert_ffn_size=768, num_q_heads=32,
    num_kv_heads=4, num_layers=48, num_experts=128, num_selected_experts=8,
    sequence_len=40_960, rms_norm_eps=1e-6, rope_base=1e6, router_renormalize=True,
    qk_norm=True, bos_token=151_643, eos_token=151_645)

# xai-org/grok-2 (docs/GROK2_SPEC.md): Grok-1's layer with a dense MLP beside the experts,
# exact GELU, router and output soft caps, an attention temperature past position 1024,
# an untied output projection scaled by 0.5. Its RoPE "original" scaling changes nothing
# but the table length, so it is plain RoPE with the base below.
GROK_2 = _preset(
    vocab_size=131_072, emb_size=8192, key_size=128, num_q_heads=64, num_kv_heads=8,
    num_layers=64, num_experts=8, num_selected_experts=2, widening_factor=2.0,
    expert_ffn_size=16_384, dense_ffn_size=32_768, sequence_len=131_072,
    output_multiplier_scale=0.5, attn_logit_cap=30.0, router_logit_cap=30.0,
    final_logit_cap=50.0, attn_temperature_len=1024, rope_base=208_533_496.0,
    expert_activation="gelu_exact", tie_embeddings=False)

# Tests: Grok-2's switches at TINY's odd sizes (a temperature from position 5 on).
TINY_GROK_2 = TINY.replace(
    expert_ffn_size=18, widening_factor=18 / 40, dense_ffn_size=22, output_multiplier_scale=0.5, router_logit_cap=3.0,
    final_logit_cap=5.0, attn_logit_cap=4.0, attn_temperature_len=5, rope_base=208_533_496.0,
    expert_activation="gelu_exact", tie_embeddings=False)

PRESETS = {"grok-1": GROK_1, "grok-2": GROK_2, "tiny-grok-2": TINY_GROK_2, "bench": BENCH, "tiny": TINY, "mixtral-8x7b": MIXTRAL_8X7B,
           "qwen1.5-moe-a2.7b": QWEN1_5_MOE_A2_7B, "qwen3-30b-a3b": QWEN3_30B_A3B}

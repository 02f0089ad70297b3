"""Hugging Face checkpoints of Grok-style MoE families, read into the parameter table.

A Hugging Face directory holds config.json (with `model_type`) and one
`model.safetensors` or several `*.safetensors` with `model.safetensors.index.json`.
This module is the adapter at the edge, family by family:

    `model_config`   config.json -> ModelConfig: the family's sizes and switches;
    `SOURCES`        per family, where each tensor of the table comes from: the
                     Hugging Face name and how its axes map onto ours
                     (Hugging Face keeps Linear weights as [out, in], the table
                     [in, out]; experts are one tensor each, the table stacks them);
    `hf_config`      ModelConfig -> config.json, the inverse (Grok-2's in its
                     release's form, with no model_type), for `grok_moe.hf_save`;
    `load`           the stacked params, each layer written into its slot of an
                     array already laid out for its devices; every device's
                     part is read as a slice of the memory-mapped files, so
                     host memory holds one layer's shard at a time.

Families: mixtral (MixtralForCausalLM), qwen2_moe (Qwen2MoeForCausalLM),
qwen3_moe (Qwen3MoeForCausalLM), found by config.json's `model_type`, and
grok2 (xai-org/grok-2, docs/GROK2_SPEC.md), found by its `architectures`
["Grok1ForCausalLM"] and its own fields, whatever its `model_type`. Grok-2's
files are split for tensor parallelism (`*-TP-RRR.safetensors`, no index),
read by `grok_moe.rank_files`. The model has no branch on the family: the
config's switches say everything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from grok_moe import params as P
from grok_moe import quant
from grok_moe.config import NO_EOS, ModelConfig
from grok_moe.errors import CheckpointError, ConfigError
from grok_moe.rank_files import RankFiles, check_tensor, is_rank_split
from grok_moe.safetensors_file import SafetensorsFile
from grok_moe.sharding import ShardingPlan

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 1024 * 1024


def is_hf_checkpoint(path) -> bool:
  """Whether `path` is a directory with a Hugging Face config.json (a `model_type`, or
  Grok-2's architectures) and safetensors weights."""
  path = pathlib.Path(path)
  config = path / CONFIG_FILE
  if not config.is_file() or not any(path.glob("*.safetensors")):
    return False
  try:
    values = json.loads(config.read_text(encoding="utf-8")[:MAX_CONFIG_BYTES])
  except (OSError, ValueError):
    return False
  return isinstance(values, dict) and ("model_type" in values or family(values) is not None)


def read_hf_config(path) -> dict[str, Any]:
  config_path = pathlib.Path(path) / CONFIG_FILE
  try:
    with open(config_path, "rb") as file:
      text = file.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
      raise CheckpointError(f"{config_path} is over {MAX_CONFIG_BYTES} bytes; not a config")
    values = json.loads(text.decode("utf-8"))
  except (OSError, UnicodeDecodeError, ValueError) as error:
    raise CheckpointError(f"cannot read {config_path}: {error}") from None
  if not isinstance(values, dict):
    raise CheckpointError(f"{config_path} is not a JSON object")
  return values


# --- config.json -> ModelConfig. ---

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu"}


def _field(hf: dict, name: str, default=None, *, required=True):
  if name in hf and hf[name] is not None:
    return hf[name]
  if not required:
    return default
  raise ConfigError(f"config.json has no {name}")


def _common(hf: dict, experts_field: str, ffn_field: str) -> dict[str, Any]:
  """The fields the families share (Llama-style attention, RMSNorm, RoPE)."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 or 4
  if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ConfigError(f"config.json's RoPE scaling {rope} is not supported (only the "
                      "default RoPE)")
  rope_base = hf.get("rope_theta") or rope.get("rope_theta") or 10_000.0
  emb = _field(hf, "hidden_size")
  heads = _field(hf, "num_attention_heads")
  key_size = _field(hf, "head_dim", emb // heads, required=False)
  activation = _field(hf, "hidden_act", "silu", required=False)
  if activation not in _ACTIVATIONS:
    raise ConfigError(f"config.json's hidden_act {activation!r} is not supported; known: "
                      f"{sorted(_ACTIVATIONS)}")
  context = _field(hf, "max_position_embeddings")
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  if window:  # attention within the context never reaches past the window
    context = min(context, window)
  ffn = _field(hf, ffn_field)
  eos = _field(hf, "eos_token_id", NO_EOS, required=False)
  vocab = _field(hf, "vocab_size")
  pad = _field(hf, "pad_token_id", 0, required=False)
  return dict(
      vocab_size=vocab, emb_size=emb, key_size=key_size, num_q_heads=heads,
      num_kv_heads=_field(hf, "num_key_value_heads", heads, required=False),
      num_layers=_field(hf, "num_hidden_layers"), num_experts=_field(hf, experts_field),
      num_selected_experts=_field(hf, "num_experts_per_tok"),
      widening_factor=ffn / emb, expert_ffn_size=ffn, sequence_len=context,
      attn_output_multiplier=key_size ** -0.5, embedding_multiplier_scale=1.0,
      output_multiplier_scale=1.0, attn_logit_cap=0.0,
      rms_norm_eps=_field(hf, "rms_norm_eps", 1e-6, required=False),
      rope_base=float(rope_base),
      expert_activation=_ACTIVATIONS[activation], post_norms=False,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      pad_token=pad if isinstance(pad, int) and 0 <= pad < vocab else 0,
      bos_token=_field(hf, "bos_token_id", 1, required=False),
      eos_token=eos[0] if isinstance(eos, list) else eos)


def _no_dense_layers(hf: dict) -> None:
  if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
    raise ConfigError("config.json has dense MLP layers (mlp_only_layers or "
                      "decoder_sparse_step != 1), which are not supported: every layer must "
                      "be a mixture of experts")


def _mixtral(hf: dict) -> dict[str, Any]:
  return dict(_common(hf, "num_local_experts", "intermediate_size"), router_renormalize=True)


def _qwen2_moe(hf: dict) -> dict[str, Any]:
  _no_dense_layers(hf)
  shared = _field(hf, "shared_expert_intermediate_size", 0, required=False)
  return dict(_common(hf, "num_experts", "moe_intermediate_size"),
              router_renormalize=bool(hf.get("norm_topk_prob", False)),
              qkv_bias=bool(hf.get("qkv_bias", True)),
              shared_expert_ffn_size=shared, shared_expert_gate=shared > 0)


def _qwen3_moe(hf: dict) -> dict[str, Any]:
  _no_dense_layers(hf)
  return dict(_common(hf, "num_experts", "moe_intermediate_size"),
              router_renormalize=bool(hf.get("norm_topk_prob", True)),
              qkv_bias=bool(hf.get("attention_bias", False)), qk_norm=True)


# Grok-2 (docs/GROK2_SPEC.md, "Config"): SGLang's Grok1ForCausalLM reads config.json; the
# release's model_type is not known, so Grok-2 is recognised by its class and by fields
# Grok-1's configs do not have.
GROK2_ARCHITECTURES = ["Grok1ForCausalLM"]
_GROK2_FIELDS = ("residual_moe", "moe_intermediate_size", "attn_temperature_len",
                 "router_logit_softcapping", "final_logit_softcapping")
GROK2_ROPE_TYPES = (None, "original")  # "original" is plain RoPE; the YaRN kinds are not run
GROK2_EOS = 2  # the spec: SGLang's tokenizer hard-codes 2 as Grok-2's end of sequence


def _off_if_negative(value) -> float:
  """SGLang's convention for caps and lengths: a negative value (or None) is off (0)."""
  return 0 if value is None or value < 0 else value


def _grok2(hf: dict) -> dict[str, Any]:
  """Grok-2's fields. Where one is absent, SGLang's default applies (the spec, "Config"):
  head_dim 128, residual_moe false (no dense MLP), the expert size moe_intermediate_size
  or else intermediate_size, attention and router caps 30, no final cap, no attention
  temperature, rope_theta 10000, no RoPE scaling; no BOS exists, so bos_token is the
  EOS id (it only starts an empty prompt), EOS is 2 unless eos_token_id says."""
  rope_type = hf.get("rope_type")
  scaling = hf.get("rope_scaling") or {}  # SGLang reads only rope_type; refuse another form
  scaling_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else 0
  if rope_type not in GROK2_ROPE_TYPES or (scaling and scaling_type not in ("original",
                                                                           "default")):
    raise ConfigError(f"config.json's rope_type {rope_type or scaling!r} is not supported: "
                      "only \"original\" (plain RoPE) is implemented, not YaRN or theta scaling")
  emb = _field(hf, "hidden_size")
  key_size = _field(hf, "head_dim", 128, required=False)
  residual_moe = hf.get("residual_moe", False)
  if not isinstance(residual_moe, bool):
    raise ConfigError(f"config.json's residual_moe must be true or false, got {residual_moe!r}")
  expert_ffn = _field(hf, "moe_intermediate_size", None, required=False)
  if expert_ffn is None:
    expert_ffn = _field(hf, "intermediate_size")
  context = _field(hf, "max_position_embeddings")
  if rope_type == "original" and "original_max_position_embeddings" in hf:
    # SGLang's RoPE table covers positions below original_max_position_embeddings * scaling
    context = min(context, int(hf["original_max_position_embeddings"]
                               * hf.get("scaling_factor", 1.0)))
  vocab = _field(hf, "vocab_size")
  pad = _field(hf, "pad_token_id", 0, required=False)
  eos = _field(hf, "eos_token_id", GROK2_EOS, required=False)
  eos = eos[0] if isinstance(eos, list) else eos
  return dict(
      vocab_size=vocab, emb_size=emb, key_size=key_size,
      num_q_heads=_field(hf, "num_attention_heads"),
      num_kv_heads=_field(hf, "num_key_value_heads"), num_layers=_field(hf, "num_hidden_layers"),
      num_experts=_field(hf, "num_local_experts"),
      num_selected_experts=_field(hf, "num_experts_per_tok"),
      widening_factor=expert_ffn / emb, expert_ffn_size=expert_ffn,
      dense_ffn_size=_field(hf, "intermediate_size") if residual_moe else 0,
      sequence_len=context, attn_output_multiplier=key_size ** -0.5,
      embedding_multiplier_scale=_field(hf, "embedding_multiplier_scale"),
      output_multiplier_scale=_field(hf, "output_multiplier_scale"),
      attn_logit_cap=_off_if_negative(hf.get("attn_logit_softcapping", 30.0)),
      router_logit_cap=_off_if_negative(hf.get("router_logit_softcapping", 30.0)),
      final_logit_cap=_off_if_negative(hf.get("final_logit_softcapping")),
      attn_temperature_len=_off_if_negative(hf.get("attn_temperature_len")),
      rms_norm_eps=_field(hf, "rms_norm_eps"),
      rope_base=float(int(_field(hf, "rope_theta", 10_000, required=False))),  # SGLang: int()
      expert_activation="gelu_exact", router_renormalize=False, post_norms=True,
      tie_embeddings=False,  # SGLang always loads a separate lm_head
      pad_token=pad if isinstance(pad, int) and 0 <= pad < vocab else 0,
      bos_token=_field(hf, "bos_token_id", eos, required=False), eos_token=eos)


_CONFIGS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "grok2": _grok2,
}
# The families found by model_type, with the architecture their config.json names.
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
MODEL_TYPES = tuple(ARCHITECTURES)


def family(hf: dict) -> str | None:
  """The family of a config.json (its dict): its model_type when supported, "grok2" for
  Grok-2's architectures with a Grok-2 field, else None."""
  if hf.get("model_type") in MODEL_TYPES:
    return hf["model_type"]
  if hf.get("architectures") == GROK2_ARCHITECTURES and any(f in hf for f in _GROK2_FIELDS):
    return "grok2"
  return None


def model_config(hf: dict, path="config.json") -> ModelConfig:
  """The ModelConfig of a Hugging Face config.json (its dict), by its family."""
  name = family(hf)
  if name is None:
    if hf.get("architectures") == GROK2_ARCHITECTURES:
      raise CheckpointError(f"{path}: architectures {GROK2_ARCHITECTURES} without any of "
                            f"Grok-2's fields {list(_GROK2_FIELDS)} is Grok-1 in SGLang's "
                            "layout, which is not supported; use the release checkpoint")
    raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported; "
                          f"supported: {sorted(MODEL_TYPES)} and Grok-2 "
                          f"(architectures {GROK2_ARCHITECTURES})")
  try:
    return ModelConfig(**_CONFIGS[name](hf))
  except (ConfigError, TypeError, ValueError, ZeroDivisionError) as error:
    raise CheckpointError(f"{path}: {error}") from None


# --- ModelConfig -> config.json: the inverse of the readers above. ---

def _common_hf(config: ModelConfig, experts_field: str, ffn_field: str) -> dict[str, Any]:
  """The fields `_common` reads, from `config`. Hub spellings: top-level rope_theta, no
  sliding window. An activation without a Hugging Face name is left out: the round trip
  in `hf_config` then refuses the config."""
  activations = {ours: theirs for theirs, ours in _ACTIVATIONS.items()}
  return {
      "hidden_size": config.emb_size, "num_attention_heads": config.num_q_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.key_size,
      "num_hidden_layers": config.num_layers, experts_field: config.num_experts,
      "num_experts_per_tok": config.num_selected_experts, ffn_field: config.ffn_size,
      "hidden_act": activations.get(config.expert_activation),
      "max_position_embeddings": config.sequence_len, "sliding_window": None,
      "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_base,
      "tie_word_embeddings": config.tie_embeddings, "vocab_size": config.vocab_size,
      "pad_token_id": config.pad_token, "bos_token_id": config.bos_token,
      "eos_token_id": None if config.eos_token == NO_EOS else config.eos_token,
  }


def _qwen_hf(config: ModelConfig) -> dict[str, Any]:
  """What both Qwen families add: every layer sparse, no sliding window; the dense
  intermediate_size (used only by dense layers, of which there are none) set to the
  experts' so that the field is present as the hub has it."""
  return dict(_common_hf(config, "num_experts", "moe_intermediate_size"),
              norm_topk_prob=config.router_renormalize, decoder_sparse_step=1,
              mlp_only_layers=[], use_sliding_window=False, intermediate_size=config.ffn_size)


# The release's RoPE fields (the spec, "Config"): "original" is plain RoPE, its table
# covering original_max_position_embeddings * scaling_factor positions; the YaRN fields
# are SGLang's inputs, unused by "original".
GROK2_ROPE_SCALING = 16.0
_GROK2_ROPE_FIELDS = {"rope_type": "original", "scaling_factor": GROK2_ROPE_SCALING,
                      "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8,
                      "beta_slow": 1}


def _negative_if_off(value):
  """The inverse of `_off_if_negative`: an off (0) cap or length is SGLang's -1."""
  return value if value > 0 else -1


def _grok2_hf(config: ModelConfig) -> dict[str, Any]:
  """The fields `_grok2` reads, from `config`, in the release's spelling: no model_type;
  the RoPE table sized to cover sequence_len; intermediate_size the dense MLP's, or
  the experts' where there is none (residual_moe false: the field is then unused);
  rope_theta an integer where it is one (SGLang takes int() of it)."""
  theta = int(config.rope_base) if float(config.rope_base).is_integer() else config.rope_base
  return {
      "architectures": list(GROK2_ARCHITECTURES), "hidden_size": config.emb_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_q_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.key_size,
      "num_local_experts": config.num_experts,
      "num_experts_per_tok": config.num_selected_experts,
      "moe_intermediate_size": config.ffn_size,
      "intermediate_size": config.dense_ffn_size or config.ffn_size,
      "residual_moe": config.dense_ffn_size > 0, "vocab_size": config.vocab_size,
      "max_position_embeddings": config.sequence_len,
      "original_max_position_embeddings": math.ceil(config.sequence_len / GROK2_ROPE_SCALING),
      **_GROK2_ROPE_FIELDS, "rope_theta": theta, "rms_norm_eps": config.rms_norm_eps,
      "embedding_multiplier_scale": config.embedding_multiplier_scale,
      "output_multiplier_scale": config.output_multiplier_scale,
      "attn_logit_softcapping": _negative_if_off(config.attn_logit_cap),
      "router_logit_softcapping": _negative_if_off(config.router_logit_cap),
      "final_logit_softcapping": _negative_if_off(config.final_logit_cap),
      "attn_temperature_len": _negative_if_off(config.attn_temperature_len),
      "tie_word_embeddings": config.tie_embeddings, "pad_token_id": config.pad_token,
      "bos_token_id": config.bos_token, "eos_token_id": config.eos_token,
  }


def _with_type(family: str, write: Callable[[ModelConfig], dict[str, Any]]):
  """`write` with the family's model_type and architectures added (the hub's families)."""
  return lambda config: dict(write(config), model_type=family,
                             architectures=[ARCHITECTURES[family]])


_HF_CONFIGS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {
    "mixtral": _with_type("mixtral", lambda config: _common_hf(config, "num_local_experts",
                                                               "intermediate_size")),
    "qwen2_moe": _with_type("qwen2_moe", lambda config: dict(
        _qwen_hf(config), qkv_bias=config.qkv_bias,
        shared_expert_intermediate_size=config.shared_expert_ffn_size)),
    "qwen3_moe": _with_type("qwen3_moe", lambda config: dict(_qwen_hf(config),
                                                             attention_bias=config.qkv_bias)),
    "grok2": _grok2_hf,
}


def hf_config(config: ModelConfig) -> dict[str, Any]:
  """config.json (a dict) of the first family, in the order of `_HF_CONFIGS`, whose
  reader (`model_config`) gives back exactly `config`; CheckpointError if none does.
  `family(hf)` names the family.

  Each family's dict is checked by reading it back, so a switch that no family
  has (Grok-1's tied embeddings and tanh GELU, GELU experts where the family
  has SiLU, a shared expert without its gate) is refused, and
  the error names the fields of the family that came closest.
  """
  closest: tuple[str, list[str]] | None = None
  for family, write in _HF_CONFIGS.items():
    hf = write(config)
    try:
      loaded = model_config(hf)
    except CheckpointError as error:
      differing = [str(error)]
    else:
      if loaded == config:
        return hf
      differing = [field for field, value in config.to_dict().items()
                   if loaded.to_dict()[field] != value]
    if closest is None or len(differing) < len(closest[1]):
      closest = (family, differing)
  raise CheckpointError(
      f"the config has no Hugging Face form: no supported family ({', '.join(_HF_CONFIGS)}) "
      f"has its switches (closest: {closest[0]}, which differs in {closest[1]}); save it in "
      "the release format (format=\"release\")")


def checkpoint_config(path, config: ModelConfig | None = None) -> ModelConfig:
  """The ModelConfig of the Hugging Face checkpoint at `path`; a `config` passed must
  equal it."""
  root = pathlib.Path(path)
  loaded = model_config(read_hf_config(root), root / CONFIG_FILE)
  if config is not None and config != loaded:
    differing = [field for field, value in config.to_dict().items()
                 if loaded.to_dict()[field] != value]
    raise CheckpointError(f"the config passed differs from {root / CONFIG_FILE} in "
                          f"{differing}; pass config=None to use the checkpoint's own")
  return loaded


# --- Where each tensor of the table comes from. ---

@dataclasses.dataclass(frozen=True)
class Source:
  """The Hugging Face tensor(s) of one table entry.

  `name` is a template with {layer} (and {expert} for experts). `transpose`: the
  Hugging Face tensor is the table's with its last two axes swapped ([out, in]
  Linear weights). `per_expert`: one tensor per expert, stacked on the table's
  expert axis. `rank_axis`: in files split for tensor parallelism
  (`grok_moe.rank_files`), the axis of the Hugging Face tensor its rank slices
  split; None: stored whole.
  """

  name: str
  transpose: bool = False
  per_expert: bool = False
  rank_axis: int | None = None


def _attention_sources(bias: bool, qk_norm: bool) -> dict[str, Source]:
  layer = "model.layers.{layer}."
  sources = {
      P.QUERY.name: Source(layer + "self_attn.q_proj.weight", transpose=True),
      P.KEY.name: Source(layer + "self_attn.k_proj.weight", transpose=True),
      P.VALUE.name: Source(layer + "self_attn.v_proj.weight", transpose=True),
      P.ATTENTION_OUT.name: Source(layer + "self_attn.o_proj.weight", transpose=True),
      P.PRE_ATTENTION_NORM.name: Source(layer + "input_layernorm.weight"),
      P.PRE_MOE_NORM.name: Source(layer + "post_attention_layernorm.weight"),
      P.EMBEDDINGS.name: Source("model.embed_tokens.weight"),
      P.FINAL_NORM.name: Source("model.norm.weight"),
      P.LM_HEAD.name: Source("lm_head.weight"),
  }
  if bias:
    sources.update({P.QUERY_BIAS.name: Source(layer + "self_attn.q_proj.bias"),
                    P.KEY_BIAS.name: Source(layer + "self_attn.k_proj.bias"),
                    P.VALUE_BIAS.name: Source(layer + "self_attn.v_proj.bias")})
  if qk_norm:
    sources.update({P.QUERY_NORM.name: Source(layer + "self_attn.q_norm.weight"),
                    P.KEY_NORM.name: Source(layer + "self_attn.k_norm.weight")})
  return sources


def _expert_sources(block: str, gate: str, up: str, down: str) -> dict[str, Source]:
  experts = "model.layers.{layer}." + block + ".experts.{expert}."
  return {
      P.ROUTER.name: Source("model.layers.{layer}." + block + ".gate.weight", transpose=True),
      P.EXPERT_IN.name: Source(experts + gate + ".weight", transpose=True, per_expert=True),
      P.EXPERT_GATE.name: Source(experts + up + ".weight", transpose=True, per_expert=True),
      P.EXPERT_OUT.name: Source(experts + down + ".weight", transpose=True, per_expert=True),
  }


def _shared_expert_sources() -> dict[str, Source]:
  shared = "model.layers.{layer}.mlp.shared_expert."
  return {
      P.SHARED_IN.name: Source(shared + "gate_proj.weight", transpose=True),
      P.SHARED_GATE.name: Source(shared + "up_proj.weight", transpose=True),
      P.SHARED_OUT.name: Source(shared + "down_proj.weight", transpose=True),
      P.SHARED_EXPERT_GATE.name: Source("model.layers.{layer}.mlp.shared_expert_gate.weight",
                                        transpose=True),
  }


def _grok2_sources() -> dict[str, Source]:
  """Grok-2's names (docs/GROK2_SPEC.md, "Tensor names"): Grok's four norms, the dense MLP
  as `mlp`, the experts w1 (gelu'd), w3, w2, their FFN axis split by rank (w1 and w3
  [Fe, D] by rows, w2 [D, Fe] by columns)."""
  layer = "model.layers.{layer}."
  experts = layer + "block_sparse_moe.experts.{expert}."
  return {
      **_attention_sources(bias=False, qk_norm=False),
      P.PRE_ATTENTION_NORM.name: Source(layer + "pre_attn_norm.weight"),
      P.POST_ATTENTION_NORM.name: Source(layer + "post_attn_norm.weight"),
      P.PRE_MOE_NORM.name: Source(layer + "pre_moe_norm.weight"),
      P.POST_MOE_NORM.name: Source(layer + "post_moe_norm.weight"),
      P.ROUTER.name: Source(layer + "block_sparse_moe.gate.weight", transpose=True),
      P.EXPERT_IN.name: Source(experts + "w1.weight", transpose=True, per_expert=True,
                               rank_axis=0),
      P.EXPERT_GATE.name: Source(experts + "w3.weight", transpose=True, per_expert=True,
                                 rank_axis=0),
      P.EXPERT_OUT.name: Source(experts + "w2.weight", transpose=True, per_expert=True,
                                rank_axis=1),
      P.DENSE_IN.name: Source(layer + "mlp.gate_proj.weight", transpose=True),
      P.DENSE_GATE.name: Source(layer + "mlp.up_proj.weight", transpose=True),
      P.DENSE_OUT.name: Source(layer + "mlp.down_proj.weight", transpose=True),
  }


SOURCES: dict[str, dict[str, Source]] = {
    "mixtral": {**_attention_sources(bias=False, qk_norm=False),
                **_expert_sources("block_sparse_moe", "w1", "w3", "w2")},
    "qwen2_moe": {**_attention_sources(bias=True, qk_norm=False),
                  **_expert_sources("mlp", "gate_proj", "up_proj", "down_proj"),
                  **_shared_expert_sources()},
    "qwen3_moe": {**_attention_sources(bias=True, qk_norm=True),
                  **_expert_sources("mlp", "gate_proj", "up_proj", "down_proj")},
    # lm_head is stored unscaled: the model multiplies the logits by output_multiplier_scale
    # (SGLang folds the 0.5 into the weight instead; the same function)
    "grok2": _grok2_sources(),
}


# --- The files. ---

class _Files:
  """The checkpoint's safetensors files, opened lazily, and which file holds each tensor."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    index = root / INDEX_FILE
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        self.where = {str(name): str(file) for name, file in weight_map.items()}
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index} is not a safetensors index ({error}); the file is "
                              "corrupt") from None
    else:
      files = sorted(root.glob("*.safetensors"))
      if len(files) != 1:
        raise CheckpointError(f"{root} holds {len(files)} safetensors files and no {INDEX_FILE}; "
                              "a checkpoint of several files needs its index")
      self.where = {name: files[0].name for name in SafetensorsFile(files[0]).names()}
    self._open: dict[str, SafetensorsFile] = {}

  def view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name`, a view into its mapped file, checked to be of `shape`."""
    file_name = self.where.get(name)
    if file_name is None:
      raise CheckpointError(f"{self.root} has no tensor {name} (in {INDEX_FILE} or the "
                            "safetensors file); the checkpoint is incomplete or of another "
                            "model")
    if file_name not in self._open:
      path = self.root / file_name
      if not path.is_file():
        raise CheckpointError(f"{path} is missing (it holds {name}); download it again")
      self._open[file_name] = SafetensorsFile(path)
    file = self._open[file_name]
    if name not in file.names():
      raise CheckpointError(f"{file.path} does not hold {name}, which {INDEX_FILE} puts there")
    view = file.view(name)
    check_tensor(file.path, name, view, shape)
    return view

  def dtype(self, name: str, shape: tuple[int, ...], rank_axis: int | None = None) -> np.dtype:
    return self.view(name, shape).dtype

  def read(self, name: str, shape: tuple[int, ...], part, rank_axis: int | None = None
           ) -> np.ndarray:
    """The block `part` of the tensor: the pages it covers, copied. (`rank_axis` is for
    files split by rank, `RankFiles`; these files hold whole tensors.)"""
    return np.asarray(self.view(name, shape)[part])


def _open_files(root: pathlib.Path):
  """The checkpoint's files: split by rank (`*-TP-*.safetensors`), or whole tensors."""
  return RankFiles(root) if is_rank_split(root) else _Files(root)


def _read_block(files, source: Source, spec: P.ParamSpec, config: ModelConfig,
                layer: int | None, index) -> np.ndarray:
  """The part `index` (slices over one layer's table shape) of the tensor, read from the
  mapped files (`_Files` or `RankFiles`): only that part's pages are touched."""
  shape = spec.layer_shape(config)
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))

  def read(name: str, table_shape: tuple[int, ...], part) -> np.ndarray:
    stored = table_shape[:-2] + table_shape[::-1][:2] if source.transpose else table_shape
    if source.transpose:
      *lead, rows, cols = part
      block = files.read(name, tuple(stored), (*lead, cols, rows), source.rank_axis)
      return block.swapaxes(-1, -2)
    return files.read(name, tuple(stored), tuple(part), source.rank_axis)

  if not source.per_expert:
    return read(source.name.format(layer=layer), shape, index)
  experts = range(shape[0])[index[0]]
  return np.stack([read(source.name.format(layer=layer, expert=expert), shape[1:], index[1:])
                   for expert in experts])


QUANTIZE = (None, "int8")


def load(path, config: ModelConfig | None = None, *, sharding: ShardingPlan | None = None,
         dtype=None, quantize: str | None = None):
  """The stacked params of the Hugging Face checkpoint at `path`, on the device(s).

  Each table entry is built in its final layout (`sharding`'s, or the default
  device): one layer at a time, each device's part read as a slice of the
  mapped safetensors files (`jax.make_array_from_callback`), then written into
  its slot of the stack. Weights keep the checkpoint's dtype, or `dtype`. Files
  split by tensor-parallel rank (Grok-2) are joined per device: each device
  reads only the rank slices its shard overlaps (`grok_moe.rank_files`).

  With quantize="int8" the matrices the release quantizes become int8 with
  bfloat16 scales in the release's layouts (`quant.quantize`: per output
  channel, or 8 row blocks for the output projections where 8 divides their
  rows), on the way in: each layer's matrix is read whole on the host (a
  column's scale needs all its rows), quantized, and each device takes its
  slice of the int8 values and scales.
  """
  if quantize not in QUANTIZE:
    raise CheckpointError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
  root = pathlib.Path(path)
  hf = read_hf_config(root)
  config = checkpoint_config(root, config)
  if sharding is not None:
    sharding.check_config(config)
  name = family(hf)
  sources = SOURCES[name]
  files = _open_files(root)
  device = jax.devices()[0]
  flat = {}
  for spec in P.params_for(config):
    source = sources.get(spec.name)
    if source is None:
      raise CheckpointError(f"{name} checkpoints have no source for {spec.name}")
    if sharding is None:
      whole = layer_sharding = jax.sharding.SingleDeviceSharding(device)
    else:
      whole = sharding.sharding(sharding.spec(spec.stored_axes()))
      layer_sharding = sharding.sharding(sharding.spec(spec.axes))
    first = source.name.format(layer=0, expert=0)
    stored_dtype = files.dtype(first, _hf_shape(source, spec, config), source.rank_axis)
    target_dtype = jnp.dtype(dtype or stored_dtype)

    def part(index, layer=None, spec=spec, source=source):
      return _read_block(files, source, spec, config, layer, index).astype(target_dtype)

    if not spec.per_layer:
      flat[spec.path] = jax.make_array_from_callback(spec.layer_shape(config), whole, part)
      continue
    if quantize == "int8" and spec.quantized:
      flat[spec.path] = _load_quantized(spec, config, sharding, whole, layer_sharding, part)
      continue
    stack = jnp.zeros(spec.stored_shape(config), target_dtype, device=whole)
    for layer in range(config.num_layers):
      leaf = jax.make_array_from_callback(spec.layer_shape(config), layer_sharding,
                                          functools.partial(part, layer=layer))
      stack = P.write_layer(stack, leaf, layer)
    flat[spec.path] = jax.block_until_ready(stack)
  return config, P.unflatten(flat)


def _load_quantized(spec: P.ParamSpec, config: ModelConfig, sharding: ShardingPlan | None,
                    whole, layer_sharding, part):
  """The stack [L, ...] of `spec` as int8 with bfloat16 scales [L, ..., R, N] in the
  release's row blocks R (per channel, R = 1, where those do not divide the rows),
  quantized layer by layer on the host and placed in its final layout."""
  shape = spec.layer_shape(config)
  blocks = spec.blocks_for_rows(shape[-2])
  scales_shape = (*shape[:-2], blocks, shape[-1])

  def scales_sharding(weight_sharding):
    """The scales' layout: the weight's, their row blocks split only where they divide."""
    if sharding is None:
      return weight_sharding
    return sharding.sharding(sharding.scales_spec(weight_sharding.spec, blocks))

  weight_stack = jnp.zeros(spec.stored_shape(config), jnp.int8, device=whole)
  scales_stack = jnp.zeros((config.num_layers, *scales_shape), jnp.bfloat16,
                           device=scales_sharding(whole))
  for layer in range(config.num_layers):
    host = quant.quantize(np.asarray(part(tuple(slice(None) for _ in shape), layer=layer),
                                     np.float32), row_blocks=blocks)
    weight = jax.make_array_from_callback(shape, layer_sharding, lambda index: host.weight[index])
    scales = jax.make_array_from_callback(scales_shape, scales_sharding(layer_sharding),
                                          lambda index: host.scales[index])
    weight_stack = P.write_layer(weight_stack, weight, layer)
    scales_stack = P.write_layer(scales_stack, scales, layer)
  return jax.block_until_ready(quant.QuantizedWeight(weight_stack, scales_stack))


def _hf_shape(source: Source, spec: P.ParamSpec, config: ModelConfig) -> tuple[int, ...]:
  """The shape of one Hugging Face tensor of `source` (one expert's, for per-expert ones)."""
  shape = spec.layer_shape(config)[1 if source.per_expert else 0:]
  return tuple(shape[:-2]) + tuple(shape[::-1][:2]) if source.transpose else tuple(shape)

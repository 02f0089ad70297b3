"""The parameter table: every tensor of the model, written once.

Each `ParamSpec` says a tensor's name, its shape as a function of the config,
its logical axes and how the release quantizes it. Everything else is derived
from `PARAMS`: the release's names and file order (`grok_moe.manifest`),
`init_params`, the abstract parameters, the partition specs
(`grok_moe.sharding`), the memory plan and the benchmarks' byte counts.

In memory the decoder layers' tensors are stacked: one array per tensor kind
with a leading [L] axis, which the model scans over.

    in memory (Haiku params)                         release (one file per layer)
    language_model/in_out_embed/embeddings [V, D]    the same name
    language_model/rms_norm/scale [D]                the same name
    transformer/decoder_layers/moe/linear/w [L, E, D, F]
                                    transformer/decoder_layer_{i}/moe/linear/w [E, D, F]

Logical axes (mapped to mesh axes by `grok_moe.sharding`): VOCAB, EMBED (the
model width D, never split), Q_HEADS (H*d), KV_HEADS (K*d), EXPERTS, FFN (the
expert hidden width F), and None for an axis that is never split (the router's
expert axis, which every device needs whole).

Quantization in the release: `row_blocks` None keeps the tensor float32;
1 is int8 with one bfloat16 scale per output channel; 8 is int8 with scales
per block of K/8 rows (`grok_moe.quant`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from grok_moe import quant
from grok_moe.config import ModelConfig
from grok_moe.errors import ConfigError

# Logical axes.
VOCAB = "vocab"
EMBED = "embed"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
EXPERTS = "experts"
FFN = "ffn"
SHARED_FFN = "shared_ffn"  # the shared expert's hidden width
DENSE_FFN = "dense_ffn"    # the dense MLP's hidden width (Grok-2)
HEAD = "head"              # one head's width d (q/k norm scales): never split

LAYERS_MODULE = "transformer/decoder_layers"
_RELEASE_LAYER = re.compile(r"^transformer/decoder_layer_(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One tensor kind of the model.

  `name` is the full name for a tensor outside the layers and the name within
  a layer ("moe/linear/w") for a per-layer one. `shape(config)` is the shape
  of one layer's tensor; `axes` names its axes. `fan_in_axis` is the axis
  whose size sets the init's standard deviation (1/sqrt(fan_in)); None means
  the tensor starts as `init_value` (1 for norm scales, 0 for biases).
  `group` is one of GROUPS. `present(config)` says whether a config has the
  tensor at all (the switches of `ModelConfig`: biases, q/k norms, an
  untied output projection, a shared expert).
  """

  name: str
  shape: Callable[[ModelConfig], tuple[int, ...]]
  axes: tuple[str | None, ...]
  row_blocks: int | None
  per_layer: bool
  group: str                      # what the memory plan and benchmarks count it under
  fan_in_axis: int | None = -2
  init_value: float = 1.0         # the constant a tensor without fan_in starts as
  present: Callable[[ModelConfig], bool] = lambda config: True

  @property
  def path(self) -> str:
    """The in-memory name: `module/param`, the layers' stacked under LAYERS_MODULE."""
    return f"{LAYERS_MODULE}/{self.name}" if self.per_layer else self.name

  @property
  def quantized(self) -> bool:
    return self.row_blocks is not None

  def layer_shape(self, config: ModelConfig) -> tuple[int, ...]:
    return tuple(self.shape(config))

  def stored_shape(self, config: ModelConfig) -> tuple[int, ...]:
    """The shape in memory: [L, ...] for a per-layer tensor."""
    shape = self.layer_shape(config)
    return (config.num_layers, *shape) if self.per_layer else shape

  def stored_axes(self) -> tuple[str | None, ...]:
    return (None, *self.axes) if self.per_layer else self.axes

  def blocks_for_rows(self, rows: int) -> int:
    """The scale row blocks of a matrix of `rows` rows: the release's, where they divide
    the rows (always, for Grok-1), else one block (per output channel)."""
    return self.row_blocks if rows % self.row_blocks == 0 else 1

  def release_name(self, layer: int | None) -> str:
    if self.per_layer:
      return f"transformer/decoder_layer_{layer}/{self.name}"
    return self.name


GROUPS = ("experts", "dense mlp", "attention", "embeddings", "norms and router")


def _matrix(name, shape, axes, row_blocks, group, present=lambda config: True):
  return ParamSpec(name, shape, axes, row_blocks, per_layer=True, group=group,
                   present=present)


def _norm(name, present=lambda config: True):
  return ParamSpec(name, lambda c: (c.emb_size,), (EMBED,), None, per_layer=True,
                   group="norms and router", fan_in_axis=None, present=present)


def _vector(name, shape, axes, group, init_value, present):
  return ParamSpec(name, shape, axes, None, per_layer=True, group=group, fan_in_axis=None,
                   init_value=init_value, present=present)


def _has_post_norms(config):
  return config.post_norms


def _has_qkv_bias(config):
  return config.qkv_bias


def _has_qk_norm(config):
  return config.qk_norm


def _has_lm_head(config):
  return not config.tie_embeddings


def _has_shared_expert(config):
  return config.shared_expert_ffn_size > 0


def _has_shared_expert_gate(config):
  return config.shared_expert_gate


def _has_dense_mlp(config):
  return config.dense_ffn_size > 0


EMBEDDINGS = ParamSpec("language_model/in_out_embed/embeddings",
                       lambda c: (c.vocab_size, c.emb_size), (VOCAB, EMBED), None,
                       per_layer=False, group="embeddings", fan_in_axis=-1)
LM_HEAD = ParamSpec("language_model/lm_head/w", lambda c: (c.vocab_size, c.emb_size),
                    (VOCAB, EMBED), None, per_layer=False, group="embeddings", fan_in_axis=-1,
                    present=_has_lm_head)  # [V, D] like the embeddings, when not tied
FINAL_NORM = ParamSpec("language_model/rms_norm/scale", lambda c: (c.emb_size,), (EMBED,),
                       None, per_layer=False, group="norms and router", fan_in_axis=None)
QUERY = _matrix("multi_head_attention/query/w", lambda c: (c.emb_size, c.q_size),
                (EMBED, Q_HEADS), 1, "attention")
KEY = _matrix("multi_head_attention/key/w", lambda c: (c.emb_size, c.kv_size),
              (EMBED, KV_HEADS), 1, "attention")
VALUE = _matrix("multi_head_attention/value/w", lambda c: (c.emb_size, c.kv_size),
                (EMBED, KV_HEADS), 1, "attention")
ATTENTION_OUT = _matrix("multi_head_attention/linear/w", lambda c: (c.q_size, c.emb_size),
                        (Q_HEADS, EMBED), 8, "attention")
QUERY_BIAS = _vector("multi_head_attention/query/b", lambda c: (c.q_size,), (Q_HEADS,),
                     "attention", 0.0, _has_qkv_bias)
KEY_BIAS = _vector("multi_head_attention/key/b", lambda c: (c.kv_size,), (KV_HEADS,),
                   "attention", 0.0, _has_qkv_bias)
VALUE_BIAS = _vector("multi_head_attention/value/b", lambda c: (c.kv_size,), (KV_HEADS,),
                     "attention", 0.0, _has_qkv_bias)
QUERY_NORM = _vector("multi_head_attention/query_norm/scale", lambda c: (c.key_size,), (HEAD,),
                     "norms and router", 1.0, _has_qk_norm)
KEY_NORM = _vector("multi_head_attention/key_norm/scale", lambda c: (c.key_size,), (HEAD,),
                   "norms and router", 1.0, _has_qk_norm)
PRE_ATTENTION_NORM = _norm("rms_norm/scale")
POST_ATTENTION_NORM = _norm("rms_norm_1/scale", _has_post_norms)
PRE_MOE_NORM = _norm("rms_norm_2/scale")
POST_MOE_NORM = _norm("rms_norm_3/scale", _has_post_norms)
ROUTER = _matrix("router/w", lambda c: (c.emb_size, c.num_experts), (EMBED, None), None,
                 "norms and router")
EXPERT_IN = _matrix("moe/linear/w", lambda c: (c.num_experts, c.emb_size, c.ffn_size),
                    (EXPERTS, EMBED, FFN), 1, "experts")     # W of gelu(x W) * (x V)
EXPERT_GATE = _matrix("moe/linear_v/w", lambda c: (c.num_experts, c.emb_size, c.ffn_size),
                      (EXPERTS, EMBED, FFN), 1, "experts")   # V
EXPERT_OUT = _matrix("moe/linear_1/w", lambda c: (c.num_experts, c.ffn_size, c.emb_size),
                     (EXPERTS, FFN, EMBED), 8, "experts")    # O, after the product

SHARED_IN = _matrix("shared_expert/linear/w", lambda c: (c.emb_size, c.shared_expert_ffn_size),
                    (EMBED, SHARED_FFN), 1, "experts", _has_shared_expert)
SHARED_GATE = _matrix("shared_expert/linear_v/w",
                      lambda c: (c.emb_size, c.shared_expert_ffn_size), (EMBED, SHARED_FFN), 1,
                      "experts", _has_shared_expert)
SHARED_OUT = _matrix("shared_expert/linear_1/w",
                     lambda c: (c.shared_expert_ffn_size, c.emb_size), (SHARED_FFN, EMBED), 1,
                     "experts", _has_shared_expert)
SHARED_EXPERT_GATE = _matrix("shared_expert_gate/w", lambda c: (c.emb_size, 1), (EMBED, None),
                             None, "norms and router", _has_shared_expert_gate)
DENSE_IN = _matrix("dense_mlp/linear/w", lambda c: (c.emb_size, c.dense_ffn_size),
                   (EMBED, DENSE_FFN), 1, "dense mlp", _has_dense_mlp)   # Grok-2's gate_proj
DENSE_GATE = _matrix("dense_mlp/linear_v/w", lambda c: (c.emb_size, c.dense_ffn_size),
                     (EMBED, DENSE_FFN), 1, "dense mlp", _has_dense_mlp)  # up_proj
DENSE_OUT = _matrix("dense_mlp/linear_1/w", lambda c: (c.dense_ffn_size, c.emb_size),
                    (DENSE_FFN, EMBED), 8, "dense mlp", _has_dense_mlp)  # down_proj

PARAMS: tuple[ParamSpec, ...] = (
    EMBEDDINGS, LM_HEAD, FINAL_NORM, QUERY, KEY, VALUE, ATTENTION_OUT, QUERY_BIAS, KEY_BIAS,
    VALUE_BIAS, QUERY_NORM, KEY_NORM, PRE_ATTENTION_NORM, POST_ATTENTION_NORM, PRE_MOE_NORM,
    POST_MOE_NORM, ROUTER, EXPERT_IN, EXPERT_GATE, EXPERT_OUT, SHARED_IN, SHARED_GATE,
    SHARED_OUT, SHARED_EXPERT_GATE, DENSE_IN, DENSE_GATE, DENSE_OUT)


def params_for(config: ModelConfig) -> tuple[ParamSpec, ...]:
  """The table's tensors that `config` has."""
  return tuple(spec for spec in PARAMS if spec.present(config))


def layer_params_for(config: ModelConfig) -> tuple[ParamSpec, ...]:
  return tuple(spec for spec in params_for(config) if spec.per_layer)

BY_NAME: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMS}
BY_PATH: dict[str, ParamSpec] = {spec.path: spec for spec in PARAMS}


def spec_for_release_name(name: str) -> tuple[ParamSpec, int | None]:
  """(spec, layer) of a release name such as transformer/decoder_layer_3/moe/linear/w."""
  match = _RELEASE_LAYER.match(name)
  if match:
    spec = BY_NAME.get(match[2])
    if spec is not None and spec.per_layer:
      return spec, int(match[1])
  elif name in BY_NAME and not BY_NAME[name].per_layer:
    return BY_NAME[name], None
  raise KeyError(f"{name} is not a parameter of the model")


def spec_of(name: str) -> ParamSpec:
  """The table entry of the tensor `name`, a release or an in-memory name."""
  spec = BY_PATH.get(name)
  if spec is None:
    spec, _ = spec_for_release_name(name)
  return spec


def row_blocks_for(name: str) -> int | None:
  """Scale row blocks the release uses for the tensor `name` (a release or an in-memory
  name); None if it stays float32."""
  return spec_of(name).row_blocks


@functools.partial(jax.jit, donate_argnums=0)
def write_layer(stack, leaf, layer):
  """stack [L, ...] (a pytree, such as a QuantizedWeight) with layer `layer` replaced by
  leaf [...], in place: the stack is donated, so no second stack is ever allocated."""
  return jax.tree.map(lambda whole, part: whole.at[layer].set(part), stack, leaf)


def release_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every release tensor's name and shape: one entry per layer for per-layer tensors."""
  shapes = {}
  for spec in params_for(config):
    layers = range(config.num_layers) if spec.per_layer else [None]
    for layer in layers:
      shapes[spec.release_name(layer)] = spec.layer_shape(config)
  return shapes


# --- Haiku trees {module: {param: leaf}} and flat {path: leaf}. ---

def split_path(path: str) -> tuple[str, str]:
  """'a/b/w' -> ('a/b', 'w'): the Haiku module path and the parameter name."""
  module, _, param = path.rpartition("/")
  return module, param


def flatten(params) -> dict[str, Any]:
  """Haiku params {module: {param: leaf}} -> {"module/param": leaf}; a flat dict is kept."""
  if params and all(not isinstance(value, dict) for value in params.values()):
    return dict(params)
  return {f"{module}/{name}": leaf
          for module, group in params.items() for name, leaf in group.items()}


def unflatten(flat) -> dict[str, dict[str, Any]]:
  """{"module/param": leaf} -> Haiku params {module: {param: leaf}}."""
  params: dict[str, dict[str, Any]] = {}
  for path, leaf in flat.items():
    module, param = split_path(path)
    params.setdefault(module, {})[param] = leaf
  return params


# --- The release form (one tensor per layer) and the stacked form. ---

def is_release_form(params) -> bool:
  """Whether `params` are named as the release (decoder_layer_{i}), not stacked."""
  return any(_RELEASE_LAYER.match(path) for path in flatten(params))


def _stack(leaves):
  """Leaves of one kind, layer by layer, as one [L, ...] leaf (QuantizedWeight stacks both parts)."""
  first = leaves[0]
  if isinstance(first, quant.QuantizedWeight):
    blocks = {leaf.scales.shape for leaf in leaves}
    if len(blocks) > 1:
      raise ConfigError("the layers' int8 weights of one kind must share one scale layout, "
                        f"got scales of shapes {sorted(blocks)}")
    return quant.QuantizedWeight(weight=_stack([leaf.weight for leaf in leaves]),
                                 scales=_stack([leaf.scales for leaf in leaves]))
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack([jnp.asarray(leaf) for leaf in leaves])


def check_release(flat: dict[str, Any], config: ModelConfig) -> None:
  """ConfigError unless release-named `flat` holds exactly the config's tensors and shapes."""
  expected = release_shapes(config)
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise ConfigError(
        f"params do not fit the config (num_layers={config.num_layers}): {len(missing)} "
        f"missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}. Pass the config the "
        "params were made for.")
  for name, shape in expected.items():
    if tuple(flat[name].shape) != shape:
      raise ConfigError(f"{name} has shape {tuple(flat[name].shape)}, the config needs "
                        f"{shape}. Pass the config the params were made for.")


def stack_release(params, config: ModelConfig) -> dict[str, dict[str, Any]]:
  """Release-named params (a Haiku tree or flat dict) -> the stacked in-memory tree.

  Copies every per-layer tensor into its stack; use it once, not per call.
  Raises ConfigError if a tensor is missing or has the wrong shape.
  """
  flat = flatten(params)
  check_release(flat, config)
  stacked = {}
  for spec in params_for(config):
    if spec.per_layer:
      stacked[spec.path] = _stack([flat[spec.release_name(layer)]
                                   for layer in range(config.num_layers)])
    else:
      stacked[spec.path] = flat[spec.name]
  return unflatten(stacked)


def as_stacked(params, config: ModelConfig) -> dict[str, dict[str, Any]]:
  """`params` in the stacked form, converting release-named params (a copy) if needed."""
  if is_release_form(params):
    return stack_release(params, config)
  return unflatten(flatten(params))


def check_stacked(params, config: ModelConfig) -> None:
  """ConfigError unless stacked `params` have exactly the table's tensors and shapes."""
  flat = flatten(params)
  expected = {spec.path: spec.stored_shape(config) for spec in params_for(config)}
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise ConfigError(f"params do not fit the model: {len(missing)} missing {missing[:3]}, "
                      f"{len(extra)} unexpected {extra[:3]}")
  for path, shape in expected.items():
    if tuple(flat[path].shape) != shape:
      raise ConfigError(f"{path} has shape {tuple(flat[path].shape)}, the config "
                        f"(num_layers={config.num_layers}) needs {shape}")


def layer_slice(leaf, layer: int):
  """One layer's tensor of a stacked leaf (QuantizedWeight slices both parts)."""
  return jax.tree.map(lambda part: part[layer], leaf)


def release_form(params) -> dict[str, Any]:
  """{release name: leaf} of params in either form, slicing stacked leaves by their
  leading [L] axis (no config needed: L is the stacks' own length)."""
  flat = flatten(params)
  if is_release_form(flat):
    return flat
  out = {}
  for path, leaf in flat.items():
    spec = BY_PATH.get(path)
    if spec is None:
      raise ConfigError(f"{path} is not a parameter of the model")
    if spec.per_layer:
      for layer in range(jax.tree.leaves(leaf)[0].shape[0]):
        out[spec.release_name(layer)] = layer_slice(leaf, layer)
    else:
      out[path] = leaf
  return out


def release_tensors(params, config: ModelConfig) -> Iterator[tuple[str, Any]]:
  """(release name, leaf) of every tensor, in the table's order, slicing stacked leaves."""
  flat = flatten(as_stacked(params, config))
  for spec in params_for(config):
    leaf = flat[spec.path]
    if spec.per_layer:
      for layer in range(config.num_layers):
        yield spec.release_name(layer), layer_slice(leaf, layer)
    else:
      yield spec.name, leaf


# --- Random and abstract parameters. ---

def _truncated_normal(rng: np.random.Generator, shape, stddev: float) -> np.ndarray:
  """Normal cut at 2 standard deviations, rescaled to `stddev` (as hk.initializers.TruncatedNormal)."""
  unit = rng.standard_normal(shape, dtype=np.float32)
  outside = np.abs(unit) > 2
  while outside.any():  # redraw the values past the cut
    unit[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32)
    outside = np.abs(unit) > 2
  return unit * np.float32(stddev / 0.87962566103423978)  # the std of a unit normal cut at +-2


def init_params(config: ModelConfig, seed: int = 0) -> dict[str, dict[str, Any]]:
  """Random float32 parameters in the stacked form.

  Norm scales are 1 and biases 0; every other tensor is truncated normal with standard
  deviation 1/sqrt(fan_in) (the input width: D for the embeddings and the
  router). Each layer's tensor is drawn on its own, in release-name order,
  so the values do not depend on the stacking.
  """
  rng = np.random.default_rng(seed)
  shapes = release_shapes(config)
  flat = {}
  for name in sorted(shapes):
    spec, _ = spec_for_release_name(name)
    if spec.fan_in_axis is None:
      flat[name] = np.full(shapes[name], spec.init_value, np.float32)
    else:
      fan_in = shapes[name][spec.fan_in_axis]
      flat[name] = _truncated_normal(rng, shapes[name], 1 / math.sqrt(fan_in))
  stacked = flatten(stack_release(flat, config))
  return unflatten({path: jnp.asarray(leaf) for path, leaf in stacked.items()})


def abstract_params(config: ModelConfig, form: str = "float32", layout=None):
  """The stacked parameter tree as ShapeDtypeStructs: no weights, no compute.

  `form` "float32": every tensor float32. "release": as the release stores
  them, int8 weights with bfloat16 scales (row blocks from the table, or
  `layout(spec)` when given) and float32 for the rest.
  """
  flat = {}
  for spec in params_for(config):
    shape = spec.stored_shape(config)
    if form == "float32" or not spec.quantized:
      flat[spec.path] = jax.ShapeDtypeStruct(shape, jnp.float32)
      continue
    blocks = spec.row_blocks if layout is None else layout(spec)
    *lead, _, cols = shape
    flat[spec.path] = quant.QuantizedWeight(
        weight=jax.ShapeDtypeStruct(shape, jnp.int8),
        scales=jax.ShapeDtypeStruct((*lead, blocks, cols), jnp.dtype(ml_dtypes.bfloat16)))
  return unflatten(flat)


def parameter_count(config: ModelConfig) -> int:
  return sum(math.prod(shape) for shape in release_shapes(config).values())

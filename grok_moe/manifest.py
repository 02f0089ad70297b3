"""The parameter tree of a config as the release lays it out: names, shapes, file order.

Parameter names are `module_path/param`, for example
`transformer/decoder_layer_3/moe/linear_1/w`. The release stores tensor i of
the tree flattened with its names sorted as strings in file `tensor{i:05d}_000`,
so layers come in the order 0, 1, 10, 11, ..., 19, 2, 20, ...
"""

from __future__ import annotations

from typing import NamedTuple

from grok_moe.config import ModelConfig


class TensorEntry(NamedTuple):
  file_index: int
  name: str
  shape: tuple[int, ...]


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every parameter's name and shape (V vocab, D emb, E experts, F ffn)."""
  V, D, E, F = config.vocab_size, config.emb_size, config.num_experts, config.ffn_size
  shapes = {
      "language_model/in_out_embed/embeddings": (V, D),
      "language_model/rms_norm/scale": (D,),
  }
  for layer in range(config.num_layers):
    prefix = f"transformer/decoder_layer_{layer}/"
    shapes.update({
        prefix + "moe/linear/w": (E, D, F),
        prefix + "moe/linear_1/w": (E, F, D),
        prefix + "moe/linear_v/w": (E, D, F),
        prefix + "multi_head_attention/key/w": (D, config.kv_size),
        prefix + "multi_head_attention/linear/w": (config.q_size, D),
        prefix + "multi_head_attention/query/w": (D, config.q_size),
        prefix + "multi_head_attention/value/w": (D, config.kv_size),
        prefix + "rms_norm/scale": (D,),
        prefix + "rms_norm_1/scale": (D,),
        prefix + "rms_norm_2/scale": (D,),
        prefix + "rms_norm_3/scale": (D,),
        prefix + "router/w": (D, E),
    })
  return shapes


def checkpoint_manifest(config: ModelConfig) -> list[TensorEntry]:
  """(file index, name, shape) of every tensor, in the release's file order."""
  shapes = parameter_shapes(config)
  return [TensorEntry(index, name, shapes[name])
          for index, name in enumerate(sorted(shapes))]


def split_name(name: str) -> tuple[str, str]:
  """'a/b/w' -> ('a/b', 'w'): the Haiku module path and the parameter name."""
  module, _, param = name.rpartition("/")
  return module, param


def flatten(params) -> dict[str, object]:
  """Haiku params {module: {param: leaf}} -> {"module/param": leaf}."""
  return {f"{module}/{name}": leaf
          for module, group in params.items() for name, leaf in group.items()}


def unflatten(flat) -> dict[str, dict[str, object]]:
  """{"module/param": leaf} -> Haiku params {module: {param: leaf}}."""
  params: dict[str, dict[str, object]] = {}
  for name, leaf in flat.items():
    module, param = split_name(name)
    params.setdefault(module, {})[param] = leaf
  return params

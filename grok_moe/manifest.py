"""The release's checkpoint layout, derived from the parameter table: names, shapes, file order.

Release names are `module_path/param`, one tensor per layer, for example
`transformer/decoder_layer_3/moe/linear_1/w`. The release stores tensor i of
the tree flattened with its names sorted as strings in file `tensor{i:05d}_000`,
so layers come in the order 0, 1, 10, 11, ..., 19, 2, 20, ...
"""

from __future__ import annotations

from typing import NamedTuple

from grok_moe import params as param_table
from grok_moe.config import ModelConfig


class TensorEntry(NamedTuple):
  file_index: int
  name: str
  shape: tuple[int, ...]


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every release tensor's name and shape (per layer), from `grok_moe.params.PARAMS`."""
  return param_table.release_shapes(config)


def checkpoint_manifest(config: ModelConfig) -> list[TensorEntry]:
  """(file index, name, shape) of every tensor, in the release's file order."""
  shapes = parameter_shapes(config)
  return [TensorEntry(index, name, shapes[name])
          for index, name in enumerate(sorted(shapes))]


split_name = param_table.split_path
flatten = param_table.flatten
unflatten = param_table.unflatten

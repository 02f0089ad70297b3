"""Random parameters and inputs for tests: seeded, release-shaped, of sensible size.

`random_params(config, layout, seed)` builds the flat {full name: weight} dict
of every tensor in `manifest.parameter_shapes(config)`:

- layout "float":   every weight a float32 array;
- layout "release": int8 weights with bfloat16 scales in the release's layouts
  (GROK1_SPEC.md): 8 row blocks for `multi_head_attention/linear` and
  `moe/linear_1`, one block (per output channel) for the other matrices;
- layout "swapped": the same with the layouts exchanged (8 blocks where the
  release has 1 and 1 where it has 8), so code that assumes the release's
  layouts fails.

Embeddings, norm scales and router weights stay float32 in every layout.

Sizes: each matrix is drawn so that a unit-RMS input gives outputs of RMS
about `0.58 * gain` (int8 uniform in [-127, 127] has RMS 127/sqrt(3), and the
scale is ~ 1/(127 * sqrt(fan_in))). Query and key get gain 5, so attention
logits (q.k / sqrt(d)) reach |s| ~ 30 and the soft cap bends them; the expert
input matrix gets gain 1.5 so gelu sees inputs well into its curved part.
Norm scales are uniform in [0.75, 1.25].
"""

from __future__ import annotations

import math

import pathlib

import ml_dtypes
import numpy as np
import sentencepiece as spm

from grok_moe import manifest
from grok_moe.quant import QuantizedWeight

LAYOUTS = ("float", "release", "swapped")

# The release's scale row blocks, from GROK1_SPEC.md (not from grok_moe.quant,
# which the tests check against this table).
RELEASE_ROW_BLOCKS = {
    "multi_head_attention/query/w": 1,
    "multi_head_attention/key/w": 1,
    "multi_head_attention/value/w": 1,
    "multi_head_attention/linear/w": 8,
    "moe/linear/w": 1,
    "moe/linear_v/w": 1,
    "moe/linear_1/w": 8,
}

# Output RMS per unit-RMS input, relative to ~0.58 (see the module docstring).
GAINS = {
    "multi_head_attention/query/w": 5.0,
    "multi_head_attention/key/w": 5.0,
    "moe/linear/w": 1.5,
}


def release_row_blocks(name: str) -> int | None:
  """Row blocks of `name` in the release; None for the float-only tensors."""
  for suffix, blocks in RELEASE_ROW_BLOCKS.items():
    if name.endswith(suffix):
      return blocks
  return None


def row_blocks(name: str, layout: str) -> int | None:
  """Row blocks of `name` in `layout`; None where the tensor is a float array."""
  blocks = release_row_blocks(name)
  if layout == "float" or blocks is None:
    return None
  if layout == "release":
    return blocks
  if layout == "swapped":
    return 1 if blocks == 8 else 8
  raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def random_weight(rng: np.random.Generator, shape, blocks: int | None, gain: float = 1.0):
  """A matrix [..., K, N]: float32 if blocks is None, else int8 with bf16 scales [..., R, N]."""
  *batch, fan_in, fan_out = shape
  if blocks is None:
    # Same RMS as the quantized draw: uniform in [-a, a] has RMS a / sqrt(3).
    bound = gain / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)
  weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
  scales = rng.uniform(0.5, 1.5, size=(*batch, blocks, fan_out)) * gain / (127 * math.sqrt(fan_in))
  return QuantizedWeight(weight=weight, scales=scales.astype(ml_dtypes.bfloat16))


def random_params(config, layout: str = "release", seed: int = 0) -> dict[str, object]:
  """Flat {full name: weight} for every parameter of `config` (see the module docstring)."""
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in manifest.parameter_shapes(config).items():
    if name.endswith("/scale"):
      params[name] = rng.uniform(0.75, 1.25, size=shape).astype(np.float32)
    elif name.endswith("embeddings"):
      params[name] = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
    elif name.endswith("router/w"):
      params[name] = rng.normal(0.0, 1 / math.sqrt(shape[0]), size=shape).astype(np.float32)
    else:
      gain = next((g for suffix, g in GAINS.items() if name.endswith(suffix)), 1.0)
      params[name] = random_weight(rng, shape, row_blocks(name, layout), gain)
  return params


def padded_tokens(config, seed: int = 0) -> np.ndarray:
  """Tokens [4, 9] with padding: none, trailing pads, a pad in the middle, pads at the start.

  Non-pad tokens are drawn from [1, vocab); the pad token is config.pad_token.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, config.vocab_size, size=(4, 9))
  pad = config.pad_token
  tokens[1, 6:] = pad      # trailing pads
  tokens[2, 4] = pad       # a pad in the middle
  tokens[3, :2] = pad      # pads at the start: query 0 sees no valid key at all
  return tokens.astype(np.int32)


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|, in float64."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def scaled_error(got, want) -> float:
  """max |got - want| / std(want): an error in units of the reference logits' spread."""
  return float(np.max(np.abs(np.asarray(got) - want)) / np.std(want))


def dequantized(leaf) -> np.ndarray:
  """A float leaf as float32, an int8 one as weight * scales in float32 (exact), computed
  here in NumPy, independently of grok_moe.quant."""
  if not isinstance(leaf, QuantizedWeight):
    return np.asarray(leaf, np.float32)
  weight, scales = np.asarray(leaf.weight), np.asarray(leaf.scales).astype(np.float32)
  *batch, rows, cols = weight.shape
  blocks = scales.shape[-2]
  blocked = weight.astype(np.float32).reshape(*batch, blocks, rows // blocks, cols)
  return (blocked * scales[..., :, None, :]).reshape(weight.shape)         # [..., K, N]



TOKENIZER_TEXT = ["ROMEO: But soft, what light through yonder window breaks?",
                  "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
                  "It is the east, and Juliet is the sun."] * 20


def train_char_tokenizer(path: pathlib.Path, extra_pieces: int = 0) -> int:
  """A char-level SentencePiece model of TOKENIZER_TEXT (about 35 pieces; pad 0, bos 1,
  eos 2, unk 3) plus `extra_pieces` unused pieces, written to `path`; returns its size."""
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TOKENIZER_TEXT), model_prefix=str(path.with_suffix("")),
      model_type="char", pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1,
      user_defined_symbols=[f"<extra{i}>" for i in range(extra_pieces)], minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()

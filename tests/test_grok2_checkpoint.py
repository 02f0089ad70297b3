"""Grok-2's released layout (docs/GROK2_SPEC.md, "The released checkpoint"): its config.json,
its weights split by tensor-parallel rank, and its tokenizer.tok.json.

No Grok-2 checkpoint is committed: `write_grok2_checkpoint` writes random params
(`params.init_params`) in the release's layout into a temporary directory. Its
config is TINY_GROK_2 with 8 query heads (so 2, 4 and 8 devices split the heads),
an expert FFN of 24 (so 2, 3, 4 and 8 ranks and devices split it) and a
vocabulary of 263 (Grok-2's tokenizer has all 256 bytes). Weights are float32, so
loading must give the source params bit for bit, or bfloat16 where a test says.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import hypothesis
import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest

from grok_moe import hf_checkpoint, model, quant, rank_files, sharding
from grok_moe import params as param_table
from grok_moe.config import GROK_2, TINY_GROK_2, ModelConfig
from grok_moe.errors import CheckpointError, TokenizerError
from grok_moe.safetensors_file import SafetensorsFile
from grok_moe.tokenizer import TiktokenTokenizer, open_tokenizer

CONFIG = TINY_GROK_2.replace(num_q_heads=8, expert_ffn_size=24, vocab_size=263,
                             widening_factor=24 / 40, bos_token=2)  # as config.json gives it
SEED = 3
SPECIAL_TOKENS = ("<|pad|>", "<|separator|>", "<|eos|>")  # ids 0, 1, 2: EOS is Grok-2's 2


# --- The fixture: a tiny checkpoint in Grok-2's layout. ---

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.int32): "I32"}


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  """A safetensors file: 8-byte header length, the JSON header, the tensors' bytes."""
  header, offset = {}, 0
  for name, array in tensors.items():
    header[name] = {"dtype": _ST_DTYPES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  text = json.dumps(header).encode()
  with open(path, "wb") as file:
    file.write(len(text).to_bytes(8, "little") + text)
    for array in tensors.values():
      file.write(np.ascontiguousarray(array).tobytes())


def grok2_config_json(config: ModelConfig) -> dict:
  """config.json in Grok-2's form (the spec's config table), for `config`; no model_type,
  pad/bos/eos ids (the release's are not known: the defaults must serve)."""
  return {
      "architectures": ["Grok1ForCausalLM"], "hidden_size": config.emb_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_q_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.key_size,
      "num_local_experts": config.num_experts,
      "num_experts_per_tok": config.num_selected_experts,
      "moe_intermediate_size": config.ffn_size, "intermediate_size": config.dense_ffn_size,
      "residual_moe": config.dense_ffn_size > 0, "vocab_size": config.vocab_size,
      "max_position_embeddings": config.sequence_len, "rms_norm_eps": config.rms_norm_eps,
      "embedding_multiplier_scale": config.embedding_multiplier_scale,
      "output_multiplier_scale": config.output_multiplier_scale,
      "attn_logit_softcapping": config.attn_logit_cap,
      "router_logit_softcapping": config.router_logit_cap,
      "final_logit_softcapping": config.final_logit_cap,
      "attn_temperature_len": config.attn_temperature_len, "rope_theta": config.rope_base,
      "rope_type": "original", "original_max_position_embeddings": config.sequence_len // 16,
      "scaling_factor": 16.0, "extrapolation_factor": 1.0, "attn_factor": 1.0,
      "beta_fast": 8, "beta_slow": 1, "torch_dtype": "bfloat16",
      "sliding_window_size": -1, "global_attn_every_n": 1,
  }


def grok2_tensors(params, config: ModelConfig):
  """{Hugging Face name: (array [out, in], rank_axis)}: the stacked params unstacked,
  per layer and per expert, through the loader's own name map."""
  flat = param_table.flatten(params)
  out = {}
  for spec in param_table.params_for(config):
    source = hf_checkpoint.SOURCES["grok2"][spec.name]
    leaf = np.asarray(flat[spec.path])
    for layer in range(config.num_layers) if spec.per_layer else [None]:
      tensor = leaf[layer] if spec.per_layer else leaf
      for expert in range(config.num_experts) if source.per_expert else [None]:
        one = tensor[expert] if source.per_expert else tensor
        one = one.swapaxes(-1, -2) if source.transpose else one
        out[source.name.format(layer=layer, expert=expert)] = (one, source.rank_axis)
  return out


def grok2_tokenizer_json(merges=("ab", "abc", " t")) -> dict:
  """A tiny tokenizer.tok.json: the specials at ids 0..2, the 256 bytes at 3..258, then
  a few merges."""
  special = [{"bytes": list(text.encode()), "token": i} for i, text in enumerate(SPECIAL_TOKENS)]
  regular = [{"bytes": [b], "token": 3 + b} for b in range(256)]
  regular += [{"bytes": list(text.encode()), "token": 259 + i} for i, text in enumerate(merges)]
  return {"regular_tokens": regular, "special_tokens": special, "word_split": "V1"}


def write_grok2_checkpoint(directory, config: ModelConfig = CONFIG, seed: int = SEED, *,
                           ranks: int = 8, dtype=np.float32):
  """Writes random params in Grok-2's layout; returns them (float32, stacked).

  Like the release (spec, "Files"), each file number holds one tensor kind: the
  rank-split expert kinds as PREFIX-TP-000 .. TP-{ranks-1} (rank r holding slice r
  of the split axis), the rest whole in PREFIX-TP-common files.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  params = param_table.init_params(config, seed)
  kinds: dict[str, dict[str, tuple[np.ndarray, int | None]]] = {}
  for name, (array, axis) in grok2_tensors(params, config).items():
    kind = re.sub(r"\.\d+\.", ".N.", name)  # one file number per kind, all layers
    kinds.setdefault(kind, {})[name] = (array.astype(dtype), axis)
  for number, tensors in enumerate(kinds.values(), start=1):
    prefix = directory / f"pytorch_model-{number:05d}"
    axis = next(iter(tensors.values()))[1]
    if axis is None:
      write_safetensors(pathlib.Path(f"{prefix}-TP-common.safetensors"),
                        {name: array for name, (array, _) in tensors.items()})
      continue
    for rank in range(ranks):
      write_safetensors(pathlib.Path(f"{prefix}-TP-{rank:03d}.safetensors"), {
          name: np.array_split(array, ranks, axis=axis)[rank]
          for name, (array, _) in tensors.items()})
  (directory / "config.json").write_text(json.dumps(grok2_config_json(config)))
  (directory / "tokenizer.tok.json").write_text(json.dumps(grok2_tokenizer_json()))
  return params


@pytest.fixture(scope="module")
def grok2_dir(tmp_path_factory):
  """(directory, source params) of the 8-rank float32 fixture, the params committed to the
  first device as the loader places them (so the forward pass compiles once for both)."""
  directory = tmp_path_factory.mktemp("grok2")
  source = write_grok2_checkpoint(directory)
  return directory, jax.device_put(source, jax.devices()[0])


@pytest.fixture(scope="module")
def source_logits(grok2_dir):
  """The float32 logits of TOKENS under the source params, on one device."""
  _, source = grok2_dir
  return np.asarray(model.forward(source, TOKENS, CONFIG, dtype=jnp.float32).logits)


def _assert_params_equal(loaded, source, dtype=np.float32):
  loaded, source = param_table.flatten(loaded), param_table.flatten(source)
  assert sorted(loaded) == sorted(source)
  for path, leaf in source.items():
    got = sharding.fetch(loaded[path])
    assert got.dtype == dtype, path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf).astype(dtype), path)


TOKENS = np.array([[5, 17, 200, 3, 99, 42, 7, 150, 11], [260, 1, 2, 0, 64, 8, 33, 201, 9]])


# --- Config. ---

def test_config_json_maps_to_the_config(grok2_dir):
  """Grok-2's config.json (no model_type; Grok1ForCausalLM) is recognised and gives back
  every field of the config it was written from, EOS 2 by default; dense MLP, caps,
  temperature, exact GELU and an untied lm_head included."""
  directory, _ = grok2_dir
  assert hf_checkpoint.is_hf_checkpoint(directory)
  loaded = hf_checkpoint.checkpoint_config(directory)
  assert loaded == CONFIG


def test_full_size_config_json_gives_the_grok_2_preset():
  """The spec's full-size values give GROK_2 (except the token ids, which the spec leaves
  open), and the rope_type / residual_moe rules hold: residual_moe false drops the dense
  MLP though intermediate_size is set; an absent rope_type is plain RoPE too."""
  hf = grok2_config_json(GROK_2)
  config = hf_checkpoint.model_config(hf)
  assert config == GROK_2.replace(bos_token=2, eos_token=2, pad_token=0)
  assert hf_checkpoint.model_config({**hf, "residual_moe": False}).dense_ffn_size == 0
  without_rope = {k: v for k, v in hf.items() if k != "rope_type"}
  assert hf_checkpoint.model_config(without_rope).rope_base == GROK_2.rope_base


@pytest.mark.parametrize("rope_type", ["yarn", "yarn_log", "theta_scale", "linear"])
def test_rope_types_other_than_original_are_refused(rope_type):
  """YaRN and the other scalings change the frequencies; they are not implemented, so such
  a config (rope_type, as SGLang reads it, or a Hugging Face rope_scaling) is refused by
  name, not run with plain RoPE."""
  with pytest.raises(CheckpointError, match=f"rope_type '{rope_type}' is not supported"):
    hf_checkpoint.model_config({**grok2_config_json(CONFIG), "rope_type": rope_type})
  hf = {k: v for k, v in grok2_config_json(CONFIG).items() if k != "rope_type"}
  with pytest.raises(CheckpointError, match=f"rope_type .*'{rope_type}'.* is not supported"):
    hf_checkpoint.model_config({**hf, "rope_scaling": {"rope_type": rope_type, "factor": 16}})


def test_grok_1_in_sglang_layout_is_refused_by_name():
  """Grok1ForCausalLM without any Grok-2 field (Grok-1 as SGLang saves it) is not taken
  for Grok-2."""
  hf = {k: v for k, v in grok2_config_json(CONFIG).items()
        if k not in hf_checkpoint._GROK2_FIELDS}  # pylint: disable=protected-access
  with pytest.raises(CheckpointError, match="Grok-1 in SGLang's layout"):
    hf_checkpoint.model_config(hf)


# --- The manifest at full size. ---

def test_grok_2_tensors_match_the_specs_table():
  """GROK_2's tensors, through the Grok-2 name map, have exactly the spec's names and full
  shapes [out, in] (its tensor table), and the table's count is S12's total,
  269,515,497,472 = parameter_count(GROK_2). Catches a tensor the map or table lacks or
  has extra, a wrong size in the preset, or a transposed source."""
  V, D, L, E, Fe, Fd, KV = 131_072, 8192, 64, 8, 16_384, 32_768, 1024
  table = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D),
           "model.norm.weight": (D,)}
  per_layer = {"pre_attn_norm.weight": (D,), "post_attn_norm.weight": (D,),
               "pre_moe_norm.weight": (D,), "post_moe_norm.weight": (D,),
               "self_attn.q_proj.weight": (D, D), "self_attn.k_proj.weight": (KV, D),
               "self_attn.v_proj.weight": (KV, D), "self_attn.o_proj.weight": (D, D),
               "mlp.gate_proj.weight": (Fd, D), "mlp.up_proj.weight": (Fd, D),
               "mlp.down_proj.weight": (D, Fd), "block_sparse_moe.gate.weight": (E, D)}
  per_expert = {"w1.weight": (Fe, D), "w3.weight": (Fe, D), "w2.weight": (D, Fe)}
  for l in range(L):
    table.update({f"model.layers.{l}.{name}": shape for name, shape in per_layer.items()})
    for e in range(E):
      table.update({f"model.layers.{l}.block_sparse_moe.experts.{e}.{name}": shape
                    for name, shape in per_expert.items()})
  assert sum(math.prod(shape) for shape in table.values()) == 269_515_497_472
  assert param_table.parameter_count(GROK_2) == 269_515_497_472

  shapes = {}
  for spec in param_table.params_for(GROK_2):
    source = hf_checkpoint.SOURCES["grok2"][spec.name]
    shape = spec.layer_shape(GROK_2)[1 if source.per_expert else 0:]
    shape = shape[:-2] + shape[::-1][:2] if source.transpose else shape
    for l in range(L) if spec.per_layer else [None]:
      for e in range(E) if source.per_expert else [None]:
        shapes[source.name.format(layer=l, expert=e)] = tuple(shape)
  assert shapes == table


# --- Weights. ---

def test_loads_the_source_params_exactly_on_one_device(grok2_dir, source_logits):
  """Every tensor, reassembled from 8 rank files (w1/w3 by rows, w2 by columns) and the
  common files, equals the source bit for bit, and the logits are the source params'.
  Catches a wrong name, a transpose, rank slices joined out of order or on the wrong
  axis, and a scaled lm_head."""
  directory, source = grok2_dir
  config, params = hf_checkpoint.load(directory)
  _assert_params_equal(params, source)
  got = model.forward(params, TOKENS, config, dtype=jnp.float32).logits
  np.testing.assert_array_equal(np.asarray(got), source_logits)


@pytest.mark.parametrize("mesh_shape, mode, run_forward", [
    ((1, 2), "tensor", False), ((2, 4), "expert", False), ((1, 8), "tensor", True)])
def test_loads_straight_into_a_meshs_shards(grok2_dir, source_logits, mesh_shape, mode,
                                            run_forward):
  """Loaded into the shards of a mesh (each device its plan's slice, read from the rank
  files that overlap it), every tensor has the plan's sharding and equals the source;
  on 1x8 the sharded forward pass gives the one-device logits (the other meshes' passes
  are the model's tests; each costs a compile). Tolerance: the mesh sums the experts'
  and heads' partial products in another order (float32 rounding: 1.8e-6 of the
  logits' spread, measured); 1e-5 catches any misplaced slice, which moves them by O(1)."""
  directory, source = grok2_dir
  plan = sharding.ShardingPlan(CONFIG, sharding.make_mesh(
      *mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)]), mode)
  config, params = hf_checkpoint.load(directory, sharding=plan)
  for path, leaf in param_table.flatten(params).items():
    assert leaf.sharding.spec == plan.weight_spec(path), path
  _assert_params_equal(params, source)
  if run_forward:
    got = sharding.fetch(model.forward(params, TOKENS, config, dtype=jnp.float32,
                                       sharding=plan).logits)
    error = np.max(np.abs(got - source_logits)) / np.std(source_logits)
    print(f"1x8 sharded logits: {error:.2e} of the spread")
    assert error < 1e-5


def test_a_shard_reads_only_the_rank_files_it_overlaps(tmp_path):
  """A block inside rank 2's slice (3 ranks of 8 rows) is read from TP-002 alone: the other
  ranks' data, overwritten with NaN, does not reach it; a block across ranks 0 and 1
  joins their slices. Catches reads of whole tensors or of ranks a device does not need."""
  config = CONFIG.replace(num_layers=1)
  source = write_grok2_checkpoint(tmp_path, config, ranks=3)
  name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
  whole = np.asarray(param_table.flatten(source)[param_table.EXPERT_IN.path])[0, 1].T  # [Fe, D]
  files = rank_files.RankFiles(tmp_path)
  assert files.num_ranks == 3
  np.testing.assert_array_equal(files.read(name, whole.shape, (slice(5, 11), slice(None)), 0),
                                whole[5:11])
  for path in tmp_path.glob("*-TP-00[01].safetensors"):
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    size = path.stat().st_size - header
    with open(path, "r+b") as file:
      file.seek(header)
      file.write(np.full(size // 4, np.nan, np.float32).tobytes())
  files = rank_files.RankFiles(tmp_path)
  np.testing.assert_array_equal(files.read(name, whole.shape, (slice(17, 23), slice(1, 30)), 0),
                                whole[17:23, 1:30])


@pytest.mark.parametrize("ranks, mesh_shape", [(2, None), (4, (1, 8)), (3, (1, 8))])
def test_other_rank_counts_load(tmp_path, ranks, mesh_shape):
  """Files split 2, 3 or 4 ways (not only the release's 8) load to the source, in
  bfloat16 as stored, on one device and on 8 devices whose slices straddle the ranks'
  (3 ranks of 8 rows, 8 devices of 3)."""
  source = write_grok2_checkpoint(tmp_path, ranks=ranks, dtype=ml_dtypes.bfloat16)
  plan = None if mesh_shape is None else sharding.ShardingPlan(
      CONFIG, sharding.make_mesh(*mesh_shape), "tensor")
  _, params = hf_checkpoint.load(tmp_path, sharding=plan)
  _assert_params_equal(params, source, np.dtype(ml_dtypes.bfloat16))


def test_the_tiny_grok_2_preset_loads_from_two_ranks(tmp_path):
  """TINY_GROK_2 itself (expert FFN 18: 9 rows per rank) round-trips through two rank files."""
  config = TINY_GROK_2.replace(vocab_size=263)
  source = write_grok2_checkpoint(tmp_path, config, ranks=2)
  loaded_config, params = hf_checkpoint.load(tmp_path)
  assert loaded_config.ffn_size == 18 and loaded_config.dense_ffn_size == 22
  _assert_params_equal(params, source)


def test_a_merged_bfloat16_checkpoint_loads(tmp_path):
  """Grok-2 with the rank slices joined into one model.safetensors (as republished
  merges store it), in bfloat16, loads through the ordinary one-file reader. Catches
  bfloat16 refused as "not a float tensor" (numpy does not count it as floating)."""
  config = CONFIG.replace(num_layers=1)
  source = param_table.init_params(config, SEED)
  write_safetensors(tmp_path / "model.safetensors", {
      name: array.astype(ml_dtypes.bfloat16)
      for name, (array, _) in grok2_tensors(source, config).items()})
  (tmp_path / "config.json").write_text(json.dumps(grok2_config_json(config)))
  _, params = hf_checkpoint.load(tmp_path)
  _assert_params_equal(params, source, np.dtype(ml_dtypes.bfloat16))


def test_int8_on_the_way_in(grok2_dir):
  """quantize="int8" into a 1x2 mesh's shards: every quantized matrix (experts, dense MLP,
  attention) is exactly quant.quantize of the source layer, with the table's row blocks
  (where they divide the rows): the expert slices were joined across the ranks before
  the scales were taken (a column's scale needs all its rows). The rest stays float32."""
  directory, source = grok2_dir
  plan = sharding.ShardingPlan(CONFIG, sharding.make_mesh(1, 2, devices=jax.devices()[:2]),
                               "tensor")
  _, params = hf_checkpoint.load(directory, sharding=plan, quantize="int8")
  flat, source = param_table.flatten(params), param_table.flatten(source)
  for spec in param_table.params_for(CONFIG):
    leaf = flat[spec.path]
    if not spec.quantized:
      assert leaf.dtype == jnp.float32, spec.path
      continue
    assert leaf.weight.sharding.spec == plan.weight_spec(spec.path), spec.path
    for layer in range(CONFIG.num_layers):
      matrix = np.asarray(source[spec.path][layer])
      want = quant.quantize(matrix, row_blocks=spec.blocks_for_rows(matrix.shape[-2]))
      np.testing.assert_array_equal(sharding.fetch(leaf.weight)[layer], want.weight, spec.path)
      np.testing.assert_array_equal(sharding.fetch(leaf.scales)[layer], want.scales, spec.path)


def _copy(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  target.mkdir()
  for path in source.iterdir():
    (target / path.name).write_bytes(path.read_bytes())
  return target


def _expert_file(directory: pathlib.Path, rank: int, kind: str = "w1") -> pathlib.Path:
  """The rank file holding the `kind` expert tensors."""
  for path in sorted(directory.glob(f"*-TP-{rank:03d}.safetensors")):
    if any(name.endswith(f".{kind}.weight") for name in SafetensorsFile(path).names()):
      return path
  raise AssertionError(kind)


def test_errors_name_the_file(grok2_dir, tmp_path):
  """A missing rank file (one of a kind's, or the last rank of all), a rank slice of the
  wrong shape, ranks of differing dtypes, a tensor that is not a float and a missing
  tensor are CheckpointErrors naming the file or tensor."""
  source, _ = grok2_dir
  directory = _copy(source, tmp_path / "missing")
  missing = _expert_file(directory, 3)
  missing.unlink()
  with pytest.raises(CheckpointError, match=re.escape(f"{missing} is missing")):
    hf_checkpoint.load(directory)

  directory = _copy(source, tmp_path / "last_rank")  # the highest rank gone everywhere
  for path in directory.glob("*-TP-007.safetensors"):
    path.unlink()
  with pytest.raises(CheckpointError, match="split into 7 equal slices.*A rank file is missing"):
    hf_checkpoint.load(directory)

  directory = _copy(source, tmp_path / "shape")
  wrong = _expert_file(directory, 5, "w2")
  view = SafetensorsFile(wrong)
  write_safetensors(wrong, {name: np.zeros((CONFIG.emb_size, 4), np.float32)
                            for name in view.names()})
  with pytest.raises(CheckpointError, match=re.escape(f"{wrong}: model.layers.0.")):
    hf_checkpoint.load(directory)

  directory = _copy(source, tmp_path / "rank_dtype")  # one rank in bfloat16, the rest float32
  odd = _expert_file(directory, 6, "w3")
  view = SafetensorsFile(odd)
  write_safetensors(odd, {name: np.asarray(view.view(name)).astype(ml_dtypes.bfloat16)
                          for name in view.names()})
  with pytest.raises(CheckpointError, match=re.escape(f"{odd}: model.layers.0.") +
                     ".* is bfloat16 but .* holds it as float32"):
    hf_checkpoint.load(directory)

  directory = _copy(source, tmp_path / "dtype")
  common = next(p for p in sorted(directory.glob("*-TP-common.safetensors"))
                if "model.norm.weight" in SafetensorsFile(p).names())
  write_safetensors(common, {"model.norm.weight": np.zeros(CONFIG.emb_size, np.int32)})
  with pytest.raises(CheckpointError, match=re.escape(f"{common}: model.norm.weight is int32")):
    hf_checkpoint.load(directory)
  common.unlink()
  with pytest.raises(CheckpointError, match="has no tensor model.norm.weight"):
    hf_checkpoint.load(directory)


# --- The tokenizer. ---

def test_tokenizer_round_trips_text_with_special_tokens_and_splits_digits(grok2_dir):
  """tokenizer.tok.json is found beside the checkpoint and opened with tiktoken: text with
  special-token text, digits, contractions, newlines and non-ASCII decodes back to
  itself, the specials become their ids (no BOS added), each digit is its own token,
  and merges apply within words."""
  directory, _ = grok2_dir
  from grok_moe.api import find_tokenizer
  path = find_tokenizer(directory)
  assert path.endswith("tokenizer.tok.json")
  tokenizer = open_tokenizer(path)
  assert isinstance(tokenizer, TiktokenTokenizer) and tokenizer.vocab_size == 262
  tokenizer.check_fits(CONFIG)
  text = "Human: abc 2024 isn't it?<|separator|>\n\nAssistant: héllo<|eos|>"
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert ids[:3] == [3 + ord("H"), 3 + ord("u"), 3 + ord("m")]        # no BOS
  assert 1 in ids and ids[-1] == 2                                      # separator, eos
  assert 260 in ids                                                     # the merge "abc"
  digits = [3 + ord(d) for d in "2024"]
  assert [i for i in ids if i in digits] == digits                      # one token a digit
  assert tokenizer.encode("12") == [3 + ord("1"), 3 + ord("2")]
  assert tokenizer.piece(2) == "<|eos|>" and tokenizer.unknown_characters(text) == []
  assert tokenizer.decode([261, 300]) == " t\ufffd"                     # an id it lacks


def test_the_v1_pattern_splits_as_the_spec_says():
  """The V1 pre-tokenizer's seven alternatives, one case each: contractions (any case),
  a leading non-letter joined to letters, single digits, punctuation with a leading space
  and trailing newlines, newline runs, and trailing whitespace."""
  import regex
  from grok_moe.tokenizer import GROK2_WORD_SPLIT_V1
  split = regex.compile(GROK2_WORD_SPLIT_V1).findall
  assert split("I'M here's 123") == ["I", "'M", " here", "'s", " ", "1", "2", "3"]
  assert split("$hello world!!\n\n  x  ") == ["$hello", " world", "!!\n\n", " ", " x", "  "]
  assert split("a\n  \nb") == ["a", "\n  \n", "b"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(word_split="V2"), "word_split is 'V2'"),
    (lambda d: d["regular_tokens"].pop(10), r"single byte\(s\) \[10\]"),
    (lambda d: d["regular_tokens"].append({"bytes": [97, 98, 100], "token": 0}), "same id"),
    (lambda d: d["special_tokens"].append({"bytes": [255], "token": 300}), "not UTF-8"),
    (lambda d: d["regular_tokens"][4].update(bytes=[300]), "integers 0..255"),
    (lambda d: d["regular_tokens"][4].update(token="x"), "token 'x'"),
    (lambda d: d.update(vocab_size=1000), "vocab_size 1000"),
    (lambda d: d.update(pat_str="(unclosed"), "pat_str does not compile"),
    (lambda d: d.update(pat_str=r"\p{L}+"), "pat_str skips the text ': '"),
    (lambda d: d.update(pat_str=r"\S*|\s"), "pat_str matches empty text"),
    (lambda d: d.update(special_tokens={"a": 1}), "special_tokens is not a list"),
    (lambda d: d.clear(), "regular_tokens is not a list"),
])
def test_malformed_tokenizer_files_are_refused_naming_the_file(tmp_path, change, message):
  """Each malformed tokenizer.tok.json is a TokenizerError naming the file and the problem,
  never a crash inside tiktoken (which panics on a missing single byte)."""
  data = grok2_tokenizer_json()
  change(data)
  path = tmp_path / "tokenizer.tok.json"
  path.write_text(json.dumps(data))
  with pytest.raises(TokenizerError, match=re.escape(str(path)) + ".*" + message):
    TiktokenTokenizer(path)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6)


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(field=st.sampled_from(["regular_tokens", "special_tokens", "word_split",
                                         "pat_str", "vocab_size"]),
                  index=st.integers(0, 300), key=st.sampled_from(["bytes", "token", None]),
                  value=_JSON_VALUES)
def test_mutated_tokenizer_files_open_or_are_refused(field, index, key, value):
  """Any one field or entry of tokenizer.tok.json replaced by a random JSON value gives a
  tokenizer that round-trips text, or a TokenizerError naming the file: never another
  exception (or a tiktoken panic, which would end the process)."""
  data = grok2_tokenizer_json()
  entries = data[field] if field in ("regular_tokens", "special_tokens") else None
  if entries is None:
    data[field] = value
  elif key is None:
    entries[index % len(entries)] = value
  else:
    entries[index % len(entries)][key] = value
  with tempfile.TemporaryDirectory() as directory:
    path = pathlib.Path(directory) / "tokenizer.tok.json"
    path.write_text(json.dumps(data))
    try:
      tokenizer = TiktokenTokenizer(path)
    except TokenizerError as error:
      assert str(path) in str(error)
      return
  text = "Human: abc 12<|eos|>\n"
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_file_that_is_not_json_is_refused(tmp_path):
  """Bytes that are not JSON (a truncated download) get a TokenizerError naming the file."""
  path = tmp_path / "tokenizer.tok.json"
  path.write_text(json.dumps(grok2_tokenizer_json())[:500])
  with pytest.raises(TokenizerError, match=re.escape(str(path)) + ".*not JSON"):
    open_tokenizer(path)


def test_vocab_size_in_the_file_is_honoured(tmp_path):
  """A vocab_size that counts the tokens exactly is passed on and is the tokenizer's size."""
  data = grok2_tokenizer_json()
  data["vocab_size"] = 262
  path = tmp_path / "tokenizer.tok.json"
  path.write_text(json.dumps(data))
  assert TiktokenTokenizer(path).vocab_size == 262


# --- End to end. ---

def test_command_line_completes_text(grok2_dir, capsys):
  """`grok-moe --checkpoint <grok-2 dir> --prompt ...` finds the config, the rank files and
  tokenizer.tok.json, and prints the prompt and what the token-level API continues it with."""
  from grok_moe import cli
  from grok_moe.api import Model
  directory, _ = grok2_dir
  code = cli.main(["--checkpoint", str(directory), "--prompt", "Human: abc",
                   "--max-new-tokens", "4", "--temperature", "0", "--compilation-cache", "off"])
  out = capsys.readouterr().out
  assert code == 0 and out.startswith("Human: abc")
  grok = Model.from_checkpoint(directory, compilation_cache=False)
  expected = grok.tokenizer.decode(grok.generate_tokens(grok.encode("Human: abc"),
                                                        max_new_tokens=4, temperature=0))
  assert out == "Human: abc" + expected + "\n"

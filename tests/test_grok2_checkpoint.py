"""Grok-2's released layout (docs/GROK2_SPEC.md, "The released checkpoint"): its config.json,
its weights split by tensor-parallel rank, and its tokenizer.tok.json.

`write_grok2_checkpoint` saves random params (`params.init_params`) in the
release's layout into a temporary directory with the package's own writer
(`save_checkpoint(..., format="safetensors")`), so the tests check saving and
loading together, and each file's layout against the spec. The same checkpoint
is committed in tests/data/families/grok2 (scripts/build_grok2_fixture.py) for
`run.py --checkpoint`; a test checks it is byte for byte what the writer saves. Its
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

from grok_moe import checkpoint, convert, hf_checkpoint, model, quant, rank_files, sharding
from grok_moe import params as param_table
from grok_moe.config import GROK_2, TINY_GROK_2, ModelConfig
from grok_moe.errors import CheckpointError, TokenizerError
from grok_moe.safetensors_file import SafetensorsFile, write_safetensors
from grok_moe.tokenizer import TiktokenTokenizer, open_tokenizer
from tests import helpers

CONFIG = TINY_GROK_2.replace(num_q_heads=8, expert_ffn_size=24, vocab_size=263,
                             widening_factor=24 / 40, bos_token=2)  # as config.json gives it
SEED = 3
# The committed checkpoint of CONFIG's random params (SEED) in Grok-2's layout, written by
# scripts/build_grok2_fixture.py with the package's own writer.
FIXTURE_DIR = pathlib.Path(__file__).parent / "data" / "families" / "grok2"


# --- The fixture: a tiny checkpoint in Grok-2's layout. ---

# The spec's config table at full size, as the release's config.json has it (no token ids).
SPEC_CONFIG_JSON = {
    "architectures": ["Grok1ForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16384,
    "intermediate_size": 32768, "residual_moe": True, "vocab_size": 131072,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "embedding_multiplier_scale": 90.50966799187809, "output_multiplier_scale": 0.5,
    "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0,
    "final_logit_softcapping": 50, "attn_temperature_len": 1024, "rope_theta": 208533496,
    "rope_type": "original", "original_max_position_embeddings": 8192,
    "scaling_factor": 16.0, "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8,
    "beta_slow": 1, "torch_dtype": "bfloat16", "sliding_window_size": -1,
    "global_attn_every_n": 1,
}


def grok2_tokenizer_json() -> dict:
  """The committed fixture's tokenizer.tok.json (scripts/build_grok2_fixture.py): the
  specials at ids 0..2, the 256 bytes at 3..258, then the merges "ab", "abc", " t"."""
  return json.loads((FIXTURE_DIR / "tokenizer.tok.json").read_text())


def write_grok2_checkpoint(directory, config: ModelConfig = CONFIG, seed: int = SEED, *,
                           ranks: int = 8, dtype=np.float32):
  """Saves random params in Grok-2's layout with the package's writer (`save_checkpoint`,
  format="safetensors": the expert kinds in `ranks` rank files, the rest in common
  files), and a tokenizer.tok.json beside them; returns the params (float32, stacked)."""
  directory = pathlib.Path(directory)
  params = param_table.init_params(config, seed)
  checkpoint.save_checkpoint(params, directory, config, format="safetensors", ranks=ranks,
                             dtype=dtype, progress=False)
  (directory / "tokenizer.tok.json").write_text(json.dumps(grok2_tokenizer_json()))
  return params


def rewrite_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  """Replace the file `path` by one holding `tensors`, with the package's writer."""
  path.unlink(missing_ok=True)
  write_safetensors(path, [(name, array.dtype, array.shape) for name, array in tensors.items()],
                    tensors.__getitem__)


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


def test_config_json_round_trips_with_every_switch_off():
  """A Grok-2 config with no dense MLP, no caps and no temperature is written (caps and
  length off as SGLang's -1, residual_moe false) and read back equal; a rope_base that
  SGLang's int() would change is refused. Catches an off switch written as 0 (which
  the reader takes as its default 30) or a dropped field."""
  config = CONFIG.replace(dense_ffn_size=0, attn_logit_cap=0.0, router_logit_cap=0.0,
                          final_logit_cap=0.0, attn_temperature_len=0)
  hf = hf_checkpoint.hf_config(config)
  assert hf["residual_moe"] is False and hf["attn_logit_softcapping"] == -1
  assert hf_checkpoint.model_config(hf) == config
  with pytest.raises(CheckpointError, match=r"closest: grok2, which differs in \['rope_base'\]"):
    hf_checkpoint.hf_config(config.replace(rope_base=10_000.5))


def test_full_size_config_json_gives_the_grok_2_preset():
  """The spec's full-size values give GROK_2 (except the token ids, which the spec leaves
  open), the writer (`hf_config`) gives every value it writes back as the spec has it
  (catches a field saved in another spelling than the release's), and the rope_type /
  residual_moe rules hold: residual_moe false drops the dense
  MLP though intermediate_size is set; an absent rope_type is plain RoPE too."""
  hf = SPEC_CONFIG_JSON
  config = hf_checkpoint.model_config(hf)
  assert config == GROK_2.replace(bos_token=2, eos_token=2, pad_token=0)
  written = hf_checkpoint.hf_config(config)  # the writer gives the release's values back
  assert {k: written[k] for k in written if k in hf} == {k: hf[k] for k in written if k in hf}
  assert set(hf) - set(written) == {"torch_dtype", "sliding_window_size",  # (hf_save: dtype)
                                    "global_attn_every_n"}                # (not read)
  assert hf_checkpoint.model_config({**hf, "residual_moe": False}).dense_ffn_size == 0
  without_rope = {k: v for k, v in hf.items() if k != "rope_type"}
  assert hf_checkpoint.model_config(without_rope).rope_base == GROK_2.rope_base


@pytest.mark.parametrize("rope_type", ["yarn", "yarn_log", "theta_scale", "linear"])
def test_rope_types_other_than_original_are_refused(rope_type):
  """YaRN and the other scalings change the frequencies; they are not implemented, so such
  a config (rope_type, as SGLang reads it, or a Hugging Face rope_scaling) is refused by
  name, not run with plain RoPE."""
  with pytest.raises(CheckpointError, match=f"rope_type '{rope_type}' is not supported"):
    hf_checkpoint.model_config({**hf_checkpoint.hf_config(CONFIG), "rope_type": rope_type})
  hf = {k: v for k, v in hf_checkpoint.hf_config(CONFIG).items() if k != "rope_type"}
  with pytest.raises(CheckpointError, match=f"rope_type .*'{rope_type}'.* is not supported"):
    hf_checkpoint.model_config({**hf, "rope_scaling": {"rope_type": rope_type, "factor": 16}})


def test_grok_1_in_sglang_layout_is_refused_by_name():
  """Grok1ForCausalLM without any Grok-2 field (Grok-1 as SGLang saves it) is not taken
  for Grok-2."""
  hf = {k: v for k, v in hf_checkpoint.hf_config(CONFIG).items()
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
    error = helpers.scaled_error(got, source_logits)
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
  """TINY_GROK_2 itself (expert FFN 18: 9 rows per rank) round-trips through two rank files
  (its widening_factor set as config.json gives it, expert FFN / emb_size: the preset
  keeps TINY's, which a save refuses as not round-tripping)."""
  config = TINY_GROK_2.replace(vocab_size=263, widening_factor=18 / TINY_GROK_2.emb_size)
  source = write_grok2_checkpoint(tmp_path, config, ranks=2)
  loaded_config, params = hf_checkpoint.load(tmp_path)
  assert loaded_config.ffn_size == 18 and loaded_config.dense_ffn_size == 22
  _assert_params_equal(params, source)


def test_a_merged_bfloat16_checkpoint_loads(tmp_path):
  """Grok-2 with the rank slices joined into one model.safetensors (as republished
  merges store it), in bfloat16, loads through the ordinary one-file reader. Catches
  bfloat16 refused as "not a float tensor" (numpy does not count it as floating).
  The merge: a one-rank save (every tensor whole), its files' tensors in one file."""
  config = CONFIG.replace(num_layers=1)
  source = write_grok2_checkpoint(tmp_path / "ranked", config, ranks=1,
                                  dtype=ml_dtypes.bfloat16)
  files = [SafetensorsFile(path) for path in sorted((tmp_path / "ranked").glob("*-TP-*"))]
  merged = {name: np.asarray(file.view(name)) for file in files for name in file.names()}
  (tmp_path / "merged").mkdir()
  rewrite_safetensors(tmp_path / "merged" / "model.safetensors", merged)
  (tmp_path / "merged" / "config.json").write_bytes((tmp_path / "ranked" / "config.json")
                                                    .read_bytes())
  _, params = hf_checkpoint.load(tmp_path / "merged")
  _assert_params_equal(params, source, np.dtype(ml_dtypes.bfloat16))


# --- Saving in the release's layout. ---

def test_save_writes_the_releases_files_names_and_shapes(grok2_dir):
  """The saved directory (8 ranks) is the spec's layout: files pytorch_model-NNNNN-TP-RRR /
  TP-common numbered 1..n, one tensor kind per number; the expert kinds in TP-000 .. 007
  only, rank r holding rows (w1, w3) or columns (w2) r*3 .. r*3+3 of the source's [out,
  in] tensor; every other tensor whole in a common file with the spec's name and [out,
  in] shape; no index; config.json without model_type. Catches a wrong file name, split
  axis, slice order, name or transpose, and an expert tensor left whole."""
  directory, source = grok2_dir
  flat = {path: np.asarray(leaf) for path, leaf in param_table.flatten(source).items()}
  D, V, Fd, E = CONFIG.emb_size, CONFIG.vocab_size, CONFIG.dense_ffn_size, CONFIG.num_experts
  width = CONFIG.ffn_size // 8                                 # 3 rows (or columns) a rank
  Q, KV = CONFIG.num_q_heads * CONFIG.key_size, CONFIG.num_kv_heads * CONFIG.key_size
  whole = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D),
           "model.norm.weight": (D,)}
  per_layer = {"pre_attn_norm.weight": (D,), "post_attn_norm.weight": (D,),
               "pre_moe_norm.weight": (D,), "post_moe_norm.weight": (D,),
               "self_attn.q_proj.weight": (Q, D), "self_attn.k_proj.weight": (KV, D),
               "self_attn.v_proj.weight": (KV, D), "self_attn.o_proj.weight": (D, Q),
               "mlp.gate_proj.weight": (Fd, D), "mlp.up_proj.weight": (Fd, D),
               "mlp.down_proj.weight": (D, Fd), "block_sparse_moe.gate.weight": (E, D)}
  for layer in range(CONFIG.num_layers):
    whole.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
  experts = {"w1": (param_table.EXPERT_IN.path, 0), "w3": (param_table.EXPERT_GATE.path, 0),
             "w2": (param_table.EXPERT_OUT.path, 1)}  # table entry, the axis ranks split
  names = sorted(path.name for path in directory.glob("*.safetensors"))
  pattern = re.compile(r"pytorch_model-(\d{5})-TP-(\d{3}|common)\.safetensors")
  assert all(pattern.fullmatch(name) for name in names), names
  numbers = sorted({int(pattern.fullmatch(name)[1]) for name in names})
  assert numbers == list(range(1, len(numbers) + 1))
  common, ranked = {}, {}
  for name in names:
    number, rank = pattern.fullmatch(name).groups()
    file = SafetensorsFile(directory / name)
    kinds = {re.sub(r"\.\d+\.", ".N.", tensor) for tensor in file.names()}
    assert len(kinds) == 1, (name, kinds)                      # one kind per file number
    for tensor in file.names():
      if rank == "common":
        common[tensor] = file.shape(tensor)
        continue
      match = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\."
                           r"(w[123])\.weight", tensor)
      assert match, (name, tensor)
      layer, expert, kind = int(match[1]), int(match[2]), match[3]
      path, axis = experts[kind]
      full = flat[path][layer, expert].T                       # [out, in]
      r = int(rank)
      cut = slice(r * width, (r + 1) * width)
      want = full[cut] if axis == 0 else full[:, cut]
      np.testing.assert_array_equal(file.view(tensor), want, f"{name} {tensor}")
      ranked.setdefault(tensor, set()).add(r)
  assert common == whole
  assert len(ranked) == CONFIG.num_layers * E * 3
  assert all(ranks == set(range(8)) for ranks in ranked.values())
  assert len(names) == len(numbers) - 3 + 3 * 8                # 3 expert kinds x 8 ranks
  hf = json.loads((directory / "config.json").read_text())
  assert "model_type" not in hf and hf["torch_dtype"] == "float32"
  assert not (directory / hf_checkpoint.INDEX_FILE).exists()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_save_and_load_round_trip_bit_exact(tmp_path, dtype):
  """Params held in float32 or bfloat16, saved in 4 ranks (dtype as held), load back bit
  for bit in that dtype with an equal config. Catches a cast on the way out or in, and
  a config.json field that does not round-trip."""
  source = jax.tree.map(lambda leaf: np.asarray(leaf).astype(dtype),
                        param_table.init_params(CONFIG, SEED))
  checkpoint.save_checkpoint(source, tmp_path, CONFIG, format="safetensors", ranks=4,
                             progress=False)
  assert rank_files.RankFiles(tmp_path).num_ranks == 4
  config, params = hf_checkpoint.load(tmp_path)
  assert config == CONFIG
  _assert_params_equal(params, source, np.dtype(dtype))


def test_params_sharded_on_a_mesh_save_as_on_one_device(grok2_dir, tmp_path):
  """Params loaded into a 1x8 mesh's shards (8 slices of 3 along the expert FFN axis)
  save in 3 ranks of 8 (each rank's slice straddles devices) to the source exactly.
  Catches a rank slice read from the wrong devices or the wrong part of a shard."""
  directory, source = grok2_dir
  plan = sharding.ShardingPlan(CONFIG, sharding.make_mesh(1, 8), "tensor")
  _, params = hf_checkpoint.load(directory, sharding=plan)
  checkpoint.save_checkpoint(params, tmp_path, CONFIG, format="safetensors", ranks=3,
                             progress=False)
  _, loaded = hf_checkpoint.load(tmp_path)
  _assert_params_equal(loaded, source)


def test_int8_params_save_dequantized_and_split_by_rank(tmp_path):
  """int8 params (numpy, every quantized matrix in the table's row blocks) save in 3
  ranks as their dequantized float32 values, each rank's slice cut after dequantizing.
  Catches a slice cut before the scales apply (the scales follow row blocks, not
  ranks)."""
  config = CONFIG.replace(num_layers=1)
  flat = param_table.flatten(param_table.init_params(config, SEED))
  for spec in param_table.params_for(config):
    if spec.quantized:
      rows = flat[spec.path].shape[-2]
      flat[spec.path] = quant.quantize(flat[spec.path], row_blocks=spec.blocks_for_rows(rows))
  checkpoint.save_checkpoint(param_table.unflatten(flat), tmp_path, config,
                             format="safetensors", ranks=3, progress=False)
  _, loaded = hf_checkpoint.load(tmp_path)
  want = {path: helpers.dequantized(leaf) for path, leaf in flat.items()}
  _assert_params_equal(loaded, param_table.unflatten(want))


@pytest.mark.parametrize("options, message", [
    (dict(ranks=5), "ranks=5 does not divide the 24 of axis 0 of .*w1.weight"),
    (dict(ranks=0), "ranks must be a positive integer, got 0"),
    (dict(max_shard_bytes=4096), "max_shard_bytes= does not apply to grok2"),
])
def test_a_rank_count_that_does_not_split_is_refused_before_writing(tmp_path, options, message):
  """ranks that do not divide the expert FFN size (24), a rank count below 1 and a shard
  size (the release has one file per kind and rank) are one-line CheckpointErrors, and
  nothing is written. Catches unequal rank slices, which no reader can join."""
  params = param_table.init_params(CONFIG.replace(num_layers=1), SEED)
  with pytest.raises(CheckpointError, match=message):
    checkpoint.save_checkpoint(params, tmp_path / "out", CONFIG.replace(num_layers=1),
                               format="safetensors", progress=False, **options)
  assert not (tmp_path / "out").exists()


def test_ranks_apply_only_to_grok_2_safetensors(tmp_path):
  """ranks= with the release format, or for a family saved whole (Mixtral), is refused
  by name rather than ignored."""
  params = param_table.init_params(CONFIG.replace(num_layers=1), SEED)
  with pytest.raises(CheckpointError, match="apply to format=\"safetensors\""):
    checkpoint.save_checkpoint(params, tmp_path / "release", CONFIG.replace(num_layers=1),
                               ranks=2)
  mixtral = hf_checkpoint.model_config(hf_checkpoint.read_hf_config(
      pathlib.Path(__file__).parent / "data" / "families" / "mixtral"))
  with pytest.raises(CheckpointError, match="ranks= applies to Grok-2's rank-split layout"):
    checkpoint.save_checkpoint(param_table.init_params(mixtral, SEED), tmp_path / "mixtral",
                               mixtral, format="safetensors", ranks=2, progress=False)


def test_a_save_over_more_ranks_leaves_no_stale_rank_files(tmp_path):
  """Saving 2 ranks over an 8-rank save (overwrite=True) removes TP-002 .. TP-007, so the
  directory loads as 2 ranks. Catches the old save's rank files left to be read."""
  config = CONFIG.replace(num_layers=1)
  params = param_table.init_params(config, SEED)
  for ranks in (8, 2):
    checkpoint.save_checkpoint(params, tmp_path, config, format="safetensors", ranks=ranks,
                               overwrite=True, progress=False)
  assert not list(tmp_path.glob("*-TP-00[2-7].safetensors"))
  assert rank_files.RankFiles(tmp_path).num_ranks == 2
  _, loaded = hf_checkpoint.load(tmp_path)
  _assert_params_equal(loaded, params)


def test_convert_saves_grok_2_in_its_layout(grok2_dir, tmp_path, capsys):
  """python -m grok_moe.convert on a Grok-2 directory, --format safetensors --ranks 4
  --dtype bfloat16: exit 0, four rank files per expert kind, tokenizer.tok.json copied,
  and the params load back as the source rounded once to bfloat16; --ranks 5 (not a
  divisor of 24) is one error line, exit 2, nothing written."""
  directory, source = grok2_dir
  assert convert.main([str(directory), str(tmp_path / "five"), "--format", "safetensors",
                       "--ranks", "5"]) == 2
  assert capsys.readouterr().err.startswith("error: ranks=5 does not divide the 24")
  assert not (tmp_path / "five").exists()
  target = tmp_path / "converted"
  assert convert.main([str(directory), str(target), "--format", "safetensors", "--ranks", "4",
                       "--dtype", "bfloat16"]) == 0
  assert rank_files.RankFiles(target).num_ranks == 4
  assert (target / "tokenizer.tok.json").read_bytes() == (
      directory / "tokenizer.tok.json").read_bytes()
  config, params = hf_checkpoint.load(target)
  assert config == CONFIG
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
  """A plain copy of the checkpoint's files (the save's links at the top, followed)."""
  target.mkdir()
  for path in source.iterdir():
    if path.is_file():
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
  rewrite_safetensors(wrong, {name: np.zeros((CONFIG.emb_size, 4), np.float32)
                            for name in view.names()})
  with pytest.raises(CheckpointError, match=re.escape(f"{wrong}: model.layers.0.")):
    hf_checkpoint.load(directory)

  directory = _copy(source, tmp_path / "rank_dtype")  # one rank in bfloat16, the rest float32
  odd = _expert_file(directory, 6, "w3")
  view = SafetensorsFile(odd)
  rewrite_safetensors(odd, {name: np.asarray(view.view(name)).astype(ml_dtypes.bfloat16)
                          for name in view.names()})
  with pytest.raises(CheckpointError, match=re.escape(f"{odd}: model.layers.0.") +
                     ".* is bfloat16 but .* holds it as float32"):
    hf_checkpoint.load(directory)

  directory = _copy(source, tmp_path / "dtype")
  common = next(p for p in sorted(directory.glob("*-TP-common.safetensors"))
                if "model.norm.weight" in SafetensorsFile(p).names())
  rewrite_safetensors(common, {"model.norm.weight": np.zeros(CONFIG.emb_size, np.int32)})
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

def test_the_committed_fixture_is_what_the_writer_saves(grok2_dir):
  """tests/data/families/grok2 holds, byte for byte, the files a fresh save of the same
  params writes (the writer and the committed fixture agree), plus its tokenizer. Catches
  a fixture left stale by a change to the writer, and one built from other params."""
  directory, _ = grok2_dir
  fresh = {path.name: path.read_bytes() for path in directory.iterdir()
           if path.is_file() and not path.name.startswith(".")}
  committed = {path.name: path.read_bytes() for path in FIXTURE_DIR.iterdir()}
  assert sorted(committed) == sorted(fresh)
  assert [name for name in committed if committed[name] != fresh[name]] == []

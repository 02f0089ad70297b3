"""Builds the Hugging Face family fixtures under tests/data/families/ with `transformers`.

For each family (mixtral, qwen2_moe, qwen3_moe) this makes a tiny random model with the
family's own `transformers` class, saves it as a Hugging Face checkpoint (config.json and
safetensors, in the hub's per-expert tensor layout), reloads it from disk, and records what
the reference computes on that reloaded model in `reference.npz`. The tests read these files;
they need neither torch nor transformers. Rebuild with
  python scripts/build_family_fixtures.py            (an env with the [reference] extra)

Sizes. Every size is odd in the sense of "distinct from every other size" (and none a power
of two above 4), so a loader or model that swaps two axes fails on a shape instead of passing
by luck: hidden 40, vocab 101, 3 layers, 4 query heads, 2 KV heads, expert FFN sizes 20 / 14 /
6 (Mixtral / Qwen2-MoE / Qwen3-MoE), a shared-expert FFN of 26 (Qwen2-MoE). The FFN sizes are
even so that every family also runs in the sharded "tensor" MoE mode, which splits each
expert's FFN over the mesh's model axis: that axis must divide the 4 query heads, so it is 2
or 4, and Mixtral's 20 splits 4 ways, the others 2 ways (as does the shared expert's 26). head_dim is 12 for Mixtral and Qwen3-MoE, whose configs set it explicitly, so
q_proj is [48, 40] and o_proj [40, 48] (a model that derives head_dim as hidden/heads = 10
fails, as it would on Qwen3-30B-A3B: hidden 2048, 32 heads, head_dim 128); Qwen2-MoE has no
head_dim field in its config class, so there it is hidden/heads = 10. Weights are float32 and
the sizes keep every fixture directory under ~300 KB.

Family switches follow each family's published config (Mixtral-8x7B, Qwen1.5-MoE-A2.7B,
Qwen3-30B-A3B): norm_topk_prob true for Qwen3-MoE and false for Qwen2-MoE (Mixtral always
renormalises over its top 2); q/k/v biases for Qwen2-MoE only; per-head q/k RMSNorm for
Qwen3-MoE; SiLU experts; untied embeddings; no sliding window; every layer sparse
(decoder_sparse_step 1, mlp_only_layers []). Chosen for discrimination instead of published
values: rope_theta (1000 / 2500 / 50000, distinct per family and none the 10000 default) and
rms_norm_eps (1e-3 / 3e-3 / 1e-2, large enough that using the wrong eps moves logits by more
than the tests' tolerance; the published 1e-5 / 1e-6 would not).

Weights. transformers' default init (std 0.02, norms at 1, biases at 0) gives near-zero
logits, near-uniform routing and norm weights that cannot reveal a misplaced norm. Instead,
from one seeded torch generator: embeddings N(0, 1); every projection N(0, 0.15) so that a
projection of a unit-RMS input over fan-in 40 has std ~0.95 and logits, attention scores and
expert activations are O(1); router and shared-expert-gate weights N(0, 0.3) so router logits
have std ~1.9 and routing is far from uniform; RMSNorm weights 1 + N(0, 0.2); q/k/v biases
N(0, 0.2). The seed is advanced until every routing decision and every greedy step has a
clear margin (see MIN_* below), so a float32 rounding difference cannot flip a top-k choice
or a greedy token in the JAX model; the margins found are written to fixture.json.

Reference, per family, computed in float32 with attn_implementation="eager" and
experts_implementation="eager" (the per-expert loop written in modeling_<family>.py; the
default grouped_mm kernel rejects these odd sizes on the CPU):
  input_ids [4, 11] int64: rows of 11, 8, 5 and 2 real tokens (ids 1..100), right-padded
    with 0 (four rows, so a mesh's data axis of 2 or 4 splits the batch).
  attention_mask [4, 11] int64: 1 on real tokens.
  logits [4, 11, V] float32: the forward pass with that mask and default position ids
    (0..10 on every row, so real tokens sit at 0..n-1). transformers masks padded *keys*
    only; a padded *query* position still attends to the real tokens before it and to
    nothing after, and its logits are finite but meaningless. Compare real positions only
    (attention_mask == 1).
  router_logits [L, 4*11, E] float32: each layer's router logits (before softmax), rows in
    (batch, position) order, padded positions included (ignore them).
  greedy [4, 6] int64: 6 new tokens for each row's unpadded prompt, generated one row at a
    time (batch 1, no padding) with model.generate(do_sample=False, use_cache=True).
  greedy_scores [4, 6, V] float32: the logits that chose each of those tokens (the cached
    decode steps; generate's `scores` with no logits processor).
fixture.json holds the versions, seed, sizes, margins and the file list.
"""

import argparse
import json
import os
import pathlib
import sys

import numpy as np
import safetensors
import torch
import transformers

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT_ROOT = REPO / "tests" / "data" / "families"

BASE_SEED = 1234
ROW_LENGTHS = (11, 8, 5, 2)
NEW_TOKENS = 6
PAD_ID = 0
# A top-k choice whose k-th and (k+1)-th router probabilities differ by less than this, or a
# greedy step whose two best logits differ by less, makes the seed be rejected: the JAX side
# agrees with torch to ~1e-6, so these margins leave a factor of several hundred.
MIN_ROUTING_GAP = 3e-4
MIN_GREEDY_GAP = 1e-3
MAX_SEED_TRIES = 50
ROUND_TRIP_ATOL = 1e-5
# Written into each fixture directory by scripts/build_family_tokenizers.py; a rebuild keeps it.
TOKENIZER_FILE = "tokenizer.json"

COMMON = dict(
  vocab_size=101,
  hidden_size=40,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  hidden_act="silu",
  max_position_embeddings=64,
  tie_word_embeddings=False,
  pad_token_id=None,
  bos_token_id=None,
  eos_token_id=None,
  attention_dropout=0.0,
)

FAMILIES = {
  "mixtral": dict(
    cls=transformers.MixtralForCausalLM,
    config_cls=transformers.MixtralConfig,
    config=dict(COMMON, head_dim=12, intermediate_size=20, num_local_experts=8,
                num_experts_per_tok=2, sliding_window=None, rms_norm_eps=1e-3,
                rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    max_shard_size="130KB",  # ~340 KB of weights: three files and an index
    hub_spelling=False,
  ),
  "qwen2_moe": dict(
    cls=transformers.Qwen2MoeForCausalLM,
    config_cls=transformers.Qwen2MoeConfig,
    config=dict(COMMON, intermediate_size=52, moe_intermediate_size=14,
                shared_expert_intermediate_size=26, num_experts=8, num_experts_per_tok=2,
                norm_topk_prob=False, qkv_bias=True, decoder_sparse_step=1,
                mlp_only_layers=[], use_sliding_window=False, rms_norm_eps=3e-3,
                rope_parameters={"rope_type": "default", "rope_theta": 2500.0}),
    max_shard_size=None,
    hub_spelling=True,
  ),
  "qwen3_moe": dict(
    cls=transformers.Qwen3MoeForCausalLM,
    config_cls=transformers.Qwen3MoeConfig,
    config=dict(COMMON, head_dim=12, intermediate_size=52, moe_intermediate_size=6,
                num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                attention_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                use_sliding_window=False, rms_norm_eps=1e-2,
                rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    max_shard_size=None,
    hub_spelling=True,
  ),
}

EMBED_STD = 1.0
PROJ_STD = 0.15
ROUTER_STD = 0.3
NORM_STD = 0.2
BIAS_STD = 0.2


def parameter_std(name):
  """(mean, std) of the random init for the parameter called `name` (see the docstring)."""
  if name.endswith("embed_tokens.weight"):
    return 0.0, EMBED_STD
  if name.endswith("norm.weight"):  # input/post_attention layernorm, final norm, q/k norm
    return 1.0, NORM_STD
  if name.endswith(".bias"):
    return 0.0, BIAS_STD
  if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
    return 0.0, ROUTER_STD
  return 0.0, PROJ_STD


def randomise(model, seed):
  """Overwrites every parameter of `model` from one torch generator seeded with `seed`."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in sorted(model.named_parameters()):
      mean, std = parameter_std(name)
      param.copy_(mean + std * torch.randn(param.shape, generator=generator))


def make_inputs(vocab_size, seed):
  """Right-padded prompt batch: int64 input_ids and attention_mask, [len(ROW_LENGTHS), T]."""
  rng = np.random.default_rng(seed)
  width = max(ROW_LENGTHS)
  input_ids = np.full((len(ROW_LENGTHS), width), PAD_ID, dtype=np.int64)
  attention_mask = np.zeros((len(ROW_LENGTHS), width), dtype=np.int64)
  for row, length in enumerate(ROW_LENGTHS):
    input_ids[row, :length] = rng.integers(1, vocab_size, size=length)
    attention_mask[row, :length] = 1
  return input_ids, attention_mask


def routing_gap(router_logits, top_k, attention_mask):
  """Smallest gap between the k-th and (k+1)-th router probability over real tokens."""
  probs = torch.softmax(router_logits.float(), dim=-1)  # [L, B*T, E]
  ordered = torch.sort(probs, dim=-1, descending=True).values
  gaps = ordered[..., top_k - 1] - ordered[..., top_k]  # [L, B*T]
  real = torch.as_tensor(attention_mask.reshape(-1) == 1)
  return float(gaps[:, real].min())


def reference(model, input_ids, attention_mask):
  """Forward logits, router logits and greedy continuations of `model` (see docstring)."""
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(input_ids),
                attention_mask=torch.as_tensor(attention_mask),
                output_router_logits=True, use_cache=False)
  logits = out.logits.float().numpy()
  router_logits = torch.stack(list(out.router_logits))  # [L, B*T, E]
  greedy, scores = [], []
  for row, length in enumerate(ROW_LENGTHS):
    prompt = torch.as_tensor(input_ids[row:row + 1, :length])
    with torch.no_grad():
      gen = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, use_cache=True, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=PAD_ID)
      uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, use_cache=False, pad_token_id=PAD_ID)
    new = gen.sequences[0, length:]
    if not torch.equal(new, uncached[0, length:]):
      raise SystemExit("cached and uncached greedy generation differ in the reference")
    greedy.append(new.numpy())
    scores.append(torch.stack([s[0] for s in gen.scores]).float().numpy())  # [N, V]
  return dict(logits=logits, router_logits=router_logits.float().numpy(),
              greedy=np.stack(greedy).astype(np.int64), greedy_scores=np.stack(scores))


def greedy_gap(scores):
  """Smallest gap between the best and second-best logit over all greedy steps."""
  ordered = np.sort(scores, axis=-1)
  return float((ordered[..., -1] - ordered[..., -2]).min())


def sensitivity(spec, model, input_ids, attention_mask, logits):
  """How far each single wrong switch moves the logits, in units of their std (real tokens).

  Each entry rebuilds the model with one config field changed and the same weights; a value
  well above the tests' 1e-4 tolerance shows the fixture catches that mistake.
  """
  real = attention_mask == 1
  scale = logits[real].std()
  published_eps = 1e-5 if spec["cls"] is transformers.MixtralForCausalLM else 1e-6
  changes = {
    "rms_norm_eps=published": dict(rms_norm_eps=published_eps),
    "rope_theta=10000": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
  }
  if "norm_topk_prob" in spec["config"]:
    changes["norm_topk_prob flipped"] = dict(norm_topk_prob=not spec["config"]["norm_topk_prob"])
  moved = {}
  for label, change in changes.items():
    config = spec["config_cls"](**dict(spec["config"], **change))
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    other = spec["cls"](config).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
      wrong = other(input_ids=torch.as_tensor(input_ids),
                    attention_mask=torch.as_tensor(attention_mask)).logits.numpy()
    moved[label] = float(np.abs(wrong - logits)[real].max() / scale)
  return moved


def respell_config_as_hub(config_path):
  """Rewrites a transformers-5 config.json in the spelling of the published hub configs.

  transformers 5 writes `rope_parameters: {rope_theta, rope_type}` and, for Qwen3-MoE,
  `num_local_experts`; the published Qwen1.5-MoE and Qwen3-MoE config.json files have a
  top-level `rope_theta` and `num_experts`. Both Qwen fixtures use the hub spelling and
  Mixtral keeps the transformers-5 one, so a loader is tested on both. transformers reads
  either (the reference is computed on the model reloaded from this file).
  """
  config = json.loads(config_path.read_text())
  rope = config.pop("rope_parameters")
  if rope.get("rope_type", "default") != "default":
    raise SystemExit(f"{config_path}: only default RoPE can be respelled, got {rope}")
  config["rope_theta"] = rope["rope_theta"]
  if "num_local_experts" in config:
    config["num_experts"] = config.pop("num_local_experts")
  config_path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def build_family(name, spec):
  """Finds a seed with clear margins, saves the checkpoint and reference for one family."""
  out_dir = OUT_ROOT / name
  config = spec["config_cls"](**spec["config"])
  config._attn_implementation = "eager"
  config._experts_implementation = "eager"  # the per-expert loop in modeling_<family>.py
  top_k = config.num_experts_per_tok
  for attempt in range(MAX_SEED_TRIES):
    seed = BASE_SEED + attempt
    torch.manual_seed(seed)
    model = spec["cls"](config).eval()
    randomise(model, seed)
    input_ids, attention_mask = make_inputs(config.vocab_size, seed)
    ref = reference(model, input_ids, attention_mask)
    r_gap = routing_gap(torch.as_tensor(ref["router_logits"]), top_k, attention_mask)
    g_gap = greedy_gap(ref["greedy_scores"])
    if r_gap >= MIN_ROUTING_GAP and g_gap >= MIN_GREEDY_GAP:
      break
    print(f"{name}: seed {seed} rejected (routing gap {r_gap:.2e}, greedy gap {g_gap:.2e})")
  else:
    raise SystemExit(f"{name}: no seed in {MAX_SEED_TRIES} tries had clear margins")

  out_dir.mkdir(parents=True, exist_ok=True)
  for path in out_dir.iterdir():  # an earlier build's files; tokenizer.json is not this script's
    if path.name != TOKENIZER_FILE:
      path.unlink()
  save_kwargs = dict(safe_serialization=True)
  if spec["max_shard_size"]:
    save_kwargs["max_shard_size"] = spec["max_shard_size"]
  model.save_pretrained(out_dir, **save_kwargs)
  generation_config = out_dir / "generation_config.json"
  if generation_config.exists():
    generation_config.unlink()  # transformers' defaults only; the tests pass settings explicitly
  if spec["hub_spelling"]:
    respell_config_as_hub(out_dir / "config.json")

  # The reference is recomputed on the model read back from disk, so it is exactly what the
  # committed files compute; it must also equal the in-memory model's.
  reloaded = spec["cls"].from_pretrained(out_dir, dtype=torch.float32,
                                         attn_implementation="eager",
                                         experts_implementation="eager").eval()
  ref_disk = reference(reloaded, input_ids, attention_mask)
  # Equal up to float32 rounding: the reloaded experts are assembled from the per-expert files
  # into new tensors, and the batch-1 decode kernels may then sum in another order.
  for key in ref:
    diff = float(np.abs(ref[key].astype(np.float64) - ref_disk[key]).max())
    if diff > ROUND_TRIP_ATOL:
      raise SystemExit(f"{name}: {key} differs after the save/load round trip by {diff:.3g}")
  np.savez_compressed(out_dir / "reference.npz", input_ids=input_ids,
                      attention_mask=attention_mask, **ref_disk)

  real = attention_mask == 1
  files = sorted(p.name for p in out_dir.iterdir() if p.name != TOKENIZER_FILE) + ["fixture.json"]
  meta = dict(
    family=name,
    architecture=spec["cls"].__name__,
    transformers_version=transformers.__version__,
    torch_version=torch.__version__,
    safetensors_version=safetensors.__version__,
    numpy_version=np.__version__,
    python_version=sys.version.split()[0],
    seed=seed,
    init=dict(embed_std=EMBED_STD, projection_std=PROJ_STD, router_and_shared_gate_std=ROUTER_STD,
              norm_weight="1 + N(0, %g)" % NORM_STD, bias_std=BIAS_STD),
    attn_implementation="eager",
    experts_implementation="eager",
    config_spelling="hub (rope_theta, num_experts)" if spec["hub_spelling"]
    else "transformers 5 (rope_parameters)",
    dtype="float32",
    sizes=dict((k, v) for k, v in spec["config"].items()
               if k not in ("pad_token_id", "bos_token_id", "eos_token_id")),
    row_lengths=list(ROW_LENGTHS),
    pad_id=PAD_ID,
    new_tokens=NEW_TOKENS,
    min_routing_gap=routing_gap(torch.as_tensor(ref_disk["router_logits"]), top_k,
                                attention_mask),
    min_greedy_gap=greedy_gap(ref_disk["greedy_scores"]),
    logits_std_real_positions=float(ref_disk["logits"][real].std()),
    max_logit_change_in_std_units_if_wrong=sensitivity(spec, reloaded, input_ids,
                                                       attention_mask, ref_disk["logits"]),
    files=files,
  )
  (out_dir / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
  print(f"{name}: seed {seed}, files {files}, logits std {meta['logits_std_real_positions']:.3f},"
        f" routing gap {meta['min_routing_gap']:.2e}, greedy gap {meta['min_greedy_gap']:.2e},"
        f" sensitivity {meta['max_logit_change_in_std_units_if_wrong']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--family", choices=sorted(FAMILIES), action="append",
                      help="build only this family (repeatable); default: all")
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  for name in args.family or sorted(FAMILIES):
    build_family(name, FAMILIES[name])


if __name__ == "__main__":
  main()

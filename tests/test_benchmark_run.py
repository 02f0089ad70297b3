"""benchmarks/run.py end to end on a tiny model, and its byte and parameter counts by hand."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import counts, limits
from benchmarks import run as bench
from grok_moe import native, quant, random_weights
from grok_moe.config import BENCH, GROK_1, PRESETS, TINY, TINY_GROK_2


def test_counts_by_hand():
  """The bench config's active parameters and the bytes a token reads, by part, against
  sums written out by hand: catches a tensor counted whole that a token reads k experts
  of (or the reverse), scales left out, and a dense copy counted at int8 size. The
  counts need shapes only, so the weights are drawn abstractly (jax.eval_shape)."""
  config = BENCH
  D, F, V, E = 512, config.ffn_size, 4096, 8
  active = counts.active_parameters(config)
  per_layer = D * 512 + 2 * D * 128 + 512 * D + D * E + 2 * 3 * D * F
  assert active["total"] == 4 * per_layer + V * D

  params = jax.eval_shape(lambda: random_weights.release_params(config.replace(num_layers=1)))
  read = counts.bytes_per_token(params, config.replace(num_layers=1))
  experts = 2 * (2 * (D * F + 2 * F) + (F * D + 2 * 8 * D))   # 2 experts: int8 + bf16 scales
  attention = (D * 512 + 2 * 512) + 2 * (D * 128 + 2 * 128) + (512 * D + 2 * 8 * D)
  assert read["experts"] == experts
  assert read["attention"] == attention
  assert read["embeddings"] == 4 * (V * D + D)
  assert read["router_and_norms"] == 4 * (D * E + 4 * D + D)
  dense = jax.eval_shape(lambda p: quant.with_residency(p, "float32"), params)
  held = counts.bytes_per_token(dense, config.replace(num_layers=1))
  assert held["experts"] == 4 * 2 * 3 * D * F


def test_grok1_width_settings():
  settings = bench._settings(bench._parse_args(["--grok1-width", "--layers", "3"]))
  config = settings.config
  assert (config.emb_size, config.num_experts, config.ffn_size, config.vocab_size) == (
      GROK_1.emb_size, 8, 32768, GROK_1.vocab_size)
  assert config.num_layers == 3 and config.sequence_len >= 4096 + bench.NEW_TOKENS


TINY_SETTINGS = dict(
    config=TINY.replace(sequence_len=256), dtype="float32", repeats=2,
    bandwidth_bytes=1 << 20, matmul_size=64, prefill_tokens=16,
    decode_cache_lengths=(8, 40), moe_tokens=64, generate_batches=(1, 2),
    generate_new_tokens=3, many_experts=(16, 4, 32, 24))


def test_run_on_a_tiny_model_reports_every_figure(tmp_path):
  settings = bench.Settings(**TINY_SETTINGS)
  results = bench.run(settings, log=lambda message: None)
  text = bench.table(results)
  json.loads(json.dumps(results))  # JSON-ready
  assert [d["cached_tokens"] for d in results["decode"]] == [8, 40]
  assert [g["batch"] for g in results["generate"]] == [1, 2]
  for key, value in results["ratios"].items():
    assert math.isfinite(value) and value > 0, key
  assert [t["verdict"] in ("PASS", "FAIL") for t in results["targets"]] == [True] * 5
  assert "decode at 40 / at 8 cached" in text and "generate, batch 2" in text
  assert "MoE layer, 16 experts (top 4), 64 tokens" in text
  assert results["memory"]["weight_bytes"] == counts.weight_bytes(
      random_weights.release_params(settings.config))
  assert jnp.dtype(results["limits"]["matmul"]["dtype"]) == jnp.float32
  # The table says which int8 matmul the figures are of (the native kernel or XLA's).
  assert results["machine"]["native_int8"] == native.available()
  assert ("int8 matmuls in the native kernel" in text) == native.available()


def test_run_on_a_mesh_holds_a_share_of_the_weights_per_device():
  """--mesh 1x2: every measurement runs on the plan's mesh (conftest's 8 CPU devices)."""
  settings = bench.Settings(**TINY_SETTINGS, mesh=(1, 2))
  results = bench.run(settings, log=lambda message: None)
  memory = results["memory"]
  # Experts and attention split in two; embeddings (vocab 97), norms and router copied.
  assert memory["weight_bytes"] / 2 < memory["weight_bytes_per_device"] < memory["weight_bytes"]
  assert all(0 < n <= g["batch"] * 3 for g in results["generate"] for n in g["generated"])
  assert [t["verdict"] in ("PASS", "FAIL") for t in results["targets"]] == [True] * 5
  assert "on a 1x2 mesh" in bench.table(results)


def test_only_measures_the_named_parts(capsys):
  """--only many-experts measures the limits and that layer alone (no model weights),
  with its ratios, its target and its row; --only orders the parts as the run does and
  names the JSON after them (a partial run never overwrites latest.json); an unknown
  part is a usage error that names the known ones.

  Catches a partial run that fails on the parts it skipped (ratios, targets, table),
  or that writes over the full run's results.
  """
  settings = bench.Settings(**TINY_SETTINGS, parts=("many-experts",))
  results = bench.run(settings, log=lambda message: None)
  assert "many_experts" in results
  assert not {"counts", "prefill", "decode", "moe", "generate", "memory"} & results.keys()
  assert set(results["ratios"]) == {"many_experts_vs_flop_limit",
                                    "many_experts_vs_run_flop_limit",
                                    "many_experts_decode_vs_bandwidth_limit"}
  assert [t["target"] for t in results["targets"]] == [
      "many-experts MoE / FLOP limit of its active work"]
  assert "MoE layer, 16 experts (top 4), 64 tokens" in bench.table(results)

  args = bench._parse_args(["--only", "many-experts,moe"])
  settings = bench._settings(args)
  assert settings.parts == ("moe", "many-experts")
  assert bench._default_json(args, settings).name == "latest-only-moe-many-experts.json"
  with pytest.raises(SystemExit):
    bench._parse_args(["--only", "mo"])
  assert "unknown part mo; known: prefill, decode, moe, many-experts, generate" in (
      capsys.readouterr().err)


@pytest.mark.parametrize("preset", ["grok-2", "mixtral-8x7b", "qwen1.5-moe-a2.7b",
                                    "qwen3-30b-a3b"])
def test_config_measures_any_familys_preset(preset):
  """--config NAME measures that preset's widths and switches with --layers layers (2 by
  default) and names the JSON after it. Catches a benchmark that still only knows Grok-1."""
  args = bench._parse_args(["--config", preset])
  settings = bench._settings(args)
  assert settings.config == PRESETS[preset].replace(num_layers=2, sequence_len=8192)
  assert bench._default_json(args, settings).name == f"latest-{preset}.json"


def test_a_family_model_runs_every_measurement():
  """The prefill, decode and MoE rows on tiny Grok-2 (dense MLP, exact GELU, router cap,
  untied output): every tensor of the table is made, and the MoE row runs the family's
  activation and routing. Catches a measurement that assumes Grok-1's tensors."""
  settings = bench.Settings(**dict(TINY_SETTINGS, config=TINY_GROK_2.replace(sequence_len=256)),
                            parts=("prefill", "decode", "moe"))
  results = bench.run(settings, log=lambda message: None)
  assert results["counts"]["active_parameters"]["dense_mlp"] == (
      2 * 3 * TINY_GROK_2.emb_size * TINY_GROK_2.dense_ffn_size)
  for key, value in results["ratios"].items():
    assert math.isfinite(value) and value > 0, key


def test_an_untied_model_reads_one_embedding_row_and_the_whole_output_projection():
  """Decode bytes of a model with an lm_head: one row of the input embeddings and the whole
  lm_head, not both tables whole. Catches a bandwidth limit that charges an untied model
  (Mixtral, Qwen, Grok-2) for reading its input embeddings on every token."""
  config = TINY_GROK_2.replace(num_layers=1)
  params = random_weights.release_params(config)
  read = counts.bytes_per_token(params, config)
  V, D = config.vocab_size, config.emb_size
  assert read["embeddings"] == 4 * (V * D + D)   # lm_head [V, D] whole + one input row


def test_flop_limit_measured_beside_alternates_and_pairs_each_round(monkeypatch):
  """limits.seconds_at_flop_limit times the limit's matmul and the program in turn, and
  each round's ratio uses that round's matmul time; on a fake clock (the matmul takes
  1, 1, 10 s, the program 1, 5, 10 s) the median ratio is 1x, where the ratio of the
  medians would be 5x.

  Catches a limit measured apart from the program (all matmuls first, or once per run),
  rounds paired with the wrong matmul, or the ratio's FLOP arithmetic wrong.
  """
  now, calls = [0.0], []
  matmul_seconds, program_seconds = iter([0, 0, 0, 1, 1, 10]), iter([0, 0, 1, 5, 10])

  def timed(name, seconds):
    def call(*args):
      calls.append(name)
      now[0] += next(seconds)
      return jnp.zeros(())
    return call

  size = 4
  monkeypatch.setattr(limits.time, "perf_counter", lambda: now[0])
  monkeypatch.setattr(limits, "_matmul_program", lambda size, dtype: (
      timed("matmul", matmul_seconds), [(), (), ()]))
  flops = 2 * size ** 3  # the matmul's own FLOPs: each round's ratio is program / matmul
  result = limits.seconds_at_flop_limit(timed("program", program_seconds), [(), ()], flops,
                                        size, "float32", repeats=3)
  assert calls == ["matmul"] * 3 + ["program"] * 2 + ["matmul", "program"] * 3
  assert result["ratios"] == [1.0, 5.0, 1.0]
  assert result["ratio"] == 1.0
  assert result["seconds"] == 5.0
  assert result["flops_per_s"] == flops / 1.0

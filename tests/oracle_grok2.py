"""An independent NumPy reference of the Grok-2 forward pass, written from docs/GROK2_SPEC.md.

It follows the spec's section "What a NumPy oracle needs" line by line, in
float64, with loops over heads and experts and nothing fused or cached, and
shares no code with grok_moe (the config dataclass is read for its numbers;
the helpers rms_norm, softmax, rope and dense_weight are the Grok-1 oracle's,
which the two specs define identically). Weights are the release-named
tensors of the parameter table ([in, out]; the spec's [out, in] checkpoint
matrices transposed), so `x @ W` here is the spec's `x @ W.T`.

Grok-2 against Grok-1: exact (erf) GELU; the router's logits soft-capped
before the softmax; attention logits times the temperature tau(p) after the
cap; a dense gated MLP beside the experts, the FFN output (mlp + moe) /
sqrt(2); an untied lm_head; the output logits soft-capped.

Axis letters: B batch, T time (queries), S time (keys), D emb_size, V vocab,
Hq query heads, Hkv key/value heads, d key_size, E experts, k selected
experts, F expert ffn size, Fd dense ffn size.
"""

from __future__ import annotations

import math

import numpy as np

from tests.oracle import MASK_VALUE, dense_weight, rms_norm, rope, softmax

FFN_DIVISOR = math.sqrt(2.0)  # spec section 2: the literal 1.4142135623730951


def gelu_erf(x: np.ndarray) -> np.ndarray:
  """The exact GELU, 0.5 x (1 + erf(x / sqrt 2)), elementwise in float64."""
  erf = np.vectorize(math.erf, otypes=[np.float64])
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def cap(x: np.ndarray, c: float) -> np.ndarray:
  """The soft cap c * tanh(x / c)."""
  return c * np.tanh(x / c)


def tau(positions: np.ndarray, temperature_len: int) -> np.ndarray:
  """The attention temperature of each query position: log2(p) / log2(Lt) if p > Lt, else 1."""
  p = positions.astype(np.float64)
  return np.where(p > temperature_len, np.log2(np.maximum(p, 1.0)) / math.log2(temperature_len),
                  1.0)


def attention(x, valid, positions, p, cfg, trace):
  """x [B, T, D], valid keys [B, T], positions [B, T] -> [B, T, D]."""
  B, T, _ = x.shape
  Hq, Hkv, d = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
  q = rope((x @ p["query"]).reshape(B, T, Hq, d), positions, cfg.rope_base)   # [B, T, Hq, d]
  k = rope((x @ p["key"]).reshape(B, T, Hkv, d), positions, cfg.rope_base)    # [B, S, Hkv, d]
  v = (x @ p["value"]).reshape(B, T, Hkv, d)                                  # [B, S, Hkv, d]
  causal = positions[:, None, :] <= positions[:, :, None]                    # [B, T, S]
  mask = causal & valid[:, None, :]                                          # [B, T, S]
  temperature = tau(positions, cfg.attn_temperature_len)[:, :, None]         # [B, T, 1]
  group = Hq // Hkv
  heads = []
  for j in range(Hq):
    kv = j // group
    s = np.einsum("btd,bsd->bts", q[:, :, j], k[:, :, kv]) * cfg.attn_output_multiplier
    trace["max_abs_attn_logit"] = max(trace.get("max_abs_attn_logit", 0.0),
                                      float(np.max(np.abs(s))))
    s = cap(s, cfg.attn_logit_cap) * temperature
    s = np.where(mask, s, MASK_VALUE)
    heads.append(np.einsum("bts,bsd->btd", softmax(s, axis=-1), v[:, :, kv]))  # [B, T, d]
  return np.concatenate(heads, axis=-1) @ p["linear"]                         # [B, T, D]


def gated_mlp(m, w_in, w_v, w_out, trace):
  """(gelu_erf(m @ w_in) * (m @ w_v)) @ w_out; m [B, T, D] -> [B, T, D]."""
  hidden = m @ w_in                                                           # [B, T, F]
  trace["max_abs_gelu_input"] = max(trace.get("max_abs_gelu_input", 0.0),
                                    float(np.max(np.abs(hidden))))
  return (gelu_erf(hidden) * (m @ w_v)) @ w_out


def ffn(m, p, cfg, trace):
  """(mlp(m) + moe(m)) / sqrt(2) of m [B, T, D]; -> ([B, T, D], idx [B, T, k], gates [B, T, k])."""
  router_logits = m @ p["router"]                                             # [B, T, E]
  trace["max_abs_router_logit"] = max(trace.get("max_abs_router_logit", 0.0),
                                      float(np.max(np.abs(router_logits))))
  capped = cap(router_logits, cfg.router_logit_cap)
  probs = softmax(capped, axis=-1)                                            # [B, T, E]
  order = np.argsort(-capped, axis=-1, kind="stable")  # ties to the lower index
  idx = order[..., : cfg.num_selected_experts]                                # [B, T, k]
  gates = np.take_along_axis(probs, idx, axis=-1)                             # [B, T, k] not renormalised
  top = np.take_along_axis(probs, order[..., : cfg.num_selected_experts + 1], axis=-1)
  trace["min_routing_margin"] = min(trace.get("min_routing_margin", np.inf),
                                    float(np.min(top[..., :-1] - top[..., 1:])))
  moe = np.zeros_like(m)
  for e in range(cfg.num_experts):
    weight = np.sum(np.where(idx == e, gates, 0.0), axis=-1)                  # [B, T]
    if np.any(weight):
      moe += weight[..., None] * gated_mlp(m, p["w_in"][e], p["w_v"][e], p["w_out"][e], trace)
  mlp = gated_mlp(m, p["dense_in"], p["dense_v"], p["dense_out"], trace)
  f = (mlp + moe) / FFN_DIVISOR
  trace["min_ffn_mean_square"] = min(trace.get("min_ffn_mean_square", np.inf),
                                     float(np.min(np.mean(f * f, axis=-1))))
  return f, idx, gates


def oracle_logits(flat_params, tokens, valid, cfg, return_routing=False, trace=None):
  """Logits [B, T, V] (float64) of `tokens` [B, T] with real tokens `valid` [B, T] (right
  padding: every row's positions are 0 .. T-1) under release-named `flat_params`.

  With `return_routing`, also one (expert_indices, gates) pair [B, T, k] per
  layer. `trace`, if a dict, gets the largest |attention logit| before the
  cap, |router logit|, |gelu input| and |logit| before the final cap, the
  smallest mean square of an FFN output (where the 1/sqrt(2) shows through
  the post-norm's eps) and the smallest top-(k+1) routing gap.
  """
  trace = {} if trace is None else trace
  tokens, valid = np.asarray(tokens), np.asarray(valid, bool)
  get = lambda name: dense_weight(flat_params[name])  # noqa: E731
  eps = cfg.rms_norm_eps
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)      # [B, T]
  x = get("language_model/in_out_embed/embeddings")[tokens] * cfg.embedding_multiplier_scale
  routing = []
  for layer in range(cfg.num_layers):
    prefix = f"transformer/decoder_layer_{layer}/"
    attn = {name: get(prefix + f"multi_head_attention/{name}/w")
            for name in ("query", "key", "value", "linear")}
    mlp = {"router": get(prefix + "router/w"), "w_in": get(prefix + "moe/linear/w"),
           "w_v": get(prefix + "moe/linear_v/w"), "w_out": get(prefix + "moe/linear_1/w"),
           "dense_in": get(prefix + "dense_mlp/linear/w"),
           "dense_v": get(prefix + "dense_mlp/linear_v/w"),
           "dense_out": get(prefix + "dense_mlp/linear_1/w")}
    pre_attn, post_attn, pre_moe, post_moe = (
        get(prefix + f"{name}/scale")
        for name in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"))
    a = rms_norm(x, pre_attn, eps)
    h = x + rms_norm(attention(a, valid, positions, attn, cfg, trace), post_attn, eps)
    f, idx, gates = ffn(rms_norm(h, pre_moe, eps), mlp, cfg, trace)
    x = h + rms_norm(f, post_moe, eps)
    routing.append((idx, gates))
  z = rms_norm(x, get("language_model/rms_norm/scale"), eps)
  logits = z @ (cfg.output_multiplier_scale * get("language_model/lm_head/w")).T  # [B, T, V]
  trace["max_abs_logit"] = float(np.max(np.abs(logits)))
  logits = cap(logits, cfg.final_logit_cap)
  return (logits, routing) if return_routing else logits

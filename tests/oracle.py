"""An independent NumPy reference of the Grok-1 forward pass, written from GROK1_SPEC.md alone.

It shares no code with `grok_moe.model` or `grok_moe.moe` (only the config
dataclass, read for its numbers) and computes everything in float64, so it is
the higher-precision side of every parity test. It is deliberately the
simplest correct program: the MoE is a loop over experts, attention is a loop
over heads, and nothing is fused, cached or jitted.

Axis letters: B batch, T time (queries), S time (keys), D emb_size, V vocab,
Hq query heads, Hkv key/value heads, d key_size, E experts, k selected experts,
F ffn size, K/N a weight's input/output size, R scale row blocks.
"""

from __future__ import annotations

import math

import numpy as np

ORACLE_DTYPE = np.float64
MASK_VALUE = -1e30  # spec: "masked positions set to -1e30"


def dense_weight(w) -> np.ndarray:
  """A parameter as a float64 array, undoing int8 quantization per the spec.

  `w` is a float array or an object with `.weight` int8 [..., K, N] and
  `.scales` bfloat16 [..., R, N]; row block r (rows r*K/R .. (r+1)*K/R) uses
  scales row r, so the weight is reshaped to [..., R, K/R, N] before scaling.
  """
  if not hasattr(w, "scales"):
    return np.asarray(w).astype(ORACLE_DTYPE)
  weight = np.asarray(w.weight)
  scales = np.asarray(w.scales).astype(ORACLE_DTYPE)           # [..., R, N]
  *batch, rows, cols = weight.shape
  blocks = scales.shape[-2]
  if rows % blocks or scales.shape[-1] != cols:
    raise ValueError(f"scales {scales.shape} do not fit weight {weight.shape}")
  blocked = weight.astype(ORACLE_DTYPE).reshape(*batch, blocks, rows // blocks, cols)  # [..., R, K/R, N]
  return (blocked * scales[..., :, None, :]).reshape(*batch, rows, cols)               # [..., K, N]


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
  """scale * x / sqrt(mean(x^2) + eps) over the last axis; the scale is used as is."""
  return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  shifted = x - np.max(x, axis=axis, keepdims=True)
  e = np.exp(shifted)
  return e / np.sum(e, axis=axis, keepdims=True)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
  """The tanh approximation of GELU (jax.nn.gelu's default)."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
  """Rotate-half RoPE of x [B, T, H, d] at positions [B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / base ** (np.arange(d // 2, dtype=ORACLE_DTYPE) * 2 / d)    # [d/2]
  angle = positions[..., None].astype(ORACLE_DTYPE) * inv_freq              # [B, T, d/2]
  angle = np.concatenate([angle, angle], axis=-1)[:, :, None, :]            # [B, T, 1, d]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  rotated = np.concatenate([-x2, x1], axis=-1)                              # [B, T, H, d]
  return x * np.cos(angle) + rotated * np.sin(angle)


def attention(x, valid, p, cfg, trace):
  """Grouped-query attention of x [B, T, D] with key mask valid [B, T]; -> [B, T, D]."""
  B, T, _ = x.shape
  Hq, Hkv, d = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
  q = (x @ p["query"]).reshape(B, T, Hq, d)                                 # [B, T, Hq, d]
  k = (x @ p["key"]).reshape(B, T, Hkv, d)                                  # [B, S, Hkv, d]
  v = (x @ p["value"]).reshape(B, T, Hkv, d)                                # [B, S, Hkv, d]
  positions = np.broadcast_to(np.arange(T), (B, T))
  q = rope(q, positions, cfg.rope_base)
  k = rope(k, positions, cfg.rope_base)
  causal = np.tril(np.ones((T, T), dtype=bool))                             # [T, S]
  mask = causal[None, :, :] & valid[:, None, :]                             # [B, T, S]
  group = Hq // Hkv
  heads = []
  for j in range(Hq):
    kv = j // group
    s = np.einsum("btd,bsd->bts", q[:, :, j], k[:, :, kv]) * cfg.attn_output_multiplier
    trace["max_abs_attn_logit"] = max(trace.get("max_abs_attn_logit", 0.0),
                                      float(np.max(np.abs(s))))
    s = cfg.attn_logit_cap * np.tanh(s / cfg.attn_logit_cap)
    s = np.where(mask, s, MASK_VALUE)
    w = softmax(s, axis=-1)                                                 # [B, T, S]
    heads.append(np.einsum("bts,bsd->btd", w, v[:, :, kv]))                 # [B, T, d]
  out = np.concatenate(heads, axis=-1)                                      # [B, T, Hq*d]
  return out @ p["linear"]                                                  # [B, T, D]


def moe(x, p, cfg, trace):
  """Sparse MoE of x [B, T, D] as a loop over experts; -> ([B, T, D], idx [B, T, k], gates [B, T, k])."""
  probs = softmax(x @ p["router"], axis=-1)                                 # [B, T, E]
  # top-k with ties to the lower index: a stable sort of -p keeps equal
  # probabilities in index order.
  order = np.argsort(-probs, axis=-1, kind="stable")
  idx = order[..., : cfg.num_selected_experts]                              # [B, T, k]
  gates = np.take_along_axis(probs, idx, axis=-1)                           # [B, T, k] not renormalised
  # Smallest gap between neighbours among the k+1 largest probabilities: a
  # lower-precision router can only reorder or swap experts closer than this.
  top = np.take_along_axis(probs, order[..., : cfg.num_selected_experts + 1], axis=-1)
  margin = float(np.min(top[..., :-1] - top[..., 1:])) if top.shape[-1] > 1 else np.inf
  trace["min_routing_margin"] = min(trace.get("min_routing_margin", np.inf), margin)
  out = np.zeros_like(x)
  for e in range(cfg.num_experts):
    # weight of expert e for every token: its gate where selected, else 0.
    weight = np.sum(np.where(idx == e, gates, 0.0), axis=-1)                # [B, T]
    if not np.any(weight):
      continue
    hidden = x @ p["w_in"][e]                                               # [B, T, F]
    trace["max_abs_gelu_input"] = max(trace.get("max_abs_gelu_input", 0.0),
                                      float(np.max(np.abs(hidden))))
    y = (gelu_tanh(hidden) * (x @ p["w_v"][e])) @ p["w_out"][e]             # [B, T, D]
    out += weight[..., None] * y
  return out, idx, gates


def oracle_logits(flat_params, tokens, cfg, return_routing=False, trace=None):
  """Logits [B, T, V] (float64) of `tokens` [B, T] under `flat_params` {full name: weight}.

  With `return_routing`, also a list with one (expert_indices [B, T, k],
  gates [B, T, k]) pair per layer, in layer order. `trace`, if a dict, is
  filled with diagnostics: the largest |attention logit| before the soft cap
  and |gelu input| (so tests can check that those paths are exercised) and the
  smallest gap between neighbouring top-(k+1) router probabilities (so tests
  know whether a less precise router could choose differently).
  """
  trace = {} if trace is None else trace
  tokens = np.asarray(tokens)
  get = lambda name: dense_weight(flat_params[name])
  eps = cfg.rms_norm_eps
  valid = tokens > cfg.pad_token                                            # [B, T]
  embeddings = get("language_model/in_out_embed/embeddings")               # [V, D]
  x = embeddings[tokens] * cfg.embedding_multiplier_scale                   # [B, T, D]
  routing = []
  for layer in range(cfg.num_layers):
    prefix = f"transformer/decoder_layer_{layer}/"
    attn = {name: get(prefix + f"multi_head_attention/{name}/w")
            for name in ("query", "key", "value", "linear")}
    experts = {"router": get(prefix + "router/w"),
               "w_in": get(prefix + "moe/linear/w"),
               "w_v": get(prefix + "moe/linear_v/w"),
               "w_out": get(prefix + "moe/linear_1/w")}
    norm = [get(prefix + f"{name}/scale")
            for name in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3")]
    h = x + rms_norm(attention(rms_norm(x, norm[0], eps), valid, attn, cfg, trace), norm[1], eps)
    y, idx, gates = moe(rms_norm(h, norm[2], eps), experts, cfg, trace)
    x = h + rms_norm(y, norm[3], eps)
    routing.append((idx, gates))
  x = rms_norm(x, get("language_model/rms_norm/scale"), eps)
  logits = x @ embeddings.T * cfg.output_multiplier_scale                   # [B, T, V]
  return (logits, routing) if return_routing else logits

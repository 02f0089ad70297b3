"""The Grok-1 forward pass as Haiku modules, with the release's parameter names.

Axis letters: B batch, T new tokens, S cache slots (or keys), D model width,
V vocabulary, H query heads, K KV heads, G query heads per KV head (H = K*G),
d head width, L layers, k experts per token.

    x = embeddings[tokens] * embedding_multiplier_scale
    each layer:  h = x + rms_norm_1(attention(rms_norm(x)))
                 x = h + rms_norm_3(moe(rms_norm_2(h)))
    logits = rms_norm(x) @ embeddings.T * output_multiplier_scale

Weights may be float or `quant.QuantizedWeight`; `quant.matmul` is the one
place they are used, so the modules never ask which.

With a `sharding.ShardingPlan` (forward's `sharding=`), the int8 matmuls, the
attention core and the expert dispatch call the plan's shard_map versions
(`plan.matmul`, `plan.attend`, `plan.sparse_moe`) instead; nothing else changes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok_moe import manifest, moe, quant
from grok_moe.config import ModelConfig
from grok_moe.kv_cache import KVCache

MASKED_LOGIT = -1e30


class Routing(NamedTuple):
  expert_indices: jax.Array  # [L, B, T, k] int32
  gates: jax.Array           # [L, B, T, k] float32 softmax probabilities


class ModelOutput(NamedTuple):
  logits: jax.Array          # [B, T, V] float32
  cache: KVCache | None
  routing: Routing | None


def _init(fan_in: int):
  return hk.initializers.TruncatedNormal(stddev=1 / math.sqrt(fan_in))


def _truncated_normal(rng: np.random.Generator, shape, stddev: float) -> np.ndarray:
  """Normal cut at 2 standard deviations, rescaled to `stddev` (as hk.initializers.TruncatedNormal)."""
  unit = rng.standard_normal(shape, dtype=np.float32)
  outside = np.abs(unit) > 2
  while outside.any():  # redraw the values past the cut
    unit[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32)
    outside = np.abs(unit) > 2
  return unit * np.float32(stddev / 0.87962566103423978)  # the std of a unit normal cut at +-2


class RMSNorm(hk.Module):
  """scale * x / sqrt(mean(x^2) + eps), in float32; the scale is used as is."""

  def __init__(self, eps: float, name: str):
    super().__init__(name=name)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32, init=jnp.ones)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (scale.astype(jnp.float32) * normed).astype(x.dtype)


class Linear(hk.Module):
  """x @ w without bias; w [in, out] float or int8 + scales."""

  def __init__(self, output_size: int, name: str, sharding=None):
    super().__init__(name=name)
    self.output_size = output_size
    self.sharding = sharding

  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    w = hk.get_parameter("w", [fan_in, self.output_size], jnp.float32, init=_init(fan_in))
    if self.sharding is not None:
      return self.sharding.matmul(x, w, f"{self.module_name}/w")
    return quant.matmul(x, w)


class ExpertWeights(hk.Module):
  """The stacked weight of one of the three expert projections, [E, in, out]."""

  def __init__(self, shape: tuple[int, int, int], name: str):
    super().__init__(name=name)
    self.shape = shape

  def __call__(self) -> quant.Weight:
    return hk.get_parameter("w", list(self.shape), jnp.float32, init=_init(self.shape[1]))


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding, rotate-half form. x [B, T, H, d], positions [B, T]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [d/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq                         # [B, T, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]                   # [B, T, 1, d]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)                                           # [B, T, H, d/2]
  rotated = jnp.concatenate([-second, first], axis=-1)                                 # [B, T, H, d]
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


# `attend` reads a KV cache of more slots than this in chunks of this many.
ATTENTION_CHUNK = 512


def _capped(scores, config: ModelConfig):
  """Logits scaled by attn_output_multiplier and soft-capped, in float32."""
  scores = scores.astype(jnp.float32) * config.attn_output_multiplier
  return config.attn_logit_cap * jnp.tanh(scores / config.attn_logit_cap)


def attend(q, keys, values, mask, config: ModelConfig, *, layer: int | None = None):
  """Grouped-query attention with the soft logit cap.

  q [B, T, H, d]; keys, values [B, S, K, d], or a whole cache [L, B, S, K, d]
  with the `layer` to read; mask [B, T, S] -> [B, T, H*d], in q's dtype.
  A cache of more than ATTENTION_CHUNK slots is read chunk by chunk
  (`_attend_cache_in_chunks`), skipping the chunks no query sees.
  """
  batch, num_new, _, head_dim = q.shape
  q = q.reshape(batch, num_new, config.num_kv_heads, config.num_kv_groups, head_dim)  # [B, T, K, G, d]
  num_slots = mask.shape[-1]
  if layer is not None and num_slots > ATTENTION_CHUNK and num_slots % ATTENTION_CHUNK == 0:
    out = _attend_cache_in_chunks(q, keys, values, layer, mask, config)             # [B, T, K, G, d]
  else:
    if layer is not None:
      keys, values = keys[layer], values[layer]                                     # [B, S, K, d]
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    scores = _capped(jnp.einsum("btkgd,bskd->bkgts", q, keys,
                                preferred_element_type=jnp.float32), config)        # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_LOGIT)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)                       # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", weights, values)                          # [B, T, K, G, d]
  return out.reshape(batch, num_new, config.q_size)                                 # [B, T, H*d]


def _attend_cache_in_chunks(q, cache_keys, cache_values, layer: int, mask, config: ModelConfig):
  """Attention of q [B, T, K, G, d] over layer `layer` of a cache [L, B, S, K, d], read
  in chunks of c = ATTENTION_CHUNK slots; mask [B, T, S] -> [B, T, K, G, d] in q's dtype.

  Two `lax.scan`s over the chunks, so that the softmax is the plain one over
  all S slots: (1) the logits of each chunk, (2) after the softmax, the sum
  of weights @ values chunk by chunk. A chunk that no query sees (its mask is
  all False: the empty end of the cache) is skipped with `lax.cond` and never
  read: its logits are MASKED_LOGIT, its weights exactly 0 for any query that
  sees a key. So a decode step costs what the filled part of the cache holds,
  not its capacity.

  Each chunk is used in its stored layout [B, c, K*d]: the queries are laid
  out block-diagonally, qd [B, K*d, T*H] with query head (k, g) nonzero only
  in the d columns of KV head k, so that both products are plain matrix
  products (chunk @ qd, weights @ chunk) and no chunk is transposed. This
  costs K times the (small) multiply-adds of the attention; the zero blocks
  add exact zeros, so the result is the grouped attention's.
  """
  batch, num_new, kv_heads, groups, head_dim = q.shape
  num_slots, chunk = mask.shape[-1], ATTENTION_CHUNK
  num_chunks, width, queries = num_slots // chunk, kv_heads * head_dim, num_new * kv_heads * groups
  eye = jnp.eye(kv_heads, dtype=q.dtype)                                            # [K, K]
  q_blocks = jnp.einsum("btkgd,kj->bjdtkg", q, eye).reshape(batch, width, queries)  # [B, K*d, T*H]
  mask_chunks = mask.reshape(batch, num_new, num_chunks, chunk)                     # [B, T, C, c]
  seen = jnp.any(mask_chunks, axis=(0, 1, 3))                                       # [C]
  mask_chunks = jnp.moveaxis(mask_chunks, 2, 0)                                     # [C, B, T, c]

  def read(cache, index):
    """Chunk `index` of this layer, [B, c, K*d]."""
    start = (layer, 0, index * chunk, 0, 0)
    piece = jax.lax.dynamic_slice(cache, start, (1, batch, chunk, kv_heads, head_dim))
    return piece.reshape(batch, chunk, width).astype(q.dtype)

  def chunk_scores(_, inputs):
    index, chunk_seen, chunk_mask = inputs

    def compute():
      scores = jnp.einsum("bse,beq->bsq", read(cache_keys, index), q_blocks,
                          preferred_element_type=jnp.float32)                      # [B, c, T*H]
      scores = _capped(scores, config).reshape(batch, chunk, num_new, kv_heads * groups)
      visible = jnp.swapaxes(chunk_mask, 1, 2)[..., None]                          # [B, c, T, 1]
      return jnp.where(visible, scores, MASKED_LOGIT)                              # [B, c, T, H]

    masked = jnp.full((batch, chunk, num_new, kv_heads * groups), MASKED_LOGIT, jnp.float32)
    return None, jax.lax.cond(chunk_seen, compute, lambda: masked)

  _, scores = jax.lax.scan(chunk_scores, None,
                           (jnp.arange(num_chunks), seen, mask_chunks))             # [C, B, c, T, H]
  scores = jnp.moveaxis(scores, 0, 1).reshape(batch, num_slots, queries)            # [B, S, T*H]
  weights = jax.nn.softmax(scores, axis=1).astype(q.dtype)                          # [B, S, T*H]
  weights = jnp.moveaxis(weights.reshape(batch, num_chunks, chunk, queries), 1, 0)  # [C, B, c, T*H]

  def add_chunk(out, inputs):
    index, chunk_seen, chunk_weights = inputs

    def add(out):
      return out + jnp.einsum("bsq,bse->bqe", chunk_weights, read(cache_values, index),
                              preferred_element_type=jnp.float32)                   # [B, T*H, K*d]

    return jax.lax.cond(chunk_seen, add, lambda out: out, out), None

  out = jnp.zeros((batch, queries, width), jnp.float32)                             # [B, T*H, K*d]
  out, _ = jax.lax.scan(add_chunk, out, (jnp.arange(num_chunks), seen, weights))
  out = out.reshape(batch, num_new, kv_heads, groups, kv_heads, head_dim)           # [B, T, K, G, K, d]
  return jnp.einsum("btkgjd,kj->btkgd", out, eye.astype(jnp.float32)).astype(q.dtype)


class MultiHeadAttention(hk.Module):
  """Grouped-query self-attention with RoPE, over the new tokens or the cache."""

  def __init__(self, config: ModelConfig, sharding=None):
    super().__init__(name="multi_head_attention")
    self.config = config
    self.sharding = sharding

  def __call__(self, x, positions, token_valid, layer_cache):
    """x [B, T, D]; positions, token_valid [B, T]; layer_cache None or
    (keys, values, valid, layer): the whole cache's keys and values
    [L, B, S, K, d], its valid [B, S] and this layer's index.

    Returns the output [B, T, D] and the updated whole (keys, values) or None:
    the new keys and values are written into the whole cache in place, and
    this layer's part is read from it there, never copied out.
    """
    cfg = self.config
    batch, num_new, _ = x.shape
    shard = self.sharding
    q = Linear(cfg.q_size, name="query", sharding=shard)(x).reshape(
        batch, num_new, cfg.num_q_heads, cfg.key_size)                    # [B, T, H, d]
    k = Linear(cfg.kv_size, name="key", sharding=shard)(x).reshape(
        batch, num_new, cfg.num_kv_heads, cfg.key_size)                   # [B, T, K, d]
    v = Linear(cfg.kv_size, name="value", sharding=shard)(x).reshape(
        batch, num_new, cfg.num_kv_heads, cfg.key_size)                   # [B, T, K, d]
    q = apply_rope(q, positions, cfg.rope_base)
    k = apply_rope(k, positions, cfg.rope_base)

    if layer_cache is None:
      keys, values, key_positions, key_valid = k, v, positions, token_valid
      layer = new_layer_cache = None
    else:
      cached_keys, cached_values, key_valid, layer = layer_cache          # [L, B, S, K, d]
      rows = jnp.arange(batch)[:, None]                                   # [B, 1]
      keys = cached_keys.at[layer, rows, positions].set(k.astype(cached_keys.dtype), mode="drop")
      values = cached_values.at[layer, rows, positions].set(
          v.astype(cached_values.dtype), mode="drop")
      key_positions = jnp.arange(keys.shape[2])[None, :]                  # [1, S]
      new_layer_cache = (keys, values)

    # A key is seen if it holds a real token at or before the query's position.
    mask = key_valid[:, None, :] & (key_positions[:, None, :] <= positions[:, :, None])  # [B, T, S]
    attention = attend if shard is None else shard.attend
    out = attention(q, keys, values, mask, cfg, layer=layer)              # [B, T, H*d]
    return Linear(cfg.emb_size, name="linear", sharding=shard)(out), new_layer_cache


class Router(hk.Module):
  """Chooses each token's experts: float32 softmax over all experts, then top-k."""

  def __init__(self, config: ModelConfig):
    super().__init__(name="router")
    self.config = config

  def __call__(self, x):
    """x [N, D] -> gates [N, k] float32, expert_indices [N, k] int32."""
    width, num_experts = x.shape[-1], self.config.num_experts
    w = hk.get_parameter("w", [width, num_experts], jnp.float32, init=_init(width))
    return moe.route(x, w, self.config.num_selected_experts)


class MoEFeedForward(hk.Module):
  """Top-k routed mixture of GELU-gated experts; see `moe.sparse_moe` for dispatch."""

  def __init__(self, config: ModelConfig, tile_size: int | None, sharding=None):
    super().__init__(name="moe")
    self.config = config
    self.tile_size = tile_size
    self.sharding = sharding

  def __call__(self, x, gates, expert_indices):
    """x [N, D], gates and expert_indices [N, k] -> [N, D]."""
    cfg = self.config
    E, D, F = cfg.num_experts, cfg.emb_size, cfg.ffn_size
    w_in = ExpertWeights((E, D, F), name="linear")()
    w_v = ExpertWeights((E, D, F), name="linear_v")()
    w_out = ExpertWeights((E, F, D), name="linear_1")()
    dispatch = moe.sparse_moe if self.sharding is None else self.sharding.sparse_moe
    return dispatch(x, gates, expert_indices, w_in, w_v, w_out, tile_size=self.tile_size)


class DecoderLayer(hk.Module):
  """Attention then mixture of experts, each wrapped in a pre- and a post-norm."""

  def __init__(self, config: ModelConfig, tile_size: int | None, name: str, sharding=None):
    super().__init__(name=name)
    self.config = config
    self.tile_size = tile_size
    self.sharding = sharding

  def __call__(self, x, positions, token_valid, layer_cache):
    cfg = self.config
    eps = cfg.rms_norm_eps
    pre_attention = RMSNorm(eps, name="rms_norm")
    post_attention = RMSNorm(eps, name="rms_norm_1")
    pre_moe = RMSNorm(eps, name="rms_norm_2")
    post_moe = RMSNorm(eps, name="rms_norm_3")

    attention_out, new_layer_cache = MultiHeadAttention(cfg, self.sharding)(
        pre_attention(x), positions, token_valid, layer_cache)
    h = x + post_attention(attention_out)                                 # [B, T, D]

    batch, num_new, width = h.shape
    moe_in = pre_moe(h).reshape(batch * num_new, width)                    # [N, D]
    gates, expert_indices = Router(cfg)(moe_in)
    moe_out = MoEFeedForward(cfg, self.tile_size, self.sharding)(moe_in, gates, expert_indices)
    x = h + post_moe(moe_out.reshape(batch, num_new, width))               # [B, T, D]
    routing = (expert_indices.reshape(batch, num_new, -1), gates.reshape(batch, num_new, -1))
    return x, new_layer_cache, routing


class Transformer(hk.Module):
  """The stack of decoder layers."""

  def __init__(self, config: ModelConfig, tile_size: int | None, sharding=None):
    super().__init__(name="transformer")
    self.config = config
    self.tile_size = tile_size
    self.sharding = sharding

  def __call__(self, x, positions, token_valid, cache_keys, cache_values, cache_valid):
    """x [B, T, D] -> x [B, T, D], updated cache keys and values [L, B, S, K, d] or None,
    and per-layer routing [L, B, T, k]."""
    layer_indices, layer_gates = [], []
    for layer in range(self.config.num_layers):
      layer_cache = None
      if cache_keys is not None:
        layer_cache = (cache_keys, cache_values, cache_valid, layer)
      x, new_layer_cache, (indices, gates) = DecoderLayer(
          self.config, self.tile_size, name=f"decoder_layer_{layer}", sharding=self.sharding)(
              x, positions, token_valid, layer_cache)
      if new_layer_cache is not None:
        cache_keys, cache_values = new_layer_cache
      layer_indices.append(indices)
      layer_gates.append(gates)
    return x, cache_keys, cache_values, Routing(jnp.stack(layer_indices), jnp.stack(layer_gates))


class InOutEmbed(hk.Module):
  """The embedding table, shared by the input lookup and the output projection."""

  def __init__(self, config: ModelConfig):
    super().__init__(name="in_out_embed")
    self.config = config

  def __call__(self) -> jax.Array:
    shape = [self.config.vocab_size, self.config.emb_size]
    return hk.get_parameter("embeddings", shape, jnp.float32, init=_init(self.config.emb_size))


class LanguageModel(hk.Module):
  """Tied input/output embeddings and the final norm around the transformer."""

  def __init__(self, config: ModelConfig, transformer: Transformer):
    super().__init__(name="language_model")
    self.config = config
    self.transformer = transformer

  def __call__(self, tokens, positions, cache: KVCache | None, dtype) -> ModelOutput:
    cfg = self.config
    token_valid = tokens > cfg.pad_token                                          # [B, T]
    if positions is None:
      start = 0 if cache is None else cache.lengths[:, None]
      positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]   # [B, T]

    embeddings = InOutEmbed(cfg)()                                                # [V, D]
    x = embeddings.astype(dtype)[tokens] * jnp.asarray(cfg.embedding_multiplier_scale, dtype)  # [B, T, D]

    if cache is None:
      x, _, _, routing = self.transformer(x, positions, token_valid, None, None, None)
      new_cache = None
    else:
      rows = jnp.arange(tokens.shape[0])[:, None]                                 # [B, 1]
      valid = cache.valid.at[rows, positions].set(token_valid, mode="drop")       # [B, S]
      x, keys, values, routing = self.transformer(
          x, positions, token_valid, cache.keys, cache.values, valid)
      ends = jnp.max(jnp.where(token_valid, positions + 1, 0), axis=1)            # [B]
      new_cache = KVCache(keys=keys, values=values, valid=valid,
                          lengths=jnp.maximum(cache.lengths, ends).astype(jnp.int32))

    x = RMSNorm(cfg.rms_norm_eps, name="rms_norm")(x)
    logits = jnp.einsum("btd,vd->btv", x, embeddings.astype(dtype),
                        preferred_element_type=jnp.float32)                       # [B, T, V]
    return ModelOutput(logits * cfg.output_multiplier_scale, new_cache, routing)


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


@functools.lru_cache(maxsize=None)
def _transformed(config: ModelConfig, dtype_name: str, tile_size: int | None, sharding=None):
  def model_fn(tokens, positions=None, cache=None):
    # The transformer is built outside language_model so that its parameters
    # are named "transformer/..." at the top level, as in the release.
    transformer = Transformer(config, tile_size, sharding)
    return LanguageModel(config, transformer)(tokens, positions, cache, jnp.dtype(dtype_name))
  return hk.without_apply_rng(hk.transform(model_fn))


def abstract_params(config: ModelConfig):
  """The parameter tree the Haiku modules create, as ShapeDtypeStructs (no weights, no compute)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(_transformed(config, "float32", None).init, jax.random.PRNGKey(0), tokens)


def init_params(config: ModelConfig, seed: int = 0):
  """Random float32 parameters with the release's names and shapes.

  Norm scales are 1; every other tensor is truncated normal with standard
  deviation 1/sqrt(fan_in) (the input width: D for the embeddings and the
  router), as the modules' own initializers. Built tensor by tensor, without
  tracing the model.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in sorted(manifest.parameter_shapes(config).items()):
    if name.endswith("/scale"):
      flat[name] = jnp.ones(shape, jnp.float32)
      continue
    fan_in = shape[-1] if name.endswith("embeddings") else shape[-2]
    flat[name] = jnp.asarray(_truncated_normal(rng, shape, 1 / math.sqrt(fan_in)))
  return manifest.unflatten(flat)


@functools.partial(jax.jit,
                   static_argnames=("config", "dtype", "return_routing", "tile_size", "sharding"))
def _forward(params, tokens, positions, cache, *, config, dtype, return_routing, tile_size,
             sharding):
  out = _transformed(config, dtype, tile_size, sharding).apply(params, tokens, positions, cache)
  return out if return_routing else out._replace(routing=None)


def forward(params, tokens, config: ModelConfig, *, dtype=jnp.bfloat16, positions=None,
            cache: KVCache | None = None, return_routing: bool = False,
            tile_size: int | None = None, sharding=None) -> ModelOutput:
  """Logits of `tokens` [B, T] (and the updated cache, and the routing when asked).

  Without a cache every row attends to its own tokens; with one, the new
  tokens are written at their positions (default: each row's `lengths`
  onwards) and attend to everything cached before them. Token `pad_token` is
  never attended to. Activations are in `dtype` (bfloat16 or float32); the
  router, norms, softmax and logits are float32.

  `sharding`, a `grok_moe.sharding.ShardingPlan` for this config, runs the
  pass over the plan's mesh; params, tokens and cache not yet placed the
  plan's way are placed first (`ShardingPlan.shard_params` once saves that).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if sharding is not None:
    sharding.check_config(config)
    params, tokens, positions, cache = sharding.put_inputs(params, tokens, positions, cache)
  return _forward(params, tokens, positions, cache, config=config,
                  dtype=_dtype_name(dtype), return_routing=return_routing, tile_size=tile_size,
                  sharding=sharding)

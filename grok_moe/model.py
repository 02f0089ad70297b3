"""The forward pass of Grok-style MoE transformers: one Haiku model whose decoder layers
run as a scan.

Axis letters: B batch, T new tokens, S cache slots (or keys), D model width,
V vocabulary, H query heads, K KV heads, d head width, L layers, N = B*T
tokens, k experts per token.

    x = embeddings[tokens] * embedding_multiplier_scale
    each layer:  h = x + rms_norm_1(attention(rms_norm(x)))
                 x = h + rms_norm_3(moe(rms_norm_2(h)))
    logits = rms_norm(x) @ embeddings.T * output_multiplier_scale

That is Grok-1; the switches of `ModelConfig` give the other families: no
post-norms (rms_norm_1, rms_norm_3) for Mixtral and Qwen, a shared expert
added to moe(...), Grok-2's dense MLP beside it ((mlp + moe) / sqrt(2)),
soft caps on the router and output logits, an untied output projection.

The parameters are those of the table in `grok_moe.params`: the decoder
layers' tensors stacked [L, ...], so the layers are one `lax.scan` whose body
is `decoder_layer`, compiled once whatever L is. The KV cache [L, B, S, K, d]
is carried through the scan whole and written in place at each layer's index.

Weights may be float or `quant.QuantizedWeight`; `quant.matmul` is the one
place they are used. With a `sharding.ShardingPlan`, the matmuls, the
attention core and the expert dispatch run under shard_map
(`grok_moe.sharded_ops`) with specs from the table's logical axes, and the
activations between them are laid out by sharding constraints.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from grok_moe import attention, moe, quant, sharded_ops
from grok_moe import params as P
from grok_moe.config import ModelConfig
from grok_moe.kv_cache import KVCache
from grok_moe.params import abstract_params, init_params  # noqa: F401  (re-exported)
from grok_moe.sharding import ShardingPlan
from grok_moe.soft_cap import soft_cap


class Routing(NamedTuple):
  expert_indices: jax.Array  # [L, B, T, k] int32
  gates: jax.Array           # [L, B, T, k] float32 softmax probabilities


class ModelOutput(NamedTuple):
  logits: jax.Array          # [B, T, V] float32 ([B, 1, V] with logits_index)
  cache: KVCache | None
  routing: Routing | None


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """scale * x / sqrt(mean(x^2) + eps), in float32; the scale is used as is."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * normed).astype(x.dtype)


class _Layer:
  """What `decoder_layer` needs besides its weights: the config, the plan, the MoE's tile
  size and the attention's cache chunk."""

  def __init__(self, config: ModelConfig, plan: ShardingPlan | None, tile_size: int | None,
               attention_chunk: int):
    self.config, self.plan, self.tile_size = config, plan, tile_size
    self.attention_chunk = attention_chunk

  def linear(self, x, weights, param: P.ParamSpec, layer):
    """x [..., in] @ layer `layer` of the stacked weight of kind `param` [L, in, out]."""
    if self.plan is None:
      return quant.matmul(x, weights[param.name], index=layer)
    return sharded_ops.matmul(x, weights[param.name], param, self.plan, layer)

  def constrain(self, x, axes):
    return x if self.plan is None else self.plan.constrain(x, axes)


def write_cache(cache, layer, positions, new):
  """cache [L, B, S, K, d] with new [B, T, K, d] written at [layer, row, positions[row, t]];
  positions past the cache (S or more) are dropped.

  One new token a row (decoding) is written with one dynamic_update_slice a
  row, which XLA does in place: a scatter there becomes an update with a
  bounds check fused over the whole cache, which on CPU converts a bfloat16
  cache to float32 and back on every layer of every step. A dropped token is
  written at slot S-1 with the value already there. Several tokens a row
  (prefill) are one scatter, whose cost is spread over the chunk.
  """
  num_slots = cache.shape[2]
  batch, num_new = positions.shape
  new = new.astype(cache.dtype)
  if num_new > 1:
    rows = jnp.arange(batch)[:, None]                                     # [B, 1]
    return cache.at[layer, rows, positions].set(new, mode="drop")
  for row in range(batch):
    position = positions[row, 0]
    slot = jnp.minimum(position, num_slots - 1)
    start = (layer, row, slot, 0, 0)
    there = jax.lax.dynamic_slice(cache, start, (1, 1, 1, *cache.shape[3:]))  # [1, 1, 1, K, d]
    value = jnp.where(position < num_slots, new[row][None, None].astype(jnp.float32),
                      there.astype(jnp.float32)).astype(cache.dtype)             # [1, 1, 1, K, d]
    cache = jax.lax.dynamic_update_slice(cache, value, start)
  return cache


def _attention(ctx: _Layer, weights, x, positions, token_valid, cache, layer):
  """Grouped-query self-attention with RoPE over the new tokens, or the cache.

  x [B, T, D]; positions, token_valid [B, T]; cache None or (keys, values
  [L, B, S, K, d], valid [B, S]). The new keys and values are written into
  the whole cache at [layer, row, position] and attention reads that layer
  there, never copied out. Returns [B, T, D] and the updated (keys, values).
  """
  cfg = ctx.config
  batch, num_new, _ = x.shape
  q, k, v = (ctx.linear(x, weights, param, layer) for param in (P.QUERY, P.KEY, P.VALUE))
  if cfg.qkv_bias:
    q, k, v = (y + quant.take(weights[bias.name], layer).astype(y.dtype)
               for y, bias in ((q, P.QUERY_BIAS), (k, P.KEY_BIAS), (v, P.VALUE_BIAS)))
  q = q.reshape(batch, num_new, cfg.num_q_heads, cfg.key_size)            # [B, T, H, d]
  k = k.reshape(batch, num_new, cfg.num_kv_heads, cfg.key_size)           # [B, T, K, d]
  v = v.reshape(batch, num_new, cfg.num_kv_heads, cfg.key_size)           # [B, T, K, d]
  if cfg.qk_norm:  # each head normalised over its d
    q = rms_norm(q, quant.take(weights[P.QUERY_NORM.name], layer), cfg.rms_norm_eps)
    k = rms_norm(k, quant.take(weights[P.KEY_NORM.name], layer), cfg.rms_norm_eps)
  q = attention.apply_rope(q, positions, cfg.rope_base)
  k = attention.apply_rope(k, positions, cfg.rope_base)

  if cache is None:
    keys, values, key_positions, key_valid = k, v, positions, token_valid
    read_layer = new_cache = None
  else:
    cached_keys, cached_values, key_valid = cache                         # [L, B, S, K, d]
    keys = write_cache(cached_keys, layer, positions, k)
    values = write_cache(cached_values, layer, positions, v)
    key_positions = jnp.arange(keys.shape[2])[None, :]                    # [1, S]
    read_layer, new_cache = layer, (keys, values)

  # A key is seen if it holds a real token at or before the query's position.
  mask = key_valid[:, None, :] & (key_positions[:, None, :] <= positions[:, :, None])  # [B, T, S]
  temperature = attention.temperature(jnp.broadcast_to(positions, (batch, num_new)), cfg)  # [B, T]
  if ctx.plan is None:
    out = attention.attend(q, keys, values, mask, cfg, layer=read_layer,
                           temperature=temperature, chunk=ctx.attention_chunk)  # [B, T, H*d]
  else:
    out = sharded_ops.attend(q, keys, values, mask, cfg, ctx.plan, layer=read_layer,
                             temperature=temperature, chunk=ctx.attention_chunk)
  return ctx.linear(out, weights, P.ATTENTION_OUT, layer), new_cache


def _gated_mlp(ctx: _Layer, weights, x, params: tuple[P.ParamSpec, ...], layer):
  """(act(x @ W) * (x @ V)) @ O with the tensors `params` = (W, V, O): a shared expert or
  the dense MLP. x [N, D] -> [N, D]."""
  w_in, w_v, w_out = params
  activation = moe.ACTIVATIONS[ctx.config.expert_activation]
  hidden = (activation(ctx.linear(x, weights, w_in, layer))
            * ctx.linear(x, weights, w_v, layer))                            # [N, F]
  return ctx.linear(hidden, weights, w_out, layer)                          # [N, D]


def _experts(ctx: _Layer, weights, x, layer):
  """Top-k routed mixture of gated experts, with a shared expert or a dense MLP where the
  config has one.

  x [N, D] -> [N, D], gates and indices [N, k]. The shared expert runs on
  every token, its output scaled by sigmoid(x @ w) with shared_expert_gate,
  and is added to the routed experts' output. The dense MLP (Grok-2) also
  runs on every token: the output is (mlp(x) + moe(x)) / sqrt(2).
  """
  cfg = ctx.config
  router = quant.take(weights[P.ROUTER.name], layer)                      # [D, E]
  gates, expert_indices = moe.route(x, router, cfg.num_selected_experts, cfg.router_renormalize,
                                    cfg.router_logit_cap)
  expert_params = (P.EXPERT_IN, P.EXPERT_GATE, P.EXPERT_OUT)
  expert_weights = tuple(weights[param.name] for param in expert_params)  # [L, E, ...]
  if ctx.plan is None:
    out = moe.sparse_moe(x, gates, expert_indices, *expert_weights, tile_size=ctx.tile_size,
                         layer=layer, activation=cfg.expert_activation)
  else:
    out = sharded_ops.sparse_moe(x, gates, expert_indices, *expert_weights, expert_params,
                                 ctx.plan, layer=layer, tile_size=ctx.tile_size,
                                 activation=cfg.expert_activation)
  if cfg.shared_expert_ffn_size:
    shared = _gated_mlp(ctx, weights, x, (P.SHARED_IN, P.SHARED_GATE, P.SHARED_OUT), layer)
    if cfg.shared_expert_gate:
      gate_w = quant.take(weights[P.SHARED_EXPERT_GATE.name], layer)      # [D, 1]
      shared = shared * jax.nn.sigmoid(
          jnp.matmul(x.astype(jnp.float32), gate_w.astype(jnp.float32))).astype(shared.dtype)
    out = out + shared
  if cfg.dense_ffn_size:
    dense = _gated_mlp(ctx, weights, x, (P.DENSE_IN, P.DENSE_GATE, P.DENSE_OUT), layer)
    out = (dense + out) / math.sqrt(2)
  return out, gates, expert_indices


def decoder_layer(ctx: _Layer, weights, x, positions, token_valid, cache, layer):
  """One decoder layer: attention then mixture of experts, each in a pre- and a post-norm.

  weights: {name within a layer: every layer's tensors [L, ...]}, of which
  layer `layer` (a traced index) is used, read in place: slicing a layer out
  first would copy all of its experts on every step, where decoding reads k.
  x [B, T, D] -> x [B, T, D], the updated cache (keys, values) or None, and
  the routing ([B, T, k] indices, gates).
  """
  eps = ctx.config.rms_norm_eps
  norm = lambda y, param: rms_norm(y, quant.take(weights[param.name], layer), eps)  # noqa: E731
  post_norm = norm if ctx.config.post_norms else (lambda y, param: y)  # noqa: E731
  attention_out, new_cache = _attention(ctx, weights, norm(x, P.PRE_ATTENTION_NORM), positions,
                                        token_valid, cache, layer)
  h = x + post_norm(attention_out, P.POST_ATTENTION_NORM)                 # [B, T, D]
  batch, num_new, width = h.shape
  moe_in = norm(h, P.PRE_MOE_NORM).reshape(batch * num_new, width)        # [N, D]
  moe_out, gates, expert_indices = _experts(ctx, weights, moe_in, layer)
  x = h + post_norm(moe_out.reshape(batch, num_new, width), P.POST_MOE_NORM)  # [B, T, D]
  x = ctx.constrain(x, ("batch", None, None))
  routing = (expert_indices.reshape(batch, num_new, -1), gates.reshape(batch, num_new, -1))
  return x, new_cache, routing


def _initializer(spec: P.ParamSpec):
  if spec.fan_in_axis is None:
    return lambda shape, dtype: jnp.full(shape, spec.init_value, dtype)
  def init(shape, dtype):
    stddev = 1 / math.sqrt(shape[spec.fan_in_axis])
    return hk.initializers.TruncatedNormal(stddev=stddev)(shape, dtype)
  return init


def _get_parameters(specs, config: ModelConfig, prefix: str) -> dict[str, jax.Array]:
  """{spec.name: tensor} of the table entries `specs` from the Haiku params, each under
  its in-memory name less `prefix` (the calling module's own name).

  Haiku renames a scope opened twice, so the module paths are opened as a
  tree, each scope once.
  """
  tree: dict = {}
  for spec in specs:
    *modules, param = spec.path.removeprefix(prefix).split("/")
    node = tree
    for module in modules:
      node = node.setdefault(module, {})
    node[param] = spec
  out = {}

  def visit(node):
    for key, child in node.items():
      if isinstance(child, P.ParamSpec):
        out[child.name] = hk.get_parameter(key, list(child.stored_shape(config)), jnp.float32,
                                           init=_initializer(child))
      else:
        with hk.name_scope(key):
          visit(child)

  visit(tree)
  return out


class Transformer(hk.Module):
  """The decoder layers, their weights stacked [L, ...] and run by one `lax.scan`."""

  def __init__(self, config: ModelConfig, plan: ShardingPlan | None, tile_size: int | None,
               attention_chunk: int):
    super().__init__(name="transformer")
    self.ctx = _Layer(config, plan, tile_size, attention_chunk)

  def __call__(self, x, positions, token_valid, cache_keys, cache_values, cache_valid):
    """x [B, T, D] -> x [B, T, D], the cache keys and values [L, B, S, K, d] (or None)
    and the routing [L, B, T, k]."""
    config = self.ctx.config
    stacked = _get_parameters(P.layer_params_for(config), config, "transformer/")  # {name: [L, ...]}

    def body(carry, layer):
      x, keys, values = carry
      cache = None if keys is None else (keys, values, cache_valid)
      x, new_cache, routing = decoder_layer(self.ctx, stacked, x, positions, token_valid,
                                            cache, layer)
      if new_cache is not None:
        keys, values = new_cache
      return (x, keys, values), routing

    # The stacked weights are loop invariants, indexed by the layer inside the body.
    layers = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x, keys, values), (indices, gates) = jax.lax.scan(
        body, (x, cache_keys, cache_values), layers)
    return x, keys, values, Routing(indices, gates)


class LanguageModel(hk.Module):
  """Tied input/output embeddings and the final norm around the transformer."""

  def __init__(self, config: ModelConfig, transformer: Transformer):
    super().__init__(name="language_model")
    self.config = config
    self.transformer = transformer

  def __call__(self, tokens, token_valid, positions, cache: KVCache | None, logits_index,
               dtype) -> ModelOutput:
    cfg = self.config
    if positions is None:
      start = 0 if cache is None else cache.lengths[:, None]
      positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]   # [B, T]

    own = _get_parameters([spec for spec in P.params_for(cfg) if not spec.per_layer], cfg,
                          "language_model/")
    embeddings = own[P.EMBEDDINGS.name]                                           # [V, D]
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

    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)             # [B, 1, D]
    x = rms_norm(x, own[P.FINAL_NORM.name], cfg.rms_norm_eps)
    output = embeddings if cfg.tie_embeddings else own[P.LM_HEAD.name]            # [V, D]
    logits = jnp.einsum("btd,vd->btv", x, output.astype(dtype),
                        preferred_element_type=jnp.float32)                       # [B, T, V]
    logits = logits * cfg.output_multiplier_scale
    logits = soft_cap(logits, cfg.final_logit_cap)
    return ModelOutput(logits, new_cache, routing)


@functools.lru_cache(maxsize=None)
def transformed(config: ModelConfig, dtype_name: str, tile_size: int | None,
                plan: ShardingPlan | None = None,
                attention_chunk: int = attention.DEFAULT_ATTENTION_CHUNK):
  """The Haiku-transformed model: apply(params, tokens, token_valid, positions, cache,
  logits_index)."""
  def model_fn(tokens, token_valid, positions=None, cache=None, logits_index=None):
    # The transformer is built outside language_model so that its parameters
    # are named "transformer/..." at the top level, as in the release.
    transformer = Transformer(config, plan, tile_size, attention_chunk)
    return LanguageModel(config, transformer)(tokens, token_valid, positions, cache,
                                              logits_index, jnp.dtype(dtype_name))
  return hk.without_apply_rng(hk.transform(model_fn))


def apply(params, tokens, token_valid, positions, cache, logits_index, *, config, dtype,
          return_routing, tile_size=None, sharding=None,
          attention_chunk: int = attention.DEFAULT_ATTENTION_CHUNK) -> ModelOutput:
  """The forward pass on prepared inputs, to be called inside jit (see `forward`)."""
  out = transformed(config, jnp.dtype(dtype).name, tile_size, sharding, attention_chunk).apply(
      params, tokens, token_valid, positions, cache, logits_index)
  return out if return_routing else out._replace(routing=None)


_apply_jit = jax.jit(apply, static_argnames=("config", "dtype", "return_routing", "tile_size",
                                             "sharding", "attention_chunk"))


def release_token_valid(tokens, config: ModelConfig) -> jax.Array:
  """The original release's rule for which tokens are real: ids above pad_token
  (GROK1_SPEC.md). grok_moe never applies it itself; pass it as `token_valid` to
  reproduce the release on inputs padded with pad_token."""
  return jnp.asarray(tokens) > config.pad_token


def forward(params, tokens, config: ModelConfig, *, dtype=jnp.bfloat16, token_valid=None,
            positions=None, cache: KVCache | None = None, logits_index=None,
            return_routing: bool = False, tile_size: int | None = None,
            sharding: ShardingPlan | None = None,
            attention_chunk: int = attention.DEFAULT_ATTENTION_CHUNK) -> ModelOutput:
  """Logits of `tokens` [B, T] (and the updated cache, and the routing when asked).

  `token_valid` [B, T] bool marks the real tokens (default: all); the others
  (padding) are never attended to and never counted in the cache's lengths,
  whatever their id (`release_token_valid` gives the release's rule, ids
  above pad_token). Without a cache every row attends to its own tokens;
  with one, the new tokens are written at their positions (default: each
  row's `lengths` onwards) and attend to everything cached before them.
  `logits_index` [B] computes the logits of one position per row only
  ([B, 1, V]). Activations are in `dtype` (bfloat16 or float32); the router,
  norms, softmax and logits are float32.

  `params` are the stacked tree (`grok_moe.params`); release-named params
  (decoder_layer_{i}) are stacked first, a copy on every call. `sharding`, a
  `grok_moe.sharding.ShardingPlan` for this config, runs the pass over the
  plan's mesh; params, tokens and cache not yet placed its way are placed first.
  `tile_size` (rows of the MoE's tiles, `moe.sparse_moe`) and `attention_chunk`
  (slots of a cache read at a time, `attention.attend`) tune speed and
  memory only.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if token_valid is None:
    token_valid = jnp.ones(tokens.shape, bool)
  token_valid = jnp.asarray(token_valid, bool)
  params = P.as_stacked(params, config)
  if logits_index is not None:
    logits_index = jnp.asarray(logits_index, jnp.int32)
  if sharding is not None:
    sharding.check_config(config)
    params = sharding.shard_params(params)
    tokens, token_valid = sharding.put_batch(tokens), sharding.put_batch(token_valid)
    if positions is not None:
      positions = sharding.put_batch(positions)
    if logits_index is not None:
      logits_index = sharding.put_batch(logits_index)
    if cache is not None:
      cache = sharding.shard_cache(cache)
  return _apply_jit(params, tokens, token_valid, positions, cache, logits_index, config=config,
                    dtype=jnp.dtype(dtype).name, return_routing=return_routing,
                    tile_size=tile_size, sharding=sharding, attention_chunk=attention_chunk)

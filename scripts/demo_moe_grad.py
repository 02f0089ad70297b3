"""A faster backward pass for `grok_moe.moe.sparse_moe`, for training the demo model.

Why: `sparse_moe` skips the tiles and experts no token uses with `lax.cond`,
but when JAX differentiates it the skipped work comes back: on 2 CPU cores the
gradient of one MoE layer (4096 tokens, D=128, F=344) takes ~10x its forward
pass, about what running every expert on every token costs. Written out by
hand, the backward pass keeps the skipping and takes ~3.5x less time, which
roughly doubles the demo's training throughput.

What: `sparse_moe_with_fast_grad` is `moe.sparse_moe` itself on the way
forward (the same function, so the same numbers) with a `jax.custom_vjp`
whose backward pass walks the same sorted (token, expert) assignments, expert
by expert and in tiles of `tile_size` rows (its own tiling: the result does not
depend on it), skipping empty experts and tiles, and for each tile:

    1. gathers the tile's tokens x_t and the output cotangent g_t of those tokens;
    2. recomputes the expert's output y_t = expert_ffn(x_t) and takes its VJP;
    3. d gate  = <g_t, y_t> per row;
       d x_t, d W = VJP(g_t * gate)  (rows past the expert's count carry gate 0);
    4. scatter-adds d x_t onto the tokens, d gate onto the assignments, and
       sums d W into the expert's weight gradients.

`fast_moe_grad()` is a Haiku method interceptor that makes the model's
`MoEFeedForward` use it while a training step is traced. It builds the expert
weights under the same names as `MoEFeedForward`, so the parameter tree is the
release's. Float weights only (training); the expert indices get no gradient.
This belongs in `grok_moe/moe.py` as `sparse_moe`'s own VJP; until then it
lives beside the training script, and `tests/test_demo.py` holds it to JAX's
gradient of `moe.dense_moe` (the same function, computed plainly).
"""

from __future__ import annotations

import contextlib
import functools

import haiku as hk
import jax
import jax.numpy as jnp

from grok_moe import model, moe

DEFAULT_TILE_SIZE = 256  # backward tile rows when the caller gives none


def _sorted_assignments(gates, expert_indices, num_experts):
    """The (token, expert) assignments sorted by expert, as `moe.sparse_moe` sorts them.

    gates, expert_indices [N, k] -> order [A], sorted tokens [A], sorted gates [A],
    counts [E] and each expert's first row [E], with A = N*k.
    """
    num_tokens, k = expert_indices.shape
    flat_experts = expert_indices.reshape(num_tokens * k)                        # [A]
    order = jnp.argsort(flat_experts, stable=True)                               # [A]
    sorted_tokens = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)[order]  # [A]
    sorted_gates = gates.reshape(num_tokens * k)[order]                          # [A]
    counts = jnp.bincount(flat_experts, length=num_experts)                      # [E]
    return order, sorted_tokens, sorted_gates, counts, jnp.cumsum(counts) - counts


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def sparse_moe_with_fast_grad(x, gates, expert_indices, w_in, w_v, w_out, tile_size):
    """`moe.sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, tile_size=tile_size)`."""
    return moe.sparse_moe(x, gates, expert_indices, w_in, w_v, w_out, tile_size=tile_size)


def _forward(x, gates, expert_indices, w_in, w_v, w_out, tile_size):
    out = sparse_moe_with_fast_grad(x, gates, expert_indices, w_in, w_v, w_out, tile_size)
    return out, (x, gates, expert_indices, w_in, w_v, w_out)


def _backward(tile_size, residuals, out_grad):
    """Cotangents of x [N, D], gates [N, k] and the expert weights, from out_grad [N, D]."""
    x, gates, expert_indices, w_in, w_v, w_out = residuals
    num_tokens, k = expert_indices.shape
    num_experts = w_in.shape[0]
    tile = max(1, min(tile_size or DEFAULT_TILE_SIZE, num_tokens))  # an expert has <= N rows
    max_tiles = -(-num_tokens // tile)
    order, sorted_tokens, sorted_gates, counts, row_begin = _sorted_assignments(
        gates, expert_indices, num_experts)
    out_grad = out_grad.astype(jnp.float32)

    def run_expert(carry, expert):
        count = counts[expert]
        weights = [w[expert] for w in (w_in, w_v, w_out)]                      # [D, F], [D, F], [F, D]
        zero_weight_grads = [jnp.zeros_like(w) for w in weights]

        def run_tile(tile_carry, tile_index):
            def compute(tile_carry):
                x_grad, gate_grad, weight_grads = tile_carry
                within = tile_index * tile + jnp.arange(tile)                   # [C]
                valid = within < count                                          # [C]
                rows = jnp.where(valid, row_begin[expert] + within, 0)          # [C]
                tokens = sorted_tokens[rows]                                    # [C]
                row_gates = jnp.where(valid, sorted_gates[rows], 0.0)           # [C]
                y, expert_vjp = jax.vjp(moe.expert_ffn, x[tokens], *weights)    # y [C, D]
                row_grad = out_grad[tokens]                                     # [C, D]
                row_gate_grad = jnp.where(valid, jnp.sum(row_grad * y, axis=-1), 0.0)  # [C]
                rows_x_grad, *tile_weight_grads = expert_vjp(
                    (row_grad * row_gates[:, None]).astype(y.dtype))
                return (x_grad.at[tokens].add(rows_x_grad.astype(jnp.float32)),
                        gate_grad.at[rows].add(row_gate_grad),
                        [a + b for a, b in zip(weight_grads, tile_weight_grads)])

            return jax.lax.cond(tile_index * tile < count, compute, lambda c: c, tile_carry), None

        def process(carry):
            (x_grad, gate_grad, weight_grads), _ = jax.lax.scan(
                run_tile, (*carry, zero_weight_grads), jnp.arange(max_tiles))
            return (x_grad, gate_grad), weight_grads

        return jax.lax.cond(count > 0, process, lambda c: (c, zero_weight_grads), carry)

    init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros(num_tokens * k, jnp.float32))
    (x_grad, sorted_gate_grad), (w_in_grad, w_v_grad, w_out_grad) = jax.lax.scan(
        run_expert, init, jnp.arange(num_experts))                              # grads [E, ...]
    gates_grad = jnp.zeros_like(sorted_gate_grad).at[order].set(sorted_gate_grad)  # [A], unsorted
    return (x_grad.astype(x.dtype), gates_grad.reshape(gates.shape).astype(gates.dtype), None,
            w_in_grad, w_v_grad, w_out_grad)


sparse_moe_with_fast_grad.defvjp(_forward, _backward)


def _moe_interceptor(next_method, args, kwargs, context):
    """Runs `MoEFeedForward.__call__` with `sparse_moe_with_fast_grad`; other methods as they are."""
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, model.MoEFeedForward)
            or getattr(module, "sharding", None) is not None):
        return next_method(*args, **kwargs)
    x, gates, expert_indices = args
    cfg = module.config
    E, D, F = cfg.num_experts, cfg.emb_size, cfg.ffn_size
    # Inside the module's scope, so these are moe/linear, moe/linear_v, moe/linear_1 as usual.
    w_in = model.ExpertWeights((E, D, F), name="linear")()
    w_v = model.ExpertWeights((E, D, F), name="linear_v")()
    w_out = model.ExpertWeights((E, F, D), name="linear_1")()
    return sparse_moe_with_fast_grad(x, gates, expert_indices, w_in, w_v, w_out, module.tile_size)


@contextlib.contextmanager
def fast_moe_grad():
    """While active, a model traced through `grok_moe.forward` uses the fast MoE backward.

    Enter it around the first call (the trace) of a jitted training step. The
    forward numbers do not change. Use a `tile_size` of its own for training, so
    that `forward`'s compilation cache never hands this trace to other callers.
    """
    with hk.intercept_methods(_moe_interceptor):
        yield

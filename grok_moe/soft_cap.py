"""The soft cap of logits, c * tanh(x / c): Grok-1's attention logits, Grok-2's router
and final logits (a cap of 0 means none)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap), elementwise, which keeps |x| below cap and is close to x where
  |x| << cap; x itself when cap is 0."""
  return cap * jnp.tanh(x / cap) if cap else x

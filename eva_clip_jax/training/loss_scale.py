"""Dynamic loss scaling for float16 training, DeepSpeed's DynamicLossScaler as a jit-able function of a pytree.

The settings come from the recipe's `config.loss_scale` (the reference's: initial scale 2^16, window 1000, hysteresis 2
(delayed_shift), min scale 1); factor 2 and consecutive_hysteresis False as DeepSpeed has them. A step whose gradients are not finite is skipped (`select_tree` keeps the
old parameters and optimizer state) and, once the hysteresis is used up, halves the scale; 1000 finite steps since
the last overflow double it. Unlike DeepSpeed, an overflow at the minimum scale keeps it there instead of raising.

Disabled (bfloat16, float32): the scale stays 1, but non-finite steps are still skipped and counted, so one bad
batch cannot write NaNs into the weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LossScaleState:
  scale: jax.Array  # float32: multiply the loss by it, divide the gradients by it
  cur_hysteresis: jax.Array  # int32: overflows still tolerated before the scale drops
  last_overflow_iter: jax.Array  # int32
  cur_iter: jax.Array  # int32
  skipped: jax.Array  # int32: steps skipped so far (DeepSpeed's skipped_steps)
  enabled: bool = struct.field(pytree_node=False)
  window: int = struct.field(pytree_node=False)
  hysteresis: int = struct.field(pytree_node=False)
  min_scale: float = struct.field(pytree_node=False)
  factor: float = struct.field(pytree_node=False, default=2.0)


def init_loss_scale(enabled: bool, *, initial_power: int, window: int, hysteresis: int,
                    min_scale: float) -> LossScaleState:
  i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
  return LossScaleState(scale=jnp.asarray(2.0 ** initial_power if enabled else 1.0, jnp.float32),
                        cur_hysteresis=i32(hysteresis), last_overflow_iter=i32(-1), cur_iter=i32(0), skipped=i32(0),
                        enabled=enabled, window=window, hysteresis=hysteresis, min_scale=min_scale)


def all_finite(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def update_loss_scale(state: LossScaleState, finite: jax.Array) -> LossScaleState:
  """DynamicLossScaler.update_scale(overflow=not finite)."""
  overflow = jnp.logical_not(finite)
  scale, hyst = state.scale, state.cur_hysteresis
  if state.enabled:
    # Overflow: halve once the hysteresis is down to 1 (it then stays at 1 until the window resets it).
    shrink = overflow & ((state.hysteresis == 1) | (hyst == 1))
    # No overflow: grow every `window` iterations counted from the last overflow, resetting the hysteresis.
    grow = finite & ((state.cur_iter - state.last_overflow_iter) % state.window == 0)
    scale = jnp.where(shrink, jnp.maximum(scale / state.factor, state.min_scale),
                      jnp.where(grow, scale * state.factor, scale))
    hyst = jnp.where(overflow & ~shrink, hyst - 1, jnp.where(grow, state.hysteresis, hyst))
  return state.replace(scale=scale.astype(jnp.float32), cur_hysteresis=hyst.astype(jnp.int32),
                       last_overflow_iter=jnp.where(overflow, state.cur_iter, state.last_overflow_iter),
                       cur_iter=state.cur_iter + 1, skipped=state.skipped + overflow.astype(jnp.int32))


def select_tree(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the step was finite, else `old` (skips the step without a Python branch)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

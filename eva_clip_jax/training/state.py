"""The train state: one typed pytree that orbax saves, `jax.jit` shards and the step updates.

Fields (named here only):
  step        int32, optimizer steps taken (skipped fp16 steps included)
  params      the model's parameters as a pure nested dict (`nnx.State.to_pure_dict()` layout)
  opt_state   the optimizer's state (moments shaped like the parameters)
  loss_scale  dynamic loss-scaling state, with the count of skipped steps; scale 1 and inert unless float16
  rng         raw key data; step i uses fold_in(rng, i), so a resumed run draws the same masks
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_clip_jax.training.loss_scale import LossScaleState


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  loss_scale: LossScaleState
  rng: jax.Array

  @classmethod
  def create(cls, *, params: Any, tx: optax.GradientTransformation, loss_scale: LossScaleState,
             seed: int) -> TrainState:
    """A fresh state at step 0 (traceable: run it under `jax.jit` or `jax.eval_shape`)."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), loss_scale=loss_scale,
               rng=jax.random.key_data(jax.random.key(seed)))

  def shardings(self, *, params: Any, moments: Any, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """This (abstract) state's shardings: `params` for the parameters, `moments` for optimizer-state tensors shaped
    like them, everything else replicated."""
    replicated = NamedSharding(mesh, P())
    opt_state = optax.tree_map_params(tx, lambda _, s: s, self.opt_state, moments,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt_state,
                      loss_scale=jax.tree.map(lambda _: replicated, self.loss_scale), rng=replicated)

  def with_shardings(self, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying `shardings` (what orbax restores into and what AOT compiles take)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self, shardings)

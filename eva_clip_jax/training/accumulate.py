"""Contrastive gradient accumulation: a global batch run as K micro-batches with the loss and gradients of the whole
batch (GradCache, Gao et al. 2021; open_clip's --accum-freq).

A contrastive loss couples every sample with every other, so summing per-micro-batch losses would train a smaller
batch. Instead, in one step:
  1. every micro-batch's features are computed (forward only, nothing kept for the backward pass);
  2. the loss of the whole batch and its gradient with respect to those cached features (cheap: [B, E] arrays);
  3. each micro-batch's towers run again under `jax.vjp`, which back-propagates its slice of the feature gradients
     into the parameters; the K parameter gradients are summed.
The result equals the full-batch gradient; the activations held at once are one micro-batch's. The cost is one
more forward pass. Micro-batch k draws its patch-dropout and drop-path masks from fold_in(rng, k) in both passes,
so the re-run sees the features the loss was taken at.

The micro-batches are sharded like the batch: micro-batch k takes B / (K D) rows of each of the D data-parallel
devices' share (a local reshape, no communication), and the cached features are put back in the batch's order
the same way, so the sharded loss sees exactly the full batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# encode(params, images, text, rng) -> (image_features, text_features, logit_scale)
EncodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
# loss(image_features, text_features, logit_scale) -> scalar (what is differentiated: scaled by the loss scale)
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def split_micro_batches(x: jax.Array, accum_steps: int, num_shards: int) -> jax.Array:
  """[B, ...] -> [K, B / K, ...]: micro-batch k holds rows k*m .. (k+1)*m - 1 of every shard's B / D rows
  (m = B / (K D)), so each micro-batch spans all devices and no row leaves its device."""
  batch, rest = x.shape[0], x.shape[1:]
  if batch % (accum_steps * num_shards):
    raise ValueError(f'batch {batch} does not split into {accum_steps} micro-batches over {num_shards} devices')
  m = batch // (accum_steps * num_shards)
  return x.reshape(num_shards, accum_steps, m, *rest).swapaxes(0, 1).reshape(accum_steps, num_shards * m, *rest)


def join_micro_batches(x: jax.Array, num_shards: int) -> jax.Array:
  """The inverse of `split_micro_batches`: [K, B / K, ...] -> [B, ...] in the batch's own order."""
  accum_steps, per_step, rest = x.shape[0], x.shape[1], x.shape[2:]
  m = per_step // num_shards
  return x.reshape(accum_steps, num_shards, m, *rest).swapaxes(0, 1).reshape(accum_steps * per_step, *rest)


def accumulated_value_and_grad(encode: EncodeFn, loss_fn: LossFn, params: Any, batch: dict, rng: jax.Array, *,
                               accum_steps: int, mesh: Mesh, batch_axes: tuple[str, ...]
                               ) -> tuple[jax.Array, jax.Array, Any]:
  """(loss, logit_scale, gradient of loss_fn w.r.t. params) of the whole batch, `accum_steps` micro-batches at a
  time. `batch` holds 'image' and 'text' sharded over `batch_axes`; `rng` is a typed key."""
  num_shards = 1
  for axis in batch_axes:
    num_shards *= mesh.shape[axis]
  micro_sharding = NamedSharding(mesh, P(None, batch_axes))
  batch_sharding = NamedSharding(mesh, P(batch_axes))

  def split(x):
    return jax.lax.with_sharding_constraint(split_micro_batches(x, accum_steps, num_shards), micro_sharding)

  def join(x):
    return jax.lax.with_sharding_constraint(join_micro_batches(x, num_shards), batch_sharding)

  micro = (split(batch['image']), split(batch['text']), jax.random.split(rng, accum_steps))

  # 1. Features of every micro-batch, forward only.
  def forward(_, xs):
    images, text, key = xs
    image_features, text_features, logit_scale = encode(params, images, text, key)
    return None, (image_features, text_features, logit_scale)

  _, (image_features, text_features, logit_scales) = jax.lax.scan(forward, None, micro)
  logit_scale = logit_scales[0]  # a function of the parameters alone

  # 2. The whole batch's loss and its gradient with respect to the cached features.
  loss, (d_image, d_text, d_scale) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(
      join(image_features), join(text_features), logit_scale)
  d_image, d_text = split(d_image), split(d_text)

  # 3. Each micro-batch's towers again, back-propagating its slice of the feature gradients.
  def backward(total, xs):
    images, text, key, g_image, g_text, first = xs
    _, vjp = jax.vjp(lambda p: encode(p, images, text, key), params)
    # The logit scale's cotangent is the whole batch's: counted once.
    (grads,) = vjp((g_image, g_text, jnp.where(first, d_scale, jnp.zeros_like(d_scale))))
    return jax.tree.map(jnp.add, total, grads), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  first = jnp.arange(accum_steps) == 0
  grads, _ = jax.lax.scan(backward, zeros, (*micro, d_image, d_text, first))
  return loss, logit_scale, grads

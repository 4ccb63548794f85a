"""Symmetric InfoNCE over the global batch, computed the reference's way ("local loss + gather with grad").

Each data-parallel device gathers every device's features (the all-gather's transpose, a reduce-scatter, carries
the gradients back) and computes only the loss rows of its own samples: logits are [local, global], so memory
grows with local x global rather than global^2. The mean over all rows equals open_clip's `ClipLoss(local_loss=True,
gather_with_grad=True)` after DDP's gradient averaging.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


def _cross_entropy_sum(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
  return -jnp.sum(targets * log_probs)


def _local_rows(image_features, text_features, all_image, all_text, scale, offset, label_smoothing):
  """Summed loss of the rows of this device's samples against the global batch."""
  labels = offset + jnp.arange(image_features.shape[0])
  logits_per_image = scale * image_features @ all_text.T
  logits_per_text = scale * text_features @ all_image.T
  return (_cross_entropy_sum(logits_per_image, labels, label_smoothing)
          + _cross_entropy_sum(logits_per_text, labels, label_smoothing)) / 2


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *,
              label_smoothing: float = 0.0) -> jax.Array:
  """Single-device reference: mean over the batch of (CE(image->text) + CE(text->image)) / 2."""
  total = _local_rows(image_features, text_features, image_features, text_features, logit_scale, 0,
                      label_smoothing)
  return total / image_features.shape[0]


def sharded_clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *, mesh: Mesh,
                      batch_axes: Sequence[str], label_smoothing: float = 0.0) -> jax.Array:
  """The same loss with features sharded over `batch_axes` of `mesh` (inside or outside jit)."""
  batch_axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)
  if not batch_axes:
    return clip_loss(image_features, text_features, logit_scale, label_smoothing=label_smoothing)
  global_batch = image_features.shape[0]
  num_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
  if global_batch % num_shards:
    raise ValueError(f'global batch {global_batch} is not divisible by the {num_shards} data-parallel devices')

  def local(image_features, text_features, scale):
    all_image = jax.lax.all_gather(image_features, batch_axes, tiled=True)
    all_text = jax.lax.all_gather(text_features, batch_axes, tiled=True)
    offset = jax.lax.axis_index(batch_axes) * image_features.shape[0]
    rows = _local_rows(image_features, text_features, all_image, all_text, scale, offset, label_smoothing)
    return jax.lax.psum(rows, batch_axes) / global_batch

  return jax.shard_map(local, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), P()), out_specs=P())(
      image_features, text_features, logit_scale)

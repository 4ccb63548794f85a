"""Feature extraction sharded over every device of every process.

The batch is split over a one-axis 'data' mesh (padded to a multiple of the device count, then trimmed), the
parameters are replicated, and the features come back to each host in order. On one device this is a plain
jitted call; the tests check that 8 devices give the same features.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


class FeatureExtractor:
  """Normalised image and text features of `model`, computed on all devices of `mesh`."""

  def __init__(self, model: nnx.Module, mesh: Mesh | None = None):
    self.mesh = mesh or data_mesh()
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(self.mesh, P())
    self._state = jax.device_put(state, replicated)
    self._batch_sharding = NamedSharding(self.mesh, P('data'))

    def encode(which: str) -> Callable:
      def fn(state, x):
        model = nnx.merge(graphdef, state)
        return getattr(model, which)(x, normalize=True)
      return jax.jit(fn, in_shardings=(replicated, self._batch_sharding), out_shardings=self._batch_sharding)

    self._encode_image, self._encode_text = encode('encode_image'), encode('encode_text')

  def _run(self, fn, local: np.ndarray) -> np.ndarray:
    local = np.asarray(local)
    n = local.shape[0]
    per_process = jax.local_device_count()
    padded = -(-n // per_process) * per_process
    if padded != n:
      local = np.concatenate([local, np.repeat(local[-1:], padded - n, axis=0)])
    if jax.process_count() > 1:
      # Every process must pass the same padded size; pad to the largest.
      padded = int(multihost_utils.process_allgather(np.asarray(padded)).max())
      if local.shape[0] < padded:
        local = np.concatenate([local, np.repeat(local[-1:], padded - local.shape[0], axis=0)])
    global_batch = jax.make_array_from_process_local_data(self._batch_sharding, local)
    out = fn(self._state, global_batch)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
      rank = jax.process_index()
      return np.asarray(out)[rank * padded: rank * padded + n]
    return np.asarray(out)[:n]

  def images(self, images: np.ndarray) -> np.ndarray:
    return self._run(self._encode_image, images)

  def texts(self, tokens: np.ndarray) -> np.ndarray:
    return self._run(self._encode_text, tokens)

  def images_from(self, batches: Iterable[dict], key: str = 'image') -> tuple[np.ndarray, list[dict]]:
    """Features of every batch's `key`, concatenated; also returns the batches' other fields."""
    features, others = [], []
    for batch in batches:
      features.append(self.images(batch[key]))
      others.append({k: v for k, v in batch.items() if k != key})
    if not features:
      raise ValueError('the evaluation data yielded no batches')
    return np.concatenate(features), others

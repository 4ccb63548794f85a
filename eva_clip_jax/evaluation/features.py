"""Feature extraction on the training mesh, compiled once per run.

A `FeatureExtractor` is built from the trainer's pure `model_fn(params) -> nnx.Module`, the mesh and the parameters'
shardings: its two jitted encoders take the parameters as an argument, sharded exactly as training keeps them (under
fsdp no replicated copy is made), and the batch split over the mesh's data-parallel axes ('data', 'fsdp'). Every
evaluation, every dataset and every later step reuse the same two executables as long as the batch shape is the
same, so batches are padded to one fixed size.

`extractor.bind(params)` gives the per-run view the scoring code uses (`.images(x)`, `.texts(tokens)`).
`FeatureExtractor.for_model(model)` wraps a standalone model (notebooks, tests) on a one-axis data mesh.
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_clip_jax.errors import InputError
from eva_clip_jax.models.factory import model_from_params

BATCH_AXES = ('data', 'fsdp')  # the training mesh's data-parallel axes (sharding.py)


def data_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


class FeatureExtractor:
  """Normalised image and text features, computed on every device of `mesh`.

  model_fn: params (a pure dict) -> nnx.Module, traceable inside jit.
  param_shardings: a NamedSharding per parameter leaf (the training shardings).
  batch_size: the per-process batch every call is padded to (one compiled shape per tower); None: the first
    call's size rounded up to the data-parallel width.
  trace_context: a context the towers are traced in, from the caller (training's activation sharding, which pins
    the activations' batch dimension to the data-parallel axes under fsdp); none by default.
  """

  def __init__(self, model_fn: Callable[[Any], nnx.Module], mesh: Mesh, param_shardings: Any,
               batch_size: int | None = None, trace_context: Callable[[], Any] = contextlib.nullcontext):
    self.mesh, self.param_shardings = mesh, param_shardings
    axes = batch_axes(mesh)
    self.batch_sharding = NamedSharding(mesh, P(axes or None))
    dp = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    self._multiple = max(1, dp // jax.process_count())  # local rows must split evenly over local batch shards
    self.batch_size = None if batch_size is None else -(-batch_size // self._multiple) * self._multiple

    def encoder(which: str) -> Callable:
      def fn(params, x):
        with trace_context():
          return getattr(model_fn(params), which)(x, normalize=True)
      return jax.jit(fn, in_shardings=(param_shardings, self.batch_sharding), out_shardings=self.batch_sharding)

    self.encode_image, self.encode_text = encoder('encode_image'), encoder('encode_text')
    self._classifiers: dict = {}  # (classnames, templates) -> classifier, for the parameters in _classifier_params
    self._classifier_params = None

  @classmethod
  def for_model(cls, model: nnx.Module, mesh: Mesh | None = None, batch_size: int | None = None) -> 'BoundExtractor':
    """A standalone model's features, its parameters replicated over a data mesh (all devices by default)."""
    mesh = mesh or data_mesh()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def model_fn(p):
      return model_from_params(graphdef, params, p, rest)

    pure = params.to_pure_dict()
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), pure)
    extractor = cls(model_fn, mesh, replicated, batch_size)
    return extractor.bind(jax.device_put(pure, replicated))

  def bind(self, params: Any) -> 'BoundExtractor':
    return BoundExtractor(self, params)

  def classifier_cache(self, params: Any) -> dict:
    """The class-text embeddings computed for these parameters (emptied when the parameters change: a new
    training step hands in new arrays)."""
    leaf = jax.tree.leaves(params)[0]
    if self._classifier_params is not leaf:
      self._classifiers, self._classifier_params = {}, leaf
    return self._classifiers

  def run(self, fn: Callable, params: Any, local: np.ndarray) -> np.ndarray:
    """fn(params, global batch) on this process's rows `local`, padded to the fixed size; the rows come back
    in order, on this process."""
    local = np.asarray(local)
    n = local.shape[0]
    if self.batch_size is None:
      self.batch_size = max(1, -(-n // self._multiple)) * self._multiple
    total = n
    if jax.process_count() > 1:  # every process must make the same number of calls
      total = int(np.asarray(multihost_utils.process_allgather(np.asarray(n))).max())
    outs = [self._run_padded(fn, params, local[i:i + self.batch_size], local.shape[1:], local.dtype)
            for i in range(0, max(total, 1), self.batch_size)]
    return np.concatenate(outs)[:n]

  def _run_padded(self, fn: Callable, params: Any, chunk: np.ndarray, row_shape, dtype) -> np.ndarray:
    n = chunk.shape[0]
    if n < self.batch_size:
      pad_row = chunk[-1:] if n else np.zeros((1, *row_shape), dtype)
      chunk = np.concatenate([chunk, np.repeat(pad_row, self.batch_size - n, axis=0)])
    global_batch = jax.make_array_from_process_local_data(self.batch_sharding, chunk)
    out = fn(params, global_batch)
    if jax.process_count() > 1:  # every process gets its own rows back
      out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
      rank = jax.process_index()
      return out[rank * self.batch_size: rank * self.batch_size + n].astype(np.float32)
    return np.asarray(out)[:n].astype(np.float32)  # scoring is in float32 whatever the towers computed in


def in_lockstep(batches: Iterable[dict], encoders: Mapping[str, Callable[[np.ndarray], np.ndarray]]
                ) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
  """(batch, {key: encoders[key](batch[key])}) for this process's batches. With several processes each encoder call
  is a collective: a process whose share ran out keeps calling every encoder with no rows until all are done."""
  iterator, rows = iter(batches), None
  while True:
    batch = next(iterator, None)
    if batch is not None:
      rows = {key: np.empty((0, *np.shape(batch[key])[1:]), np.asarray(batch[key]).dtype) for key in encoders}
    if jax.process_count() > 1:
      if not np.asarray(multihost_utils.process_allgather(np.asarray(batch is not None))).any():
        return
      if batch is None:
        if rows is None:
          raise InputError('this process had no data while others did (fewer examples or shards than processes)')
        for key, encode in encoders.items():
          encode(rows[key])
        continue
    elif batch is None:
      return
    yield batch, {key: encode(batch[key]) for key, encode in encoders.items()}


class BoundExtractor:
  """A FeatureExtractor with one set of parameters: what zero-shot and retrieval scoring call."""

  def __init__(self, extractor: FeatureExtractor, params: Any):
    self.extractor, self.params = extractor, params

  @property
  def classifiers(self) -> dict:
    return self.extractor.classifier_cache(self.params)

  def images(self, images: np.ndarray) -> np.ndarray:
    return self.extractor.run(self.extractor.encode_image, self.params, images)

  def texts(self, tokens: np.ndarray) -> np.ndarray:
    return self.extractor.run(self.extractor.encode_text, self.params, tokens)

  def images_from(self, batches: Iterable[dict], key: str = 'image',
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[dict]]:
    """Features of every batch's `key`, concatenated; also returns the batches' other fields."""
    features, others = [], []
    for batch, batch_features in in_lockstep(batches, {key: self.images}):
      features.append(batch_features[key])
      others.append({k: v for k, v in batch.items() if k != key})
      if progress:
        progress(len(batch[key]))
    if not features:
      raise InputError('the evaluation data yielded no batches')
    return np.concatenate(features), others


def paired_features(bound, batches) -> tuple[np.ndarray, np.ndarray]:
  """(image features, text features) of the valid pairs of `batches`."""
  images, texts = [], []
  for batch in batches:
    keep = np.asarray(batch['valid'], bool)
    images.append(bound.images(batch['image'])[keep])
    texts.append(bound.texts(batch['text'])[keep])
  if not images:
    raise InputError('the evaluation data yielded no batches')
  return np.concatenate(images), np.concatenate(texts)

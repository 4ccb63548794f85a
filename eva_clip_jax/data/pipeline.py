"""grain input pipelines: webdataset shards -> decoded, augmented, tokenised, batched examples.

Training: each process takes its share of the shards (shards[process_index::process_count]); the shard order
is reshuffled every epoch from the seed; several shards are read at once (interleave) and a sample buffer
shuffles across them; sources mix by weight, sample by sample or (mixing='batch', as the reference's loader) whole
batches at a time; `resampled` draws shards with replacement (--dataset-resampled); decoding runs in `num_workers`
processes. Evaluation: one pass,
in order, last batch kept.

Training crops are uint8 (the train step normalises them on the accelerator) and JPEGs are decoded only at the
scale the crop needs (data/decode.py); evaluation images are open_clip's exact transform, float32.

Samples that cannot be used (truncated tar, unreadable shard, undecodable image, missing or non-UTF-8 or empty
caption) are dropped and counted: every example carries `skipped`, the number of samples of each reason in
SKIP_REASONS dropped since the previous good one, then the storage client's retries of transient failures (its
last column), so counts survive worker processes and batching (sum over the batch).
A finite pass that ends in bad samples yields one placeholder example with `valid` False and label -1.

The iterator is checkpointable: `it.get_state()` / `it.set_state(state)` resume with exactly the next batches.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import grain
import numpy as np

from eva_clip_jax import transforms
from eva_clip_jax.data import decode, workers
from eva_clip_jax.data.shards import ERROR_KEY, RETRIES_KEY, TarShardIterDataset, list_shards
from eva_clip_jax.errors import InputError
from eva_clip_jax.tokenizer import get_tokenizer

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
SKIP_REASONS = ('corrupt_tar', 'unreadable_shard', 'missing_image', 'bad_image', 'missing_caption', 'bad_caption',
                'empty_caption')
# The columns of an example's `skipped` counts: the skip reasons, then the storage client's retries.
COUNTS = SKIP_REASONS + ('storage_retries',)
SKIP_KEY = '__skip__'


class _EpochShuffledShards(grain.MapDataset):
  """Shard paths for `num_epochs` epochs, each epoch in its own seeded order."""

  def __init__(self, shards: Sequence[str], seed: int, num_epochs: int, shuffle: bool):
    super().__init__()
    self._shards, self._seed, self._num_epochs, self._shuffle = list(shards), seed, num_epochs, shuffle
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation): computed once per epoch

  def __len__(self) -> int:
    return len(self._shards) * self._num_epochs

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, len(self._shards))
    if not self._shuffle:
      return self._shards[position]
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self._seed, epoch]).permutation(len(self._shards)))
    return self._shards[self._order[1][position]]


class _ResampledShards(grain.MapDataset):
  """Shard paths drawn with replacement (open_clip's --dataset-resampled): position i is a seeded draw from all
  of a source's shards, a function of (seed, process, i) alone, so a resumed iterator draws the same ones."""

  def __init__(self, shards: Sequence[str], seed: int, process_index: int, length: int):
    super().__init__()
    self._shards, self._seed, self._process, self._length = list(shards), seed, process_index, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    draw = np.random.default_rng([self._seed, self._process, index]).integers(len(self._shards))
    return self._shards[int(draw)]


MIXING = ('sample', 'batch')


class DecodeSample(grain.transforms.RandomMap):
  """Raw shard sample -> {'image', 'text' [L] int32, 'label' int32} or a skip record.

  Training images are uint8 [S, S, 3] random-resized crops (normalised in the train step), JPEGs decoded at
  reduced scale; `reduced_decode=False` decodes at full resolution, `uint8_images=False` normalises on the host
  to float32 (the pipeline as it was before both). Evaluation images are always the exact eval transform, float32.
  """

  def __init__(self, image_size: int, context_length: int, is_train: bool, scale=(0.9, 1.0), *,
               reduced_decode: bool = True, uint8_images: bool = True):
    self.image_size, self.context_length, self.is_train, self.scale = image_size, context_length, is_train, scale
    self.reduced_decode, self.uint8_images = reduced_decode, uint8_images
    self._eval_transform = transforms.image_transform(image_size, is_train=False)

  def random_map(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out = self._decode(sample, rng)
    if RETRIES_KEY in sample:
      out[RETRIES_KEY] = sample[RETRIES_KEY]
    return out

  def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if ERROR_KEY in sample:
      return {SKIP_KEY: sample[ERROR_KEY]}
    image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if image_ext is None:
      return {SKIP_KEY: 'missing_image'}
    if 'txt' not in sample:
      return {SKIP_KEY: 'missing_caption'}
    try:
      caption = sample['txt'].decode('utf-8')
    except UnicodeDecodeError:
      return {SKIP_KEY: 'bad_caption'}
    if not caption.strip():
      return {SKIP_KEY: 'empty_caption'}
    try:
      if self.is_train:
        pixels = decode.decode_train_crop(sample[image_ext], self.image_size, rng, scale=self.scale,
                                          reduced=self.reduced_decode)
        if not self.uint8_images:
          pixels = transforms.normalize_images(pixels)
      else:
        pixels = self._eval_transform(decode.decode_image(sample[image_ext]))
    except Exception:  # pylint: disable=broad-except  (PIL raises many types for bad files)
      return {SKIP_KEY: 'bad_image'}
    tokens = get_tokenizer(context_length=self.context_length)([caption])[0]
    out = {'image': pixels, 'text': tokens, 'label': np.int32(_label(sample))}
    if not self.is_train:  # evaluation and feature export name their samples
      out['key'] = np.asarray(str(sample.get('__key__', '')))
    return out


def _label(sample: dict[str, Any]) -> int:
  """The class index from `KEY.cls`, or `label` in `KEY.json`; -1 when the sample has none."""
  try:
    if 'cls' in sample:
      return int(sample['cls'].decode().strip())
    if 'json' in sample:
      return int(json.loads(sample['json']).get('label', -1))
  except (ValueError, UnicodeDecodeError, AttributeError):
    pass
  return -1


class _SkipAndCountIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._template: dict[str, Any] | None = None
    self._done = False

  def __next__(self) -> dict[str, Any]:
    if self._done:
      raise StopIteration
    counts = np.zeros(len(COUNTS), np.int32)
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        if counts.any() and self._template is not None:
          # A finite pass that ends in bad samples: one placeholder (valid=False, label -1) carries their count.
          self._done = True
          return {**{k: np.zeros_like(v) for k, v in self._template.items()}, 'label': np.int32(-1),
                  'valid': np.bool_(False), 'skipped': counts}
        raise
      counts[-1] += element.pop(RETRIES_KEY, 0)
      if SKIP_KEY in element:
        counts[SKIP_REASONS.index(element[SKIP_KEY])] += 1
        continue
      if self._template is None:
        self._template = {k: v for k, v in element.items() if k in ('image', 'text', 'key')}
      element['valid'] = np.bool_(True)
      element['skipped'] = counts
      return element

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipAndCountIterDataset(grain.IterDataset):
  """Drops skip records, attaching their per-reason counts to the next good example."""

  def __iter__(self):
    return _SkipAndCountIterator(self._parent.__iter__())


def make_dataset(sources: str | Sequence[str] | Sequence[tuple[str, float]], *, batch_size: int, image_size: int,
                 context_length: int = 77, is_train: bool = True, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, num_epochs: int | None = None, shuffle_buffer: int = 1000,
                 cycle_length: int = 4, num_workers: int = 0, reduced_decode: bool = True,
                 uint8_images: bool = True, mixing: str = 'sample', resampled: bool = False) -> grain.IterDataset:
  """A batched grain dataset over webdataset shards.

  Args:
    sources: a shard pattern ('data/{00000..00099}.tar', a glob, a directory), a list of them (one source), or
      [(pattern, weight), ...] to mix sources by sampling weight (the paper's LAION-2B + COYO-700M).
    batch_size: examples per batch on this process.
    num_epochs: passes over the shards; None means 1 for evaluation and (practically) unbounded for training.
    num_workers: decoding processes; 0 decodes in this process, -1 takes every core this process may use but
      TRAINER_CORES (see `resolve_num_workers`).
    reduced_decode, uint8_images: training only (see DecodeSample); the defaults are the fast path.
    mixing: 'sample' mixes the sources' samples by weight within every batch; 'batch' makes each batch from one
      source, the sources taking turns in proportion to their weights (equal weights alternate), as the
      reference's MixingDataLoader does. The choice depends on the batch index alone, so every process's share of
      a global batch comes from the same source, and a resumed iterator continues the pattern.
    resampled: training shards are drawn with replacement from all of a source's shards, each process with its
      own seeded draws (open_clip's --dataset-resampled), instead of each process reading its share every epoch.
  """
  if isinstance(sources, str) or (sources and isinstance(sources[0], str)):
    sources = [(sources, 1.0)]  # one source, however many patterns
  if not is_train and len(sources) > 1:
    raise InputError('a weighted mixture of sources is for training; evaluate each source on its own')
  if mixing not in MIXING:
    raise InputError(f'unknown mixing {mixing!r}; use one of {MIXING}')
  if num_epochs is None:
    num_epochs = 100_000 if is_train else 1
  datasets, weights = [], []
  for index, (pattern, weight) in enumerate(sources):
    shards = list_shards(pattern)
    mine = shards[process_index::process_count]
    if is_train and resampled:
      shard_paths = _ResampledShards(shards, seed + 1000 * index, process_index, len(mine) * num_epochs)
    elif len(shards) < process_count:  # checked on every process, so all of them fail alike
      raise InputError(f'{pattern!r} has {len(shards)} shards, fewer than the {process_count} processes reading '
                       'it: write more, smaller shards (or resample them: resampled=True)')
    else:
      shard_paths = _EpochShuffledShards(mine, seed + 1000 * index, num_epochs, shuffle=is_train)
    readable = len(shards) if is_train and resampled else len(mine)
    ds = grain.experimental.InterleaveIterDataset(shard_paths.map(TarShardIterDataset),
                                                  cycle_length=min(cycle_length, readable) if is_train else 1)
    if is_train and shuffle_buffer > 1:
      ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_buffer, seed=seed + index)
    datasets.append(ds)
    weights.append(float(weight))

  def decode_and_batch(ds, decode_seed):
    ds = ds.random_map(DecodeSample(image_size, context_length, is_train, reduced_decode=reduced_decode,
                                    uint8_images=uint8_images), seed=decode_seed)
    return SkipAndCountIterDataset(ds).batch(batch_size, drop_remainder=is_train)

  if len(datasets) == 1:
    ds = decode_and_batch(datasets[0], seed)
  elif mixing == 'batch':
    ds = grain.IterDataset.mix([decode_and_batch(d, seed + i) for i, d in enumerate(datasets)], weights)
  else:
    ds = decode_and_batch(grain.IterDataset.mix(datasets, weights), seed)
  num_workers = resolve_num_workers(num_workers)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=workers.exit_with_trainer())
  return ds


# Cores left to the training process itself: its Python loop (batch hand-off, host-to-device copies, metrics,
# checkpoints) runs on one; the accelerator runtime's threads mostly wait on the device.
TRAINER_CORES = 1


def resolve_num_workers(num_workers: int) -> int:
  """num_workers as given, or for -1 the cores this process may run on (its CPU affinity, which SLURM and
  taskset narrow to the job's share) less TRAINER_CORES; 0 where that leaves none."""
  if num_workers >= 0:
    return num_workers
  if num_workers != -1:
    raise InputError(f'num_workers must be >= 0, or -1 for all cores but the trainer\'s; got {num_workers}')
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  return max(cores - TRAINER_CORES, 0)


def make_dataset_from_config(data_config, *, batch_size: int, image_size: int, context_length: int, seed: int,
                             process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training dataset of a config's `data` block (`sources`, `shuffle_buffer`, `cycle_length`,
  `num_workers`, `mixing`, `resampled`)."""
  sources = [(pattern, float(weight)) for pattern, weight in data_config.sources]
  empty = [i for i, (pattern, _) in enumerate(sources) if not pattern]
  if empty:
    raise InputError(f'config.data.sources has no shard pattern for source(s) {empty}: set them, e.g. '
                     "--config.data.sources=\"(('/data/laion/{00000..00999}.tar', 1.0),)\"")
  return make_dataset(sources, batch_size=batch_size, image_size=image_size, context_length=context_length,
                      is_train=True, seed=seed, process_index=process_index, process_count=process_count,
                      shuffle_buffer=data_config.shuffle_buffer, cycle_length=data_config.cycle_length,
                      num_workers=data_config.num_workers, mixing=data_config.get('mixing', 'sample'),
                      resampled=bool(data_config.get('resampled', False)))


def make_synthetic_dataset(*, batch_size: int, image_size: int, context_length: int = 77, seed: int = 0,
                           num_batches: int = 1_000_000, process_index: int = 0,
                           process_count: int = 1) -> grain.MapDataset:
  """Random uint8 images (as the training pipeline yields them) and token ids at full speed: one batch made once,
  served `num_batches` times.

  batch_size is per process; the global batch (batch_size x process_count) is drawn from `seed` and each process
  serves its slice, so a run's global batch does not depend on how many processes share it.
  """
  rng = np.random.default_rng(seed)
  total = batch_size * process_count
  rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
  batch = {
      'image': rng.integers(0, 256, (total, image_size, image_size, 3), dtype=np.uint8)[rows],
      'text': np.concatenate([np.full((total, 1), 49406),
                              rng.integers(1, 49406, (total, context_length - 2)),
                              np.full((total, 1), 49407)], axis=1).astype(np.int32)[rows],
      'label': np.full((batch_size,), -1, np.int32),
      'valid': np.ones((batch_size,), bool),
      'skipped': np.zeros((batch_size, len(COUNTS)), np.int32),
  }
  return grain.MapDataset.range(num_batches).map(lambda _: batch)


def skipped_counts(batch: dict[str, Any]) -> dict[str, int]:
  """{'skipped/bad_image': n, ..., 'data/storage_retries': n} for a batch, ready for the training metrics."""
  totals = np.asarray(batch['skipped']).sum(axis=0)
  counts = {f'skipped/{reason}': int(n) for reason, n in zip(SKIP_REASONS, totals)}
  counts['data/storage_retries'] = int(totals[-1])
  return counts

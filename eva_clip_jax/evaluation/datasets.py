"""Evaluation data: an image-folder tree (ImageNet's val layout), webdataset shards with labels, a CSV of
image-caption pairs (retrieval), and tensorflow-datasets where it is installed. All yield batches of
{'image': [B, S, S, 3] float32, 'label': [B] int32} in a fixed order."""

from __future__ import annotations

import csv
import os
from typing import Iterator

import grain
import jax
import numpy as np
from PIL import Image

from eva_clip_jax import transforms
from eva_clip_jax.data.pipeline import make_dataset

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')


def _load(path: str, transform) -> np.ndarray:
  with Image.open(path) as image:
    return transform(image)


def image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
  """([(path, label)], class directory names): one sub-directory per class, sorted, as torchvision does."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'no image folder at {root}')
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  items = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
  if not items:
    raise FileNotFoundError(f'no images in class sub-directories of {root}')
  return items, classes


def _batched(items: list[tuple[str, int]], image_size: int, batch_size: int,
             num_workers: int) -> Iterator[dict[str, np.ndarray]]:
  transform = transforms.image_transform(image_size)
  ds = grain.MapDataset.source(items).map(
      lambda item: {'image': _load(item[0], transform), 'label': np.int32(item[1])})
  ds = ds.batch(batch_size).to_iter_dataset()
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  iterator = iter(ds)
  try:
    yield from iterator
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()


def folder_batches(root: str, image_size: int, batch_size: int = 64, num_workers: int = 0,
                   shard_by_process: bool = True):
  items, classes = image_folder(root)
  if shard_by_process:
    items = items[jax.process_index()::jax.process_count()]
  return _batched(items, image_size, batch_size, num_workers), classes


def shard_batches(pattern: str, image_size: int, batch_size: int = 64, context_length: int = 77,
                  num_workers: int = 0, shard_by_process: bool = True) -> Iterator[dict[str, np.ndarray]]:
  index, count = (jax.process_index(), jax.process_count()) if shard_by_process else (0, 1)
  ds = make_dataset(pattern, batch_size=batch_size, image_size=image_size, context_length=context_length,
                    is_train=False, process_index=index, process_count=count, num_workers=num_workers)
  iterator = iter(ds)
  try:
    for batch in iterator:
      yield {'image': batch['image'], 'label': batch['label'], 'text': batch['text'], 'valid': batch['valid']}
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()


def tfds_batches(name: str, image_size: int, batch_size: int = 64, split: str = 'validation',
                 data_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """A tensorflow-datasets split (already prepared in data_dir: nothing is downloaded here)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'tfds:{name} needs tensorflow-datasets and tensorflow-cpu installed') from e
  transform = transforms.image_transform(image_size)
  ds = tfds.load(name, split=split, data_dir=data_dir, download=False, shuffle_files=False)
  images, labels = [], []
  for example in tfds.as_numpy(ds):
    images.append(transform(Image.fromarray(example['image'])))
    labels.append(example['label'])
    if len(images) == batch_size:
      yield {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}
      images, labels = [], []
  if images:
    yield {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}


def caption_pairs(csv_path: str) -> tuple[list[str], list[str], np.ndarray]:
  """(unique image paths, captions, text_to_image) from a CSV with columns path, caption (one row per caption;
  several rows may share an image, as in Flickr30K / COCO)."""
  base = os.path.dirname(os.path.abspath(csv_path))
  with open(csv_path, newline='', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  if not rows or not {'path', 'caption'} <= set(rows[0]):
    raise ValueError(f'{csv_path} needs a header with columns path and caption')
  images: dict[str, int] = {}
  captions, text_to_image = [], []
  for row in rows:
    path = os.path.join(base, row['path'])
    images.setdefault(path, len(images))
    captions.append(row['caption'])
    text_to_image.append(images[path])
  missing = [p for p in images if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} images listed in {csv_path} do not exist, e.g. {missing[0]}')
  return list(images), captions, np.asarray(text_to_image)


def image_batches(paths: list[str], image_size: int, batch_size: int = 64, num_workers: int = 0):
  return _batched([(p, -1) for p in paths], image_size, batch_size, num_workers)

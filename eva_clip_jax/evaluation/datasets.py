"""Evaluation data readers. All yield batches of {'image': [B, S, S, 3] float32, 'label': [B] int32} in a fixed
order, this process's share of the data; images are decoded and preprocessed inside grain (worker processes for
files, a thread pool for records streamed from tensorflow-datasets).

  image_folder     one sub-directory per class (ImageNet's val layout; numeric names sort as numbers)
  labelled_csv     a CSV of path,label rows (label an integer or a class name)
  shard_batches    webdataset shards with labels (the demo set)
  tfds_batches     a prepared tensorflow-datasets split (never downloads)
  caption_pairs    a CSV of path,caption rows (retrieval; several rows may share an image)
"""

from __future__ import annotations

import csv
import io
from typing import Any, Callable, Iterable, Iterator

import grain
import jax
import numpy as np
from PIL import Image

from eva_clip_jax import storage, transforms
from eva_clip_jax.data.pipeline import make_dataset
from eva_clip_jax.errors import InputError, MissingDependency

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.ppm')


class MissingDataset(FileNotFoundError):
  """A dataset that is not where the suite looks for it; the message names it and the layout it expects."""


def _open(source) -> Image.Image:
  """An image from a path (local or a bucket: read whole through storage, an image is small), encoded bytes, or an
  array already decoded (a tfds feature read without SkipDecoding)."""
  if isinstance(source, np.ndarray):
    return Image.fromarray(source)
  return Image.open(io.BytesIO(source if isinstance(source, bytes) else storage.read_bytes(source)))


def load_image(source, transform, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """A path, encoded bytes or a uint8 array -> the transformed image; `box` (ymin, xmin, ymax, xmax in [0, 1])
  crops first (its corners sorted, at least one pixel kept)."""
  with _open(source) as image:
    image = image.convert('RGB')
    if box is not None:
      w, h = image.size
      ymin, ymax = sorted((box[0], box[2]))
      xmin, xmax = sorted((box[1], box[3]))
      left, top = int(xmin * w), int(ymin * h)
      image = image.crop((left, top, max(int(round(xmax * w)), left + 1), max(int(round(ymax * h)), top + 1)))
    return transform(image)


def sorted_classes(names: Iterable[str]) -> list[str]:
  """Class directory names in label order: numerically when all are integers (ImageNet-V2's 0..999, GTSRB's
  00000..00042), else as strings (torchvision's ImageFolder)."""
  names = list(names)
  if names and all(n.isdigit() for n in names):
    return sorted(names, key=int)
  return sorted(names)


def image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
  """([(path, label)], class directory names in label order): one sub-directory per class."""
  if not storage.isdir(root):
    raise MissingDataset(f'no image folder at {root}')
  classes = sorted_classes(d for d in storage.listdir(root) if storage.isdir(storage.join(root, d)))
  items = [(storage.join(root, c, f), label) for label, c in enumerate(classes)
           for f in storage.listdir(storage.join(root, c)) if f.lower().endswith(IMAGE_SUFFIXES)]
  if not items:
    raise MissingDataset(f'no images in class sub-directories of {root}')
  return items, classes


def _read_csv(path: str, columns: tuple[str, ...]) -> tuple[str, list[dict[str, str]]]:
  """(the CSV's directory, its rows as dicts): MissingDataset when there is no file, ValueError naming what is
  missing when the header lacks one of `columns` or no row follows it."""
  if not storage.isfile(path):
    raise MissingDataset(f'no CSV at {path} (expected columns {", ".join(columns)})')
  with storage.open_read(path, 'r', newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  missing = [c for c in columns if c not in (reader.fieldnames or ())]
  if missing:
    raise InputError(f'{path} needs a header with columns {", ".join(columns)}; missing {", ".join(missing)}')
  if not rows:
    raise InputError(f'{path} has a header but no rows')
  return storage.dirname(path), rows


def labelled_csv(path: str, classnames: list[str] | None = None) -> list[tuple[str, int]]:
  """[(image path, label)] from a CSV with columns path,label (paths relative to the CSV); a label that is not an
  integer is looked up in `classnames`."""
  base, rows = _read_csv(path, ('path', 'label'))
  index = {name: i for i, name in enumerate(classnames or [])}
  items = []
  for row in rows:
    label = row['label'].strip()
    if label.lstrip('-').isdigit():
      items.append((storage.join(base, row['path']), int(label)))
    elif label in index:
      items.append((storage.join(base, row['path']), index[label]))
    else:
      raise InputError(f'{path}: label {label!r} is neither an integer nor a known class name')
  return items


def process_share(items: list) -> list:
  return items[jax.process_index()::jax.process_count()]


def map_batches(items: list, load: Callable[[Any], dict], batch_size: int, num_workers: int = 0,
                num_threads: int = 8) -> Iterator[dict[str, np.ndarray]]:
  """grain: `load` each item (decoding happens here: in `num_workers` processes, else in a thread pool), batched."""
  ds = grain.MapDataset.source(items).map(load).batch(batch_size)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  iterator = iter(ds)
  try:
    yield from iterator
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()


class _LoadLabelled:
  """Picklable (grain workers): (path or bytes, label[, box]) -> {'image', 'label'}."""

  def __init__(self, image_size: int):
    self.image_size = image_size
    self.transform = transforms.image_transform(image_size)

  def __call__(self, item) -> dict[str, np.ndarray]:
    source, label, *box = item
    return {'image': load_image(source, self.transform, box[0] if box else None), 'label': np.int32(label)}


def labelled_batches(items: list[tuple], image_size: int, batch_size: int = 64, num_workers: int = 0,
                     shard_by_process: bool = True) -> Iterator[dict[str, np.ndarray]]:
  items = process_share(items) if shard_by_process else items
  return map_batches(items, _LoadLabelled(image_size), batch_size, num_workers)


def folder_batches(root: str, image_size: int, batch_size: int = 64, num_workers: int = 0,
                   shard_by_process: bool = True):
  items, classes = image_folder(root)
  return labelled_batches(items, image_size, batch_size, num_workers, shard_by_process), classes


def shard_batches(pattern: str, image_size: int, batch_size: int = 64, context_length: int = 77,
                  num_workers: int = 0, shard_by_process: bool = True) -> Iterator[dict[str, np.ndarray]]:
  index, count = (jax.process_index(), jax.process_count()) if shard_by_process else (0, 1)
  ds = make_dataset(pattern, batch_size=batch_size, image_size=image_size, context_length=context_length,
                    is_train=False, process_index=index, process_count=count, num_workers=num_workers)
  iterator = iter(ds)
  try:
    for batch in iterator:
      keep = np.asarray(batch['valid'], bool)
      yield {'image': batch['image'], 'label': np.where(keep, batch['label'], -1), 'text': batch['text'],
             'valid': batch['valid'], 'key': batch['key']}
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()


# ---------------------------------------------------------------------------------------------- tensorflow-datasets

def tfds_builder(name: str, data_dir: str | None, layout: str = ''):
  """A prepared tfds builder, or MissingDataset naming it (nothing is downloaded)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependency(f'tfds:{name} needs tensorflow-datasets (requirements.txt)') from e
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises several types for "not prepared")
    raise MissingDataset(f'tensorflow-datasets {name!r} is not prepared under {data_dir}: {e}. {layout}') from e


def tfds_records(name: str, split: str, data_dir: str | None, keys: tuple[str, ...], *, layout: str = '',
                 shard_by_process: bool = True) -> Iterator[dict[str, Any]]:
  """The split's examples with only `keys` read and images/videos left encoded (decoded later, in grain); this
  process's share when `shard_by_process`. A split that is not prepared raises MissingDataset here, not later."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builder(name, data_dir, layout)
  features = builder.info.features
  decoders = {k: tfds.decode.SkipDecoding() for k in keys if k in ('image', 'video')}
  decoding = tfds.decode.PartialDecoding({k: features[k] for k in keys}, decoders=decoders)
  if shard_by_process and jax.process_count() > 1:
    split = tfds.split_for_jax_process(split)
  try:
    ds = builder.as_dataset(split=split, decoders=decoding, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False))
  except Exception as e:  # pylint: disable=broad-except
    raise MissingDataset(f'tensorflow-datasets {name!r} split {split!r} cannot be read from {data_dir}: '
                         f'{str(e).splitlines()[0] if str(e) else type(e).__name__} {layout}') from e
  return iter(tfds.as_numpy(ds))


def chunked(records: Iterable, size: int) -> Iterator[list]:
  chunk = []
  for record in records:
    chunk.append(record)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def streamed_batches(items: Iterable[tuple], image_size: int, batch_size: int,
                     chunk_batches: int = 16) -> Iterator[dict[str, np.ndarray]]:
  """(encoded image, label[, box]) items streamed from a record reader, decoded in grain's thread pool a chunk at a
  time (so a 50k-image split never sits decoded in memory)."""
  load = _LoadLabelled(image_size)
  for chunk in chunked(items, batch_size * chunk_batches):
    yield from map_batches(chunk, load, batch_size)


def tfds_batches(name: str, image_size: int, batch_size: int = 64, split: str = 'validation',
                 data_dir: str | None = None, label_key: str = 'label') -> Iterator[dict[str, np.ndarray]]:
  """A prepared tensorflow-datasets split of (image, label) (nothing is downloaded here)."""
  records = tfds_records(name, split, data_dir, ('image', label_key))
  return streamed_batches(((r['image'], int(r[label_key])) for r in records), image_size, batch_size)


# ------------------------------------------------------------------------------------------------------- retrieval

def caption_pairs(csv_path: str) -> tuple[list[str], list[str], np.ndarray]:
  """(unique image paths, captions, text_to_image) from a CSV with columns path, caption (one row per caption;
  several rows may share an image, as in Flickr30K / COCO)."""
  base, rows = _read_csv(csv_path, ('path', 'caption'))
  images: dict[str, int] = {}
  captions, text_to_image = [], []
  for row in rows:
    path = storage.join(base, row['path'])
    images.setdefault(path, len(images))
    captions.append(row['caption'])
    text_to_image.append(images[path])
  missing = [p for p in images if not storage.exists(p)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} images listed in {csv_path} do not exist, e.g. {missing[0]}')
  return list(images), captions, np.asarray(text_to_image)


def image_batches(sources: list, image_size: int, batch_size: int = 64, num_workers: int = 0):
  """Unlabelled images (paths or encoded bytes), every process reading all of them, in order."""
  return labelled_batches([(s, -1) for s in sources], image_size, batch_size, num_workers, shard_by_process=False)

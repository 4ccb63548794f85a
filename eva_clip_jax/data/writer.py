"""Writing webdataset shards: `KEY.jpg|png|webp` + `KEY.txt` (+ `KEY.cls`, `KEY.json`), N samples per tar.

  python -m eva_clip_jax.data.writer --src=photos/ --dst=shards/ --samples_per_shard=1000
  python -m eva_clip_jax.data.writer --src=captions.csv --dst=shards/ --max_size=512 --quality=95

A folder holds images with a caption file of the same name (`cat.jpg` + `cat.txt`); a CSV has columns `path`,
`caption` and optionally `label`. Each shard is written under a temporary name and renamed when complete.

`--max_size=N` shrinks images whose longer side exceeds N to exactly N (aspect kept, the shorter side rounded),
re-encoded in their own format (JPEG and WebP at `--quality`, PNG lossless), as img2dataset does for LAION:
decoding a 512 px image costs a fraction of a 1,500 px one, at every epoch. Smaller images, and files that do not
decode (the reader skips and counts them), are stored as they are; captions are never touched.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tarfile
import time
import warnings
from typing import Any

from PIL import Image

from eva_clip_jax import storage
from eva_clip_jax.errors import InputError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')
_FORMATS = {'jpg': 'JPEG', 'jpeg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'}


def shrink_image(data: bytes, image_ext: str, max_size: int, quality: int = 95) -> bytes | None:
  """The image re-encoded with its longer side at `max_size`, or None if it is no larger or does not decode."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      width, height = image.size
      if max(width, height) <= max_size:
        return None
      ratio = max_size / max(width, height)
      size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
      image.draft('RGB', (2 * size[0], 2 * size[1]))  # JPEG: DCT-decode at >= 2x the target, then filter
      image.load()
  except Exception:  # pylint: disable=broad-except  (PIL raises many types for bad files)
    return None
  fmt = _FORMATS[image_ext.lstrip('.').lower()]
  if fmt == 'JPEG' and image.mode not in ('RGB', 'L', 'CMYK'):
    image = image.convert('RGB')
  # Lanczos from within 3x of the target is indistinguishable from the full filter (Pillow's reducing_gap).
  image = image.resize(size, Image.LANCZOS, reducing_gap=3.0)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **({} if fmt == 'PNG' else {'quality': quality}))
  return buffer.getvalue()


class ShardWriter:
  """`with ShardWriter(dst) as w: w.write(key, image_bytes, 'jpg', caption, label=3)`.

  max_size: if set, images whose longer side exceeds it are shrunk to it (see `shrink_image`; `resized` counts
  them); quality: the JPEG / WebP quality they are re-encoded at.
  """

  def __init__(self, directory: str, samples_per_shard: int = 1000, prefix: str = '', *, max_size: int | None = None,
               quality: int = 95):
    if samples_per_shard < 1:
      raise InputError(f'samples_per_shard must be positive, got {samples_per_shard}')
    if max_size is not None and max_size < 1:
      raise InputError(f'max_size must be positive (or None to keep sizes), got {max_size}')
    if not 1 <= quality <= 100:
      raise InputError(f'quality must be in 1..100, got {quality}')
    self.directory, self.samples_per_shard, self.prefix = directory, samples_per_shard, prefix
    self.max_size, self.quality, self.resized = max_size, quality, 0
    storage.makedirs(directory)
    self.shards: list[str] = []
    self.count = 0
    self._tar: tarfile.TarFile | None = None
    self._file = contextlib.ExitStack()  # the shard being written: it appears whole when closed, or not at all

  def _add(self, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    self._tar.addfile(info, io.BytesIO(data))

  def write(self, key: str, image: bytes, image_ext: str, caption: str, *, label: int | None = None,
            meta: dict[str, Any] | None = None) -> None:
    if self._tar is None or self.count % self.samples_per_shard == 0:
      self._finish_shard()
      path = storage.join(self.directory, f'{self.prefix}{len(self.shards):05d}.tar')
      self._tar = tarfile.open(fileobj=self._file.enter_context(storage.atomic_write(path, 'wb')), mode='w')
      self.shards.append(path)
    if self.max_size is not None:
      smaller = shrink_image(image, image_ext, self.max_size, self.quality)
      if smaller is not None:
        image, self.resized = smaller, self.resized + 1
    self._add(f'{key}.{image_ext.lstrip(".").lower()}', image)
    self._add(f'{key}.txt', caption.encode('utf-8'))
    if label is not None:
      self._add(f'{key}.cls', str(int(label)).encode())
    if meta is not None:
      self._add(f'{key}.json', json.dumps(meta).encode())
    self.count += 1

  def _finish_shard(self) -> None:
    if self._tar is not None:
      self._tar.close()
      self._file.close()  # moves or uploads the finished shard into place
      self._tar = None

  def close(self) -> None:
    self._finish_shard()

  def __enter__(self) -> 'ShardWriter':
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is not None and self._tar is not None:  # leave no half-written shard behind
      self._tar.close()
      self._file.__exit__(exc_type, None, None)  # discards the temporary file
      self.shards.pop()
      self._tar = None
    self.close()


def write_from_folder(src: str, dst: str, samples_per_shard: int = 1000, **writer_options) -> list[str]:
  """Images with same-named .txt captions under `src` (recursively) -> shards in `dst` (`writer_options`:
  ShardWriter's max_size, quality)."""
  files = set(storage.walk_files(src)) if storage.isdir(src) else set()
  pairs = []
  for path in sorted(files):
    stem, suffix = storage.splitext(path)
    if suffix.lower() in IMAGE_SUFFIXES and stem + '.txt' in files:
      pairs.append((path, stem + '.txt'))
  if not pairs:
    raise FileNotFoundError(f'no image with a same-named .txt caption under {src}')
  with ShardWriter(dst, samples_per_shard, **writer_options) as writer:
    for index, (image, caption) in enumerate(pairs):
      writer.write(f'{index:09d}', storage.read_bytes(image), storage.splitext(image)[1],
                   storage.read_text(caption).strip())
  return writer.shards


def write_from_csv(src: str, dst: str, samples_per_shard: int = 1000, **writer_options) -> list[str]:
  """A CSV with columns path, caption[, label] (paths relative to the CSV's folder) -> shards in `dst`."""
  base = storage.dirname(src)
  rows = list(csv.DictReader(io.StringIO(storage.read_text(src), newline='')))
  if not rows or not {'path', 'caption'} <= set(rows[0]):
    raise InputError(f'{src} needs a header with columns path and caption (and optionally label)')
  with ShardWriter(dst, samples_per_shard, **writer_options) as writer:
    for index, row in enumerate(rows):
      path = storage.join(base, row['path'])
      label = row.get('label')
      try:
        label = int(label) if label not in (None, '') else None
      except ValueError:
        raise InputError(f'{src}: the label {label!r} of {row["path"]} is not an integer') from None
      writer.write(f'{index:09d}', storage.read_bytes(path), storage.splitext(path)[1], row['caption'], label=label)
  return writer.shards


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  src, dst, n = flags.FLAGS.src, flags.FLAGS.dst, flags.FLAGS.samples_per_shard
  options = dict(max_size=flags.FLAGS.max_size or None, quality=flags.FLAGS.quality)
  write = write_from_csv if src.endswith('.csv') else write_from_folder
  shards = write(src, dst, n, **options)
  print(f'wrote {len(shards)} shards to {dst}' + (f', images larger than {options["max_size"]} px shrunk to it'
                                                   if options['max_size'] else ''))


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top

  from eva_clip_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('src', None, 'a folder of images + .txt captions, or a CSV (path, caption[, label])',
                      required=True)
  flags.DEFINE_string('dst', None, 'output folder for the .tar shards', required=True)
  flags.DEFINE_integer('samples_per_shard', 1000, 'samples per shard')
  flags.DEFINE_integer('max_size', 0, 'shrink images whose longer side exceeds this many pixels to it (0: keep)')
  flags.DEFINE_integer('quality', 95, 'JPEG / WebP quality of the images --max_size re-encodes')
  flags.register_validator('max_size', lambda v: v >= 0, message='--max_size must be >= 0 (0 keeps the sizes)')
  flags.register_validator('quality', lambda v: 1 <= v <= 100, message='--quality must be in 1..100')
  cli.run(main)

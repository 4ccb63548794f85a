r"""Input-pipeline throughput: decode + augment + tokenise, images/s, next to a PIL + torch DataLoader baseline
reading the same shards in the same run.

  python -m eva_clip_jax.data.bench --workers=0,1,2 --image_size=224 --num_samples=1024

Without --shards it writes `num_samples` 320x240 JPEG samples (the demo shapes, enlarged) to a temporary folder.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time

from absl import app, flags
import numpy as np

from eva_clip_jax.data import demo
from eva_clip_jax.data.pipeline import make_dataset
from eva_clip_jax.data.writer import ShardWriter

_SHARDS = flags.DEFINE_string('shards', '', 'shard pattern to read (default: generate)')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'worker process counts to measure')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'output resolution')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'batch size')
_NUM = flags.DEFINE_integer('num_samples', 1024, 'samples to generate when --shards is empty')
_BATCHES = flags.DEFINE_integer('batches', 12, 'timed batches (after 2 warm-up batches)')
_TORCH = flags.DEFINE_bool('torch', True, 'also time the PIL + torch DataLoader baseline')


def _generate(directory: str, count: int) -> str:
  rng = np.random.default_rng(0)
  with ShardWriter(directory, 256) as writer:
    for i in range(count):
      image, meta = demo.draw_sample(rng)
      buffer = io.BytesIO()
      image.resize((320, 240)).save(buffer, format='JPEG', quality=90)
      writer.write(f'{i:06d}', buffer.getvalue(), 'jpg', f"a {meta['color']} {meta['shape']}")
  return directory


def _time_batches(iterator, batches: int) -> float:
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * _BATCH.value / (time.perf_counter() - start)


def time_grain(pattern: str, workers: int) -> float:
  ds = make_dataset(pattern, batch_size=_BATCH.value, image_size=_IMAGE_SIZE.value, num_workers=workers,
                    shuffle_buffer=256)
  iterator = iter(ds)
  try:
    return _time_batches(iterator, _BATCHES.value)
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()


def time_torch(pattern: str, workers: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top

  from eva_clip_jax.data.shards import list_shards  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.tokenizer import tokenize  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.transforms import OPENAI_MEAN, OPENAI_STD  # pylint: disable=g-import-not-at-top

  shards = list_shards(pattern)
  transform = T.Compose([T.RandomResizedCrop(_IMAGE_SIZE.value, scale=(0.9, 1.0),
                                             interpolation=T.InterpolationMode.BICUBIC),
                         T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])

  class Shards(torch.utils.data.IterableDataset):

    def __iter__(self):
      info = torch.utils.data.get_worker_info()
      mine = shards if info is None else shards[info.id::info.num_workers]
      while True:
        for path in mine:
          with tarfile.open(path) as tar:
            sample = {}
            for member in tar:
              key, ext = member.name.split('.', 1)
              if sample and sample['key'] != key:
                yield self._decode(sample)
                sample = {}
              sample['key'] = key
              sample[ext] = tar.extractfile(member).read()
            if sample:
              yield self._decode(sample)

    @staticmethod
    def _decode(sample):
      image = Image.open(io.BytesIO(sample['jpg'])).convert('RGB')
      return transform(image), torch.from_numpy(tokenize([sample['txt'].decode()])[0].astype(np.int64))

  loader = torch.utils.data.DataLoader(Shards(), batch_size=_BATCH.value, num_workers=workers)
  return _time_batches(iter(loader), _BATCHES.value)


def main(argv):
  del argv
  pattern = _SHARDS.value or _generate(tempfile.mkdtemp(prefix='bench_shards_'), _NUM.value)
  print(f'# {pattern}, batch {_BATCH.value}, {_IMAGE_SIZE.value}px output, {os.cpu_count()} cores')
  for workers in (int(w) for w in _WORKERS.value):
    line = f'workers {workers}: grain {time_grain(pattern, workers):7.1f} images/s'
    per = max(workers, 1)
    if _TORCH.value:
      baseline = time_torch(pattern, workers)
      line += f' | torch DataLoader {baseline:7.1f} images/s'
    print(line + f'  (per worker: divide by {per})')


if __name__ == '__main__':
  app.run(main)

r"""Input-pipeline throughput on LAION-like shards it writes itself: this pipeline (JPEG crops decoded at reduced
DCT scale, uint8 out), the pipeline as it was (full decode, float32 normalised on the host) and a plain PIL +
torchvision baseline in a torch DataLoader (decode, RandomResizedCrop, ToTensor, Normalize), in the same run.

  python benchmarks/input_pipeline.py                                   # 512 images, workers 1 and 2
  python benchmarks/input_pipeline.py --max_size=512                    # shards as `writer --max_size=512` makes
  python benchmarks/input_pipeline.py --num_images=16 --batch_size=4 --batches=2 --workers=1   # smoke test

Data: JPEGs at quality 90 of `demo.photo_like` images (smooth colour fields, shapes, grain: ~2.5 bits per pixel
like a photo), short side uniform in 256-1024 px, aspect 1:1 to 16:9 either way, captions of 5-20 words with
product-code-like tokens, 128 per shard. Output: 224 px random-resized crops (scale 0.9-1) and 77-token captions.

Prints two tables. Throughput for each pipeline and worker count, the best of --repeats interleaved measurements:
images per wall-clock second (and per worker process), and images per CPU-second of all the pipeline's processes
(main and workers, user + system time from /proc) — the per-core rate, which other load on a shared machine does
not inflate the way it inflates wall time. Stages, measured in this process one at a time in CPU time (best of 2
passes): milliseconds per image for decode / crop+resize / normalise / tokenise / batching, and the rest (tar
reading, shuffling, grain or DataLoader overhead, passing batches between processes) as 1000 / (images per
CPU-second at 1 worker) - their sum.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import tarfile
import tempfile
import time

from absl import app, flags
import numpy as np

from eva_clip_jax import transforms
from eva_clip_jax.data import decode, demo
from eva_clip_jax.data.pipeline import make_dataset
from eva_clip_jax.data.shards import list_shards
from eva_clip_jax.data.writer import ShardWriter
from eva_clip_jax.tokenizer import get_tokenizer

_NUM = flags.DEFINE_integer('num_images', 512, 'LAION-like samples to write')
_WORKERS = flags.DEFINE_list('workers', ['1', '2'], 'worker process counts to measure (0: in this process)')
_PIPELINES = flags.DEFINE_list('pipelines', ['new', 'old', 'pil'], 'which to time: new, old, pil')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'output resolution')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'batch size')
_BATCHES = flags.DEFINE_integer('batches', 10, 'timed batches per measurement (after 2 warm-up batches)')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'measurements of each (pipeline, workers), interleaved; the best counts')
_STAGE_SAMPLES = flags.DEFINE_integer('stage_samples', 128, 'samples timed stage by stage (0: skip the stages)')
_MAX_SIZE = flags.DEFINE_integer('max_size', 0, 'write the shards as `writer --max_size` does (0: full size)')

_WORDS = ('photo vintage red blue green black white wooden table chair modern house garden dog cat portrait '
          'woman man child street city night beach mountain lake forest car bike shoes dress shirt leather '
          'kitchen living room design interior wedding flowers cake coffee food delicious homemade recipe best '
          'new sale free shipping high quality stock image illustration vector background pattern texture art '
          'painting drawing logo icon set collection summer winter autumn spring christmas holiday travel '
          'sunset').split()
CONTEXT_LENGTH = 77


def _caption(rng: np.random.Generator) -> str:
  words = [str(w) for w in rng.choice(_WORDS, int(rng.integers(5, 21)))]
  for _ in range(int(rng.integers(0, 3))):  # SKUs, years, sizes: words the BPE cache has not seen
    code = ''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz0123456789'), int(rng.integers(3, 9))))
    words.insert(int(rng.integers(0, len(words) + 1)), code.upper() if rng.random() < 0.5 else code)
  return ' '.join(words).capitalize() + rng.choice(['', '.', ' | Stock Photo', ' - 2019'])


def write_laion_like(directory: str, count: int, seed: int = 0, max_size: int | None = None) -> tuple[str, dict]:
  rng = np.random.default_rng(seed)
  pixels = nbytes = 0
  with ShardWriter(directory, 128, max_size=max_size) as writer:
    for i in range(count):
      short = int(rng.integers(256, 1025))
      long = int(round(short * float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))))
      width, height = (long, short) if rng.random() < 0.6 else (short, long)
      buffer = io.BytesIO()
      demo.photo_like(rng, width, height).save(buffer, format='JPEG', quality=90)
      writer.write(f'{i:09d}', buffer.getvalue(), 'jpg', _caption(rng))
      pixels, nbytes = pixels + width * height, nbytes + buffer.tell()
  return directory, {'megapixels': pixels / count / 1e6, 'bits_per_pixel': 8 * nbytes / pixels,
                     'resized': writer.resized}


def _tree_cpu_seconds() -> float:
  """User + system CPU seconds of this process and all its descendants (worker processes) so far, from /proc."""
  parents, cpu = {}, {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:  # gone meanwhile
        continue
      parents[int(entry)] = int(fields[1])
      cpu[int(entry)] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
  tree, frontier = {os.getpid()}, [os.getpid()]
  while frontier:
    children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
    tree.update(children)
    frontier = children
  return sum(cpu.get(pid, 0) for pid in tree) / os.sysconf('SC_CLK_TCK')


def _rates(iterator, batches: int, batch_size: int) -> tuple[float, float]:
  """(images per wall-clock second, images per CPU-second of all the pipeline's processes)."""
  for _ in range(2):  # workers start, buffers fill
    next(iterator)
  start, start_cpu = time.perf_counter(), _tree_cpu_seconds()
  for _ in range(batches):
    next(iterator)
  images = batches * batch_size
  return images / (time.perf_counter() - start), images / max(_tree_cpu_seconds() - start_cpu, 1e-9)


def time_grain(pattern: str, workers: int, *, fast: bool) -> tuple[float, float]:
  ds = make_dataset(pattern, batch_size=_BATCH.value, image_size=_IMAGE_SIZE.value, context_length=CONTEXT_LENGTH,
                    num_workers=workers, shuffle_buffer=256, reduced_decode=fast, uint8_images=fast)
  iterator = iter(ds)
  try:
    return _rates(iterator, _BATCHES.value, _BATCH.value)
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()


def _pil_transform(size: int):
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top
  return T.Compose([T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.ToTensor(), T.Normalize(transforms.OPENAI_MEAN, transforms.OPENAI_STD)])


def _read_samples(path: str):
  """(jpeg bytes, caption) per sample of one webdataset shard, in order."""
  with tarfile.open(path) as tar:
    sample = {}
    for member in tar:
      key, ext = member.name.split('.', 1)
      if sample and sample['key'] != key:
        yield sample['jpg'], sample['txt'].decode()
        sample = {}
      sample['key'] = key
      sample[ext] = tar.extractfile(member).read()
    if sample:
      yield sample['jpg'], sample['txt'].decode()


def time_pil_baseline(pattern: str, workers: int) -> tuple[float, float]:
  """PIL decode + torchvision RandomResizedCrop / ToTensor / Normalize + the tokenizer in a torch DataLoader."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  shards = list_shards(pattern)
  transform = _pil_transform(_IMAGE_SIZE.value)

  class Shards(torch.utils.data.IterableDataset):

    def __iter__(self):
      info = torch.utils.data.get_worker_info()
      mine = shards if info is None else shards[info.id::info.num_workers]
      tokenizer = get_tokenizer(context_length=CONTEXT_LENGTH)
      while True:
        for path in mine:
          for jpeg, caption in _read_samples(path):
            image = Image.open(io.BytesIO(jpeg)).convert('RGB')
            yield transform(image), torch.from_numpy(tokenizer([caption])[0].astype(np.int64))

  loader = torch.utils.data.DataLoader(Shards(), batch_size=_BATCH.value, num_workers=workers)
  iterator = iter(loader)
  try:
    return _rates(iterator, _BATCHES.value, _BATCH.value)
  finally:
    del iterator  # shuts its workers down


def _ms_per_item(fn, items, repeats: int = 2) -> float:
  """CPU milliseconds per item (this process's CPU time: what other load on the machine does not inflate)."""
  best = np.inf
  for _ in range(repeats):
    start = time.process_time()
    for item in items:
      fn(item)
    best = min(best, time.process_time() - start)
  return 1e3 * best / len(items)


def stage_times(pattern: str, count: int) -> dict[str, dict[str, float]]:
  """ms per image of each stage, one stage at a time over the same `count` samples, in this process."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(1)  # as in a DataLoader worker: one core per process
  samples = [s for path in list_shards(pattern) for s in _read_samples(path)][:count]
  size, tokenizer = _IMAGE_SIZE.value, get_tokenizer(context_length=CONTEXT_LENGTH)
  jpegs, captions = [s[0] for s in samples], [s[1] for s in samples]
  seeded = list(enumerate(jpegs))  # sample i draws its box from seed i: the same boxes on both paths
  times = {}
  for name, reduced in (('old', False), ('new', True)):
    decode_one = lambda item: decode.decode_for_crop(item[1], size, np.random.default_rng(item[0]), reduced=reduced)
    decoded = [decode_one(item) for item in seeded]
    crops = [decode.crop_and_resize(image, box, size) for image, box in decoded]
    batch = [transforms.normalize_images(c) for c in crops] if name == 'old' else crops
    times[name] = {
        'decode': _ms_per_item(decode_one, seeded),
        'crop+resize': _ms_per_item(lambda d: decode.crop_and_resize(d[0], d[1], size), decoded),
        'normalise': _ms_per_item(transforms.normalize_images, crops) if name == 'old' else 0.0,  # new: on device
        'tokenise': _ms_per_item(lambda c: tokenizer([c]), captions),
        'batching': _ms_per_item(np.stack, [batch[:_BATCH.value]] * 8) / min(len(batch), _BATCH.value),
    }
    del decoded
  transform = _pil_transform(size)
  rrc, to_tensor, normalize = transform.transforms
  images = [Image.open(io.BytesIO(j)).convert('RGB') for j in jpegs]
  crops = [rrc(image) for image in images]
  tensors = [normalize(to_tensor(c)) for c in crops]
  batch = [(t, torch.zeros(CONTEXT_LENGTH, dtype=torch.int64)) for t in tensors[:_BATCH.value]]
  times['pil'] = {
      'decode': _ms_per_item(lambda j: Image.open(io.BytesIO(j)).convert('RGB'), jpegs),
      'crop+resize': _ms_per_item(rrc, images),
      'normalise': _ms_per_item(lambda c: normalize(to_tensor(c)), crops),
      'tokenise': _ms_per_item(lambda c: tokenizer([c]), captions),
      'batching': _ms_per_item(torch.utils.data.default_collate, [batch] * 8) / len(batch),
  }
  return times


LABELS = {'new': 'new (reduced decode, uint8)', 'old': 'old (full decode, float32 on host)',
          'pil': 'PIL + torchvision DataLoader'}


def main(argv):
  del argv
  start = time.perf_counter()
  directory = tempfile.mkdtemp(prefix='laion_like_')
  pattern, info = write_laion_like(directory, _NUM.value, max_size=_MAX_SIZE.value or None)
  resized = f', {info["resized"]} of them then shrunk to {_MAX_SIZE.value} px' if _MAX_SIZE.value else ''
  print(f'# {_NUM.value} LAION-like JPEGs in {len(list_shards(pattern))} shards ({info["megapixels"]:.2f} MP and '
        f'{info["bits_per_pixel"]:.2f} bits/pixel on average as drawn{resized}, written in '
        f'{time.perf_counter() - start:.0f} s); '
        f'{_IMAGE_SIZE.value} px output, batch {_BATCH.value}, {_BATCHES.value} timed batches; '
        f'{os.cpu_count()} cores ({platform.processor() or platform.machine()}); load {os.getloadavg()[0]:.2f}')
  try:
    rates, cpu_rates = {}, {}
    for _ in range(_REPEATS.value):  # interleaved, so that a burst of load on a shared machine hits one try of each
      for workers in (int(w) for w in _WORKERS.value):
        for name in _PIPELINES.value:
          rate, cpu_rate = (time_pil_baseline(pattern, workers) if name == 'pil' else
                            time_grain(pattern, workers, fast=name == 'new'))
          rates[name, workers] = max(rate, rates.get((name, workers), 0.0))
          cpu_rates[name, workers] = max(cpu_rate, cpu_rates.get((name, workers), 0.0))
    print('\n| pipeline | workers | images/s | per worker | per worker vs PIL baseline | images per CPU-second | '
          'per CPU-second vs PIL baseline |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for (name, workers), rate in rates.items():
      base, cpu_base, cpu_rate = rates.get(('pil', workers)), cpu_rates.get(('pil', workers)), cpu_rates[name, workers]
      print(f'| {LABELS[name]} | {workers} | {rate:.1f} | {rate / max(workers, 1):.1f} | '
            f'{f"{rate / base:.2f}x" if base else "-"} | {cpu_rate:.1f} | '
            f'{f"{cpu_rate / cpu_base:.2f}x" if cpu_base else "-"} |')
    if _STAGE_SAMPLES.value:
      times = stage_times(pattern, _STAGE_SAMPLES.value)
      names = list(times)
      print(f'\n| stage (ms per image, one process) | {" | ".join(LABELS[n] for n in names)} |')
      print('|---|' + '---:|' * len(names))
      for stage in times[names[0]]:
        print(f'| {stage} | ' + ' | '.join(f'{times[n][stage]:.3f}' for n in names) + ' |')
      print('| total | ' + ' | '.join(f'{sum(times[n].values()):.3f}' for n in names) + ' |')
      one = {n: 1e3 / cpu_rates[n, 1] for n in names if (n, 1) in cpu_rates}
      if one:  # what the stages do not cover: tar reading, shuffling, grain / DataLoader, passing batches between
        print('| rest, at 1 worker (1000 / images per CPU-second - total) | ' +
              ' | '.join(f'{one[n] - sum(times[n].values()):.3f}' if n in one else '-' for n in names) + ' |')
  finally:
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)

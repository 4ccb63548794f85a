r"""Shards in a bucket against shards on local disk, in the same run: raw streaming reads (MB/s) and the training
input pipeline (images/s), with the bucket served by a local GCS server (fake-gcs-server) reached over HTTP by the
same client a TPU VM uses (gcsfs), optionally behind a proxy that adds a network round trip to every request.

  python benchmarks/storage_io.py                              # 512 LAION-like images, 1 worker, 0 and 20 ms RTT
  python benchmarks/storage_io.py --num_images=64 --batches=2 --batch_size=8 --latency_ms=0   # smoke test

The local server has no real network: at 0 ms it measures the client's own cost (HTTP, ranged reads, the read-ahead
thread); the added round trip (--latency_ms, per request) shows whether the bounded read-ahead (8 MiB blocks, the
next fetched in the background) keeps decoding from waiting on the network.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
from gcs_local import FaultProxy, start_gcs_server  # noqa: E402  pylint: disable=g-import-not-at-top
# Its flags (--num_images, --batch_size, --batches, --image_size) are this script's too.
from input_pipeline import time_grain, write_laion_like  # noqa: E402  pylint: disable=g-import-not-at-top

from eva_clip_jax import storage  # noqa: E402  pylint: disable=g-import-not-at-top
from eva_clip_jax.data.shards import list_shards  # noqa: E402  pylint: disable=g-import-not-at-top

_LATENCY = flags.DEFINE_list('latency_ms', ['0', '20'], 'round trips added to every request to the bucket')
_WORKERS = flags.DEFINE_integer('pipeline_workers', 1, 'grain worker processes for the pipeline rows')
_REPEATS = flags.DEFINE_integer('read_repeats', 3, 'raw-read passes per location; the best counts')


def read_rate(shards: list[str]) -> float:
  """MB/s reading every shard start to end in 1 MiB reads, as the tar reader streams them."""
  start, nbytes = time.perf_counter(), 0
  for path in shards:
    with storage.open_read(path, 'rb') as f:
      while chunk := f.read(1 << 20):
        nbytes += len(chunk)
  return nbytes / 1e6 / (time.perf_counter() - start)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    local, stats = write_laion_like(os.path.join(tmp, 'shards'), flags.FLAGS.num_images)
    os.makedirs(os.path.join(tmp, 'gcs'))
    server, url = start_gcs_server(os.path.join(tmp, 'gcs'))
    try:
      os.environ['STORAGE_EMULATOR_HOST'] = url
      fs, _ = storage.filesystem('gs://bench-shards')
      fs.mkdir('bench-shards')
      storage.upload(local, 'gs://bench-shards/shards')
      total_mb = sum(storage.size(p) for p in list_shards(local)) / 1e6
      print(f'{platform.node()} {os.cpu_count()} CPUs, {time.strftime("%Y-%m-%d")}; {flags.FLAGS.num_images} images '
            f'({stats["megapixels"]:.2f} MP mean), {total_mb:.1f} MB in {len(list_shards(local))} shards; '
            f'pipeline: batch {flags.FLAGS.batch_size}, {_WORKERS.value} worker(s), {flags.FLAGS.batches} batches')
      print('| shards | added RTT | raw read MB/s | pipeline images/s (wall) | images per CPU-s |')
      print('|---|---|---|---|---|')
      rows = [('local disk', None)] + [('gs:// (local server)', float(ms)) for ms in _LATENCY.value]
      for name, latency in rows:
        proxy = None
        if latency is not None:
          proxy = FaultProxy(url, delay_s=latency / 1000)
          os.environ['STORAGE_EMULATOR_HOST'] = proxy.url
        try:
          pattern = local if latency is None else 'gs://bench-shards/shards'
          shards = list_shards(pattern)
          mb_s = max(read_rate(shards) for _ in range(_REPEATS.value))
          wall, cpu = time_grain(pattern, _WORKERS.value, fast=True)
        finally:
          if proxy is not None:
            proxy.close()
            os.environ['STORAGE_EMULATOR_HOST'] = url
        rtt = '-' if latency is None else f'{latency:.0f} ms'
        print(f'| {name} | {rtt} | {mb_s:,.1f} | {wall:,.1f} | {cpu:,.1f} |', flush=True)
    finally:
      server.kill()


if __name__ == '__main__':
  app.run(main)

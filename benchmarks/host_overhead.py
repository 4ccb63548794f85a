r"""Host overhead of the training loop per step: the loop's step time minus the jitted step's own.

  python benchmarks/host_overhead.py                                  # tiny model, 1 CPU device, batch 16
  python benchmarks/host_overhead.py --devices=8 --batch_size=64 --interval=20 --intervals=4

1. loop   `train_and_evaluate` on synthetic data (no evaluations, a checkpoint only after the last step), exactly as
          `python -m eva_clip_jax.train` runs it; the step time of each log interval after the first (which holds
          the compile) comes from the loop's own throughput meter (`perf/step_time_s` in metrics.jsonl).
2. step   the same jitted step, called back to back on one batch already on the devices, its metrics discarded,
          one device sync per interval.
3. input  the loop's `DevicePrefetcher` alone: drawing a batch from the pipeline and starting its transfer.
loop - step is what the loop adds on the host and does not hide behind the device's work (input pipeline, transfers,
metric bookkeeping, the once-per-interval metric fetch). On CPU "the device" is the same cores as the host, so host
work also slows the step itself: read the numbers as an upper bound of what an accelerator would see.
The step is compiled once: the persistent compilation cache (a temporary directory) serves the second jit.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

_DEVICES = flags.DEFINE_integer('devices', 1, 'CPU devices (the mesh: data-parallel over all of them)')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'global batch')
_INTERVAL = flags.DEFINE_integer('interval', 10, 'steps per measured interval (= log_every_steps)')
_INTERVALS = flags.DEFINE_integer('intervals', 3, 'measured intervals, after one warm-up interval')
_CONFIG = flags.DEFINE_string('config', 'configs/tiny.py', 'config file')


def _config():
  import importlib.util
  spec = importlib.util.spec_from_file_location('benchmark_config', _CONFIG.value)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.synthetic = True
  config.evals = {}
  config.batch_size = _BATCH.value
  config.log_every_steps = _INTERVAL.value
  config.total_steps = _INTERVAL.value * (_INTERVALS.value + 1)
  config.checkpoint.every_steps = 10**9
  return config


def _loop_step_times(config, workdir: str) -> list[float]:
  from eva_clip_jax.training.loop import train_and_evaluate
  train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [row['perf/step_time_s'] for row in rows if 'perf/step_time_s' in row][1:]


def _bare_step_and_input_times(config) -> tuple[list[float], list[float]]:
  import jax

  from eva_clip_jax.models import get_model_spec
  from eva_clip_jax import sharding as sharding_lib
  from eva_clip_jax.training import step as step_lib
  from eva_clip_jax.training.loop import DevicePrefetcher, make_train_dataset
  mesh = sharding_lib.make_mesh(config.mesh)
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup)
  train_step = step_lib.make_train_step(setup)
  spec = get_model_spec(config.model.name)
  prefetcher = DevicePrefetcher(iter(make_train_dataset(config, config.batch_size, spec.vision.image_size,
                                                        spec.text.context_length)), mesh, config.prefetch)
  batch, _, _ = next(prefetcher)
  state, metrics = train_step(state, batch)  # compile (from the cache)
  jax.block_until_ready(metrics)
  step_times, input_times = [], []
  for _ in range(_INTERVALS.value):
    start = time.perf_counter()
    for _ in range(_INTERVAL.value):
      state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    step_times.append((time.perf_counter() - start) / _INTERVAL.value)
  for _ in range(_INTERVALS.value):
    start = time.perf_counter()
    for _ in range(_INTERVAL.value):
      drawn, _, _ = next(prefetcher)
    jax.block_until_ready(drawn)
    input_times.append((time.perf_counter() - start) / _INTERVAL.value)
  return step_times, input_times


def main(argv):
  del argv
  import jax
  logging.set_verbosity(logging.WARNING)  # orbax reports every step of its final save at INFO
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  config = _config()
  with tempfile.TemporaryDirectory() as tmp:
    jax.config.update('jax_compilation_cache_dir', os.path.join(tmp, 'cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    loop = _loop_step_times(config, os.path.join(tmp, 'workdir'))
    step, draw = _bare_step_and_input_times(config)
  ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
  overhead = ms(loop) - ms(step)
  print(f'{config.model.name}, global batch {config.batch_size}, {jax.device_count()} CPU devices, '
        f'{_INTERVALS.value} intervals of {_INTERVAL.value} steps (medians), JAX {jax.__version__}, '
        f'{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}')
  print('| loop ms/step | jitted step ms/step | host overhead ms/step | overhead % of loop | input draw+transfer ms |')
  print('|---|---|---|---|---|')
  print(f'| {ms(loop):.1f} | {ms(step):.1f} | {overhead:.1f} | {100 * overhead / ms(loop):.1f} | {ms(draw):.2f} |')
  print('loop intervals ms/step: ' + ', '.join(f'{1e3 * t:.1f}' for t in loop), file=sys.stderr)
  print('step intervals ms/step: ' + ', '.join(f'{1e3 * t:.1f}' for t in step), file=sys.stderr)


if __name__ == '__main__':
  app.run(main)

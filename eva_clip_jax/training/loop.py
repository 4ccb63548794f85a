"""`train_and_evaluate`: the training run, readable top to bottom.

config -> mesh -> trainer (abstract state, shardings) -> state (restored, or initialised sharded) -> input
iterator (restored position) -> jitted step (donated state) -> metrics / evaluators / checkpoints every N steps.
The loop never waits for the device except at log steps (metrics are fetched once per interval), evaluations
and checkpoint saves (orbax copies to host, then writes in the background).
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import time
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from eva_clip_jax.data import pipeline
from eva_clip_jax.models import get_model_spec
from eva_clip_jax.training import metrics as metrics_lib
from eva_clip_jax.training import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from eva_clip_jax.training.checkpoint import Checkpointer


class DevicePrefetcher:
  """Draws batches ahead and starts their transfer to the devices, remembering the iterator position (for the
  checkpoint) and the skipped-sample counts (for the metrics) of each."""

  def __init__(self, iterator, mesh, depth: int, *, fingerprint: bool = False):
    self.iterator, self.mesh, self.depth = iterator, mesh, max(int(depth), 1)
    self.fingerprint = fingerprint
    self._queue: collections.deque = collections.deque()

  def _fill(self) -> None:
    while len(self._queue) < self.depth:
      batch = next(self.iterator)
      position = self.iterator.get_state()
      info = pipeline.skipped_counts(batch) if 'skipped' in batch else {}
      if self.fingerprint:  # which examples this process fed the step (for determinism checks)
        digest = hashlib.sha1()
        for key in step_lib.BATCH_KEYS:
          digest.update(np.ascontiguousarray(batch[key]).tobytes())
        info = {**info, 'fingerprint': digest.hexdigest()}
      self._queue.append((step_lib.device_batch(batch, self.mesh), position, info))

  def __next__(self):
    self._fill()
    return self._queue.popleft()


def make_train_dataset(config, local_batch: int, image_size: int, context_length: int):
  if config.data.get('synthetic', False):
    return pipeline.make_synthetic_dataset(batch_size=local_batch, image_size=image_size,
                                           context_length=context_length, seed=config.seed,
                                           process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_dataset_from_config(config.data, batch_size=local_batch, image_size=image_size,
                                           context_length=context_length, seed=config.seed,
                                           process_index=jax.process_index(), process_count=jax.process_count())


def initial_params(config) -> dict | None:
  """Host parameters from the config's init weights (EVA MIM vision tower, CLIP text tower), or None."""
  if not (config.init.get('visual') or config.init.get('text')):
    return None
  from eva_clip_jax.conversion.api import init_from_config  # torch-free for .safetensors / converted dirs
  from eva_clip_jax.models import create_model
  model = create_model(config.model.name, seed=config.seed, **step_lib.model_kwargs(config))
  report = init_from_config(model, config.init)
  logging.info('Initial weights: %s', report)
  return nnx.state(model, nnx.Param).to_pure_dict()


class _Preemption:
  """SIGTERM (a preemption notice) asks the loop to save and stop at the next step boundary."""

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a test runner thread): no handler
      self._previous = None

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(self.requested))).any())

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _flops_and_peak(config, spec) -> tuple[float | None, float | None]:
  try:
    from eva_clip_jax.training import flops
  except ImportError:
    return None, None
  per_sample = flops.train_flops_per_sample(spec, patch_dropout=config.model.patch_dropout)['total']
  peak = config.get('peak_flops_per_device') or flops.peak_flops_per_device(jax.devices()[0], config.model.dtype)
  return per_sample, peak


def train_and_evaluate(config, workdir: str, *, inject_nonfinite_at: tuple[int, ...] = ()) -> dict[str, Any]:
  """Trains to `config.total_steps` (resuming from `workdir` if it holds checkpoints); returns the last metrics."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.mesh)
  dp = sharding_lib.data_parallel_size(mesh)
  if config.batch_size % dp or config.batch_size % jax.process_count():
    raise ValueError(f'batch_size {config.batch_size} must divide evenly over the {dp} data-parallel devices and '
                     f'{jax.process_count()} processes')
  trainer = step_lib.make_trainer(config, mesh)
  model_spec = get_model_spec(config.model.name)
  logging.info('Mesh %s, strategy %s, global batch %d', dict(mesh.shape), config.sharding.strategy,
               config.batch_size)

  local_batch = config.batch_size // jax.process_count()
  dataset = make_train_dataset(config, local_batch, model_spec.vision.image_size, model_spec.text.context_length)
  iterator = iter(dataset)
  ckpt_cfg = config.checkpoint
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), every_steps=ckpt_cfg.every_steps,
                              keep=ckpt_cfg.keep, asynchronous=ckpt_cfg.asynchronous)
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, trainer.abstract_state, iterator)
    logging.info('Resumed from step %d in %s', latest, checkpointer.directory)
  else:
    state = step_lib.init_state(trainer, initial_params(config))
  train_step = step_lib.make_train_step(trainer, inject_nonfinite_at=inject_nonfinite_at)

  writer = metrics_lib.create_writer(workdir)
  from eva_clip_jax.evaluation import build_evaluators
  evaluators = [e for e in build_evaluators(config.evals) if e.cfg.get('data')]
  flops_per_sample, peak = _flops_and_peak(config, model_spec)
  throughput = metrics_lib.Throughput(global_batch=config.batch_size, num_devices=jax.device_count(),
                                      total_steps=config.total_steps, flops_per_sample=flops_per_sample,
                                      peak_flops_per_device=peak)
  log_batches = bool(config.get('log_batch_fingerprints', False))
  prefetcher = DevicePrefetcher(iterator, mesh, config.get('prefetch', 2), fingerprint=log_batches)
  fingerprints = open(os.path.join(workdir, f'batches.process{jax.process_index()}.txt'), 'a') if log_batches else None
  # Tests of crash recovery: stop making progress after this step's checkpoint, waiting to be killed.
  hang_after = int(os.environ.get('EVA_CLIP_JAX_TEST_HANG_AFTER_STEP', '0'))
  preemption = _Preemption()
  step = int(jax.device_get(state['step']))
  total = int(config.total_steps)
  log_every = int(config.log_every_steps)
  history: list = []
  skipped_data: collections.Counter = collections.Counter()
  last_metrics: dict[str, Any] = {}
  throughput.start(step)
  try:
    while step < total:
      batch, position, info = next(prefetcher)
      state, step_metrics = train_step(state, batch)
      step += 1
      history.append(step_metrics)
      if fingerprints:
        fingerprints.write(f'{step} {info.pop("fingerprint")}\n')
        fingerprints.flush()
      skipped_data.update(info)
      if step % log_every == 0 or step == total:
        summary = metrics_lib.mean_metrics(history)
        summary.update(throughput.measure(step))
        summary.update({k: float(v) for k, v in skipped_data.items()})
        writer.write_scalars(step, summary)
        last_metrics.update(summary)
        history.clear()
      due = [e for e in evaluators if (e.every_steps and step % e.every_steps == 0) or step == total]
      if due:
        model = trainer.model(state['params'])
        for evaluator in due:
          results = evaluator.run(model)
          writer.write_scalars(step, results)
          last_metrics.update(results)
        throughput.start(step)  # evaluation time is not training throughput
      stop = step % log_every == 0 and preemption.any_process()
      checkpointer.save(step, state, position, force=stop or step == total)
      if hang_after and step == hang_after:
        checkpointer.wait()
        logging.warning('EVA_CLIP_JAX_TEST_HANG_AFTER_STEP=%d: waiting to be killed.', step)
        while True:
          time.sleep(1)
      if stop:
        logging.warning('Stopped at step %d after a preemption notice; restart with the same workdir to resume.',
                        step)
        break
  finally:
    if fingerprints:
      fingerprints.close()
    checkpointer.close()
    writer.close()
    preemption.restore()
    close = getattr(iterator, 'close', None)
    if close:
      close()
  last_metrics['step'] = step
  last_metrics['state'] = state
  return last_metrics

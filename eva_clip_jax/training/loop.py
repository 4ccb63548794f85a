"""`train_and_evaluate`: the training run, readable top to bottom.

config -> mesh -> setup (model graph, optimizer, shardings) -> state (restored, or initialised sharded) -> input
iterator (restored position) -> jitted step (donated state) -> metrics / evaluators / checkpoints every N steps.
The loop never waits for the device except at log steps (metrics are fetched once per interval), evaluations
and checkpoint saves (orbax copies to host, then writes in the background).
"""

from __future__ import annotations

import collections
import functools
import signal
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from eva_clip_jax import storage
from eva_clip_jax.data import pipeline
from eva_clip_jax.errors import InputError
from eva_clip_jax.models import get_model_spec
from eva_clip_jax.models.paths import flatten, unflatten
from eva_clip_jax.progress import Progress
from eva_clip_jax.training import flops
from eva_clip_jax.training import metrics as metrics_lib
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from eva_clip_jax.training.checkpoint import Checkpointer
from eva_clip_jax.training.state import TrainState


class DevicePrefetcher:
  """Draws batches ahead and starts their transfer to the devices, remembering the iterator position (for the
  checkpoint) and the skipped-sample counts (for the metrics) of each."""

  def __init__(self, iterator, mesh, depth: int):
    self.iterator, self.mesh, self.depth = iterator, mesh, max(int(depth), 1)
    self._queue: collections.deque = collections.deque()
    # XLA:CPU may alias a host array instead of copying it, which would keep grain's shared-memory block of every
    # batch alive as long as its device array (and leak the last ones at exit); accelerators always copy.
    self._copy_host = mesh.devices.flat[0].platform == 'cpu'

  def _fill(self) -> None:
    while len(self._queue) < self.depth:
      batch = next(self.iterator)
      position = self.iterator.get_state()
      skipped = pipeline.skipped_counts(batch) if 'skipped' in batch else {}
      if self._copy_host:
        batch = {k: np.array(batch[k]) for k in step_lib.BATCH_KEYS}
      self._queue.append((step_lib.device_batch(batch, self.mesh), position, skipped))

  def __next__(self):
    self._fill()
    return self._queue.popleft()

  def close(self) -> None:
    self._queue.clear()


def make_train_dataset(config, local_batch: int, image_size: int, context_length: int):
  if config.data.get('synthetic', False):
    return pipeline.make_synthetic_dataset(batch_size=local_batch, image_size=image_size,
                                           context_length=context_length, seed=config.seed,
                                           process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_dataset_from_config(config.data, batch_size=local_batch, image_size=image_size,
                                           context_length=context_length, seed=config.seed,
                                           process_index=jax.process_index(), process_count=jax.process_count())


def initial_params(config, setup: step_lib.TrainSetup) -> dict | None:
  """Parameters from the config's init weights, or None (random initialisation).

  `init.full`: a whole EVA-CLIP model to fine-tune from (a PyTorch file in the EVA or open_clip layout, a converted
  directory or hf-hub:...), heads and logit scale included, as the reference's --pretrained; it takes the place of
  the per-tower `init.visual` / `init.text` (the paper's initialisation, EVA MIM vision tower and CLIP text tower).
  Either is read straight into the parameters' shardings, each process reading only its own shards (8B and 18B
  never pass through one host whole); with the per-tower files the rest starts from the seed's random weights.
  """
  full = config.init.get('full')
  if not (full or config.init.get('visual') or config.init.get('text')):
    return None
  if full:
    from eva_clip_jax.pretrained import resolve  # a released tag -> its file in the hub cache
    full = resolve(full, config.model.name)
    if not (full.startswith('hf-hub:') or storage.exists(full)):
      raise FileNotFoundError(f'config.init.full = {full!r} is neither a file nor a directory: pass the released '
                              'checkpoint (.pt, .bin, .safetensors) or a converted directory')
    from eva_clip_jax.conversion.api import read_sharded  # torch only for PyTorch files
    params = read_sharded(full, get_model_spec(config.model.name), setup.abstract_state.params)
    ignored = [f'init.{k}={config.init[k]!r}' for k in ('visual', 'text') if config.init.get(k)]
    logging.info('Initial weights: the whole model from %s%s', full,
                 f' ({", ".join(ignored)} not used)' if ignored else '')
    return params
  from eva_clip_jax.conversion.api import init_sources, read_towers  # torch-free for .safetensors
  visual, text = init_sources(config.init, config.model.name)
  loaded = read_towers(setup.abstract_state.params, get_model_spec(config.model.name), visual=visual, text=text,
                       skip=tuple(config.init.skip))
  params = flatten(step_lib.random_params(setup))  # the seed's weights, made in their shardings
  params.update(loaded)
  logging.info('Initial weights: %d parameters loaded, fresh: %s', len(loaded), sorted(set(params) - set(loaded)))
  return unflatten(params)


def make_evaluators(config, setup: step_lib.TrainSetup) -> list:
  """The config's evaluations (those that name their data), built once on the training mesh and the parameters'
  shardings: evaluation is handed the model function, mesh and shardings, and never imports training."""
  if not any(cfg.get('data') for cfg in config.evals.values()):
    return []  # no evaluation: tokenizer, PIL and friends are not even imported
  from eva_clip_jax.evaluation import build_evaluators
  return build_evaluators(config.evals, model_fn=setup.model, mesh=setup.mesh, param_shardings=setup.shardings.params,
                          trace_context=functools.partial(sharding_lib.activation_sharding, setup.mesh))


class _Preemption:
  """SIGTERM (a preemption notice: spot/preemptible TPU VMs and SLURM send it about 30 s before the end) asks the
  loop to save and stop. A single process acts at the next step; several processes must agree on the step, which
  costs a collective, so they compare notes at log steps (keep a log interval well inside the notice)."""

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a test runner thread): no handler
      self._previous = None

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def stop_now(self, step: int, log_every: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % log_every:
      return False
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(self.requested))).any())

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _throughput(config, spec, total: int) -> metrics_lib.Throughput:
  per_sample = flops.train_flops_per_sample(spec, patch_dropout=config.model.patch_dropout)['total']
  peak = config.get('peak_flops_per_device') or flops.peak_flops_per_device(jax.devices()[0], config.model.dtype)
  return metrics_lib.Throughput(global_batch=config.batch_size, num_devices=jax.device_count(), total_steps=total,
                                flops_per_sample=per_sample, peak_flops_per_device=peak)


def train_and_evaluate(config, workdir: str) -> tuple[TrainState, dict[str, float]]:
  """Trains to `config.total_steps`, resuming from `workdir` if it holds checkpoints.

  Returns the final state and the last value of every metric (training, throughput, evaluations).
  """
  # Mesh and setup. The workdir may be a bucket (gs://...): everything below reaches it through `storage`.
  workdir = storage.absolute(workdir)
  storage.makedirs(workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  dp = sharding_lib.data_parallel_size(mesh)
  if config.batch_size % dp or config.batch_size % jax.process_count():
    raise InputError(f'batch_size {config.batch_size} must divide evenly over the {dp} data-parallel devices and '
                     f'{jax.process_count()} processes')
  setup = step_lib.make_setup(config, mesh)
  spec = get_model_spec(config.model.name)
  logging.info('Mesh %s, strategy %s, global batch %d', dict(mesh.shape), config.sharding.strategy,
               config.batch_size)
  if jax.process_index() == 0:
    logging.info('Parameters:\n%s', setup.parameter_table())

  # Input pipeline and checkpoints: the restored state comes with the iterator's position.
  local_batch = config.batch_size // jax.process_count()
  iterator = iter(make_train_dataset(config, local_batch, spec.vision.image_size, spec.text.context_length))
  ckpt_cfg = config.checkpoint
  checkpointer = Checkpointer(storage.join(workdir, 'checkpoints'), every_steps=ckpt_cfg.every_steps,
                              keep=ckpt_cfg.keep, asynchronous=ckpt_cfg.asynchronous,
                              max_failed_saves=ckpt_cfg.get('max_failed_saves', 3))
  preemption = _Preemption()
  writer = metrics_lib.Writer(workdir)
  total, log_every = int(config.total_steps), int(config.log_every_steps)
  progress = Progress(max(total, 1), bar=True)
  resources = []  # closed in the finally block, before the iterator
  try:
    restored = checkpointer.restore_latest(setup.abstract_state, iterator)
    if restored:
      state, step = restored
      logging.info('Resumed from step %d in %s', step, checkpointer.directory)
    else:
      state, step = step_lib.init_state(setup, initial_params(config, setup)), 0
    train_step = step_lib.make_train_step(setup)
    evaluators = make_evaluators(config, setup)
    throughput = _throughput(config, spec, total)
    prefetcher = DevicePrefetcher(iterator, mesh, config.get('prefetch', 2))
    resources.append(prefetcher)

    # The loop.
    history: list = []
    skipped_data: collections.Counter = collections.Counter()
    last_metrics: dict[str, float] = {}
    throughput.start(step)
    while step < total:
      batch, position, skipped = next(prefetcher)
      state, step_metrics = train_step(state, batch)
      step += 1
      history.append(step_metrics)
      skipped_data.update(skipped)
      if step % log_every == 0 or step == total:
        summary = metrics_lib.mean_metrics(history)
        summary.update(throughput.measure(step))
        summary.update({k: float(v) for k, v in skipped_data.items()})
        writer.write_scalars(step, summary)
        progress.update(step, metrics_lib.progress_text(step, progress.total, summary))
        last_metrics.update(summary)
        history.clear()
      due = [e for e in evaluators if (e.every_steps and step % e.every_steps == 0) or step == total]
      for evaluator in due:
        results = evaluator.run(state.params)
        writer.write_scalars(step, results)
        progress.message(f'step {step} {evaluator.name}: ' + ', '.join(f'{k.split("/", 1)[-1]}={v:.4f}'
                                                                        for k, v in results.items()))
        last_metrics.update(results)
      if due:
        throughput.start(step)  # evaluation time is not training throughput
      stop = preemption.stop_now(step, log_every)
      if stop or step == total:
        checkpointer.save_final(step, state, position)  # waits; retried in place; raises if it cannot be saved
      else:
        checkpointer.save(step, state, position)
      if stop:
        progress.message(f'Stopped at step {step} after a preemption notice; restart with the same workdir to '
                         'resume.')
        logging.warning('Stopped at step %d after a preemption notice.', step)
        break
  finally:
    for resource in resources:
      resource.close()
    progress.close()
    checkpointer.close()
    writer.close()
    preemption.restore()
    close = getattr(iterator, 'close', None)
    if close:
      close()
  last_metrics['step'] = step
  return state, last_metrics

"""Metrics: every scalar to TensorBoard event files and `metrics.jsonl`, the text of the console's progress line
(eva_clip_jax.progress draws it), and throughput bookkeeping.

clu imports TensorFlow for its TensorBoard writer, so it is imported here, lazily, and never by the model code.
Only process 0 writes; the others log nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from eva_clip_jax import storage


class Writer:
  """TensorBoard events (clu's SummaryWriter, in a background thread) plus `metrics.jsonl`, one JSON line per
  write, for scripts and tests that want the history without TensorFlow.

  In a bucket workdir both are written to a local staging folder and uploaded after every write: TensorFlow's own
  GCS file system cannot reach a GCS emulator (it has no endpoint setting), and object stores cannot append, so
  the whole (small) files are uploaded again each time. A run resumed in the same workdir continues both files."""

  def __init__(self, workdir: str):
    self._primary = jax.process_index() == 0
    self._tensorboard = self._jsonl = None
    self._workdir, self._staging = workdir, None
    if self._primary:
      from clu import metric_writers  # imports TensorFlow; keep it out of module import time
      local = workdir
      if storage.is_url(workdir):
        self._staging = local = tempfile.mkdtemp(prefix='eva_clip_jax_metrics_')
        remote_jsonl = storage.join(workdir, 'metrics.jsonl')
        if storage.exists(remote_jsonl):
          with open(os.path.join(local, 'metrics.jsonl'), 'wb') as f:
            f.write(storage.read_bytes(remote_jsonl))
      self._tensorboard = metric_writers.AsyncWriter(metric_writers.SummaryWriter(local))
      self._jsonl = open(os.path.join(local, 'metrics.jsonl'), 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._primary:
      return
    self._tensorboard.write_scalars(step, scalars)
    try:
      self._jsonl.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
      self._jsonl.flush()
      if self._staging is not None:
        self._tensorboard.flush()
        self._upload()
    except Exception as e:  # pylint: disable=broad-except  (a full disk, a bucket refusing writes)
      # The metrics are not worth the run: the checkpoints decide when a storage failure stops it.
      logging.error('Writing the metrics of step %d failed (%s: %s); training goes on.', step, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else '')

  def _upload(self) -> None:
    for name in os.listdir(self._staging):  # metrics.jsonl and this run's event file(s)
      storage.upload(os.path.join(self._staging, name), storage.join(self._workdir, name))

  def close(self) -> None:
    if not self._primary:
      return
    try:
      self._tensorboard.close()
      self._jsonl.close()
      if self._staging is not None:
        self._upload()
    except Exception as e:  # pylint: disable=broad-except  (as in write_scalars; never masks the run's own error)
      logging.error('Writing the last metrics failed (%s: %s).', type(e).__name__, str(e).splitlines()[0] if str(e)
                    else '')
    finally:
      if self._staging is not None:
        shutil.rmtree(self._staging, ignore_errors=True)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def progress_text(step: int, total: int, metrics: Mapping[str, float]) -> str:
  """Training's progress line: 'step 120/500 | loss 3.2100 | 1,234 samples/s | ETA 1:30:00', from what the
  summary has (drawn by eva_clip_jax.progress.Progress)."""
  parts = [f'step {step}/{total}']
  if 'loss' in metrics:
    parts.append(f'loss {metrics["loss"]:.4f}')
  if 'perf/samples_per_s' in metrics:
    parts.append(f'{metrics["perf/samples_per_s"]:,.0f} samples/s')
  if 'perf/eta_hours' in metrics:
    parts.append(f'ETA {_duration(metrics["perf/eta_hours"] * 3600)}')
  return ' | '.join(parts)


class Throughput:
  """Samples/s, step time, MFU and ETA between two log points (host wall clock, after a device sync)."""

  def __init__(self, *, global_batch: int, num_devices: int, total_steps: int, flops_per_sample: float | None,
               peak_flops_per_device: float | None):
    self.global_batch, self.num_devices, self.total_steps = global_batch, num_devices, total_steps
    self.flops_per_sample, self.peak = flops_per_sample, peak_flops_per_device
    self._last_time: float | None = None
    self._last_step = 0

  def start(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    if self._last_time is None or step <= self._last_step:
      self.start(step)
      return {}
    seconds = (now - self._last_time) / (step - self._last_step)
    samples_per_s = self.global_batch / seconds
    out = {'perf/step_time_s': seconds, 'perf/samples_per_s': samples_per_s,
           'perf/samples_per_s_per_device': samples_per_s / self.num_devices,
           'perf/eta_hours': seconds * max(self.total_steps - step, 0) / 3600}
    if self.flops_per_sample and self.peak:
      out['perf/mfu'] = samples_per_s / self.num_devices * self.flops_per_sample / self.peak
    self.start(step)
    return out


def mean_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages per-step device metrics (fetched once per log interval: the only host sync of the loop)."""
  fetched = jax.device_get(history)
  keys = fetched[-1].keys()
  out = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
  for k in ('skipped_steps', 'loss_scale') + tuple(k for k in keys if k.startswith('lr/')):
    out[k] = float(fetched[-1][k])  # the latest value, not an average
  return out

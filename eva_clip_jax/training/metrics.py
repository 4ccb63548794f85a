"""Metric writing (clu: TensorBoard event files + the console) and throughput bookkeeping.

clu imports TensorFlow for its TensorBoard writer, so it is imported here, lazily, and never by the model code.
Only process 0 writes; the others log nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class Writer:
  """clu's default writer (TensorBoard events + console) plus `metrics.jsonl`, one JSON line per write, for
  scripts and tests that want the history without TensorFlow."""

  def __init__(self, workdir: str):
    from clu import metric_writers  # imports TensorFlow; keep it out of module import time
    self._primary = jax.process_index() == 0
    self._clu = metric_writers.create_default_writer(workdir, just_logging=not self._primary, asynchronous=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a') if self._primary else None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._clu.write_scalars(step, scalars)
    if self._jsonl:
      self._jsonl.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
      self._jsonl.flush()

  def flush(self) -> None:
    self._clu.flush()

  def close(self) -> None:
    self._clu.close()
    if self._jsonl:
      self._jsonl.close()


def create_writer(workdir: str) -> Writer:
  return Writer(workdir)


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

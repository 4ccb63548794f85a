"""One row of the memory plan (`python -m eva_clip_jax.plan`): a strategy x remat policy compiled at the planned
per-device batch, or at the largest that fits found by `memory.largest_batch`, and its printed form. Flag-free, so
that tests and scripts can call it without the CLI's flags."""

from __future__ import annotations

import copy
import dataclasses
import math

HEADER = (f"{'strategy':8} {'remat':13} {'mesh':16} {'params':>7} {'opt':>7} {'fixed':>7} {'MiB/smp':>8} "
          f"{'batch/dev':>9} {'global':>8} {'temp':>7} {'total':>7} {'fits':>4} {'compiles':>8}")


def _gib(n: float) -> str:
  return f'{n / 2**30:7.2f}'


def plan_row(config, mesh_config: dict, strategy: str, remat: str, *, budget: int, batch_per_device: int = 0,
             start: int = 16, limit: int = 1 << 16, max_compiles: int = 5, devices=None) -> dict:
  """One strategy x remat: the estimate at the planned batch, and the line fitted through the compiles.

  devices: what to compile for (`memory.target_devices(...).devices`); default: this process's JAX devices."""
  import jax

  from eva_clip_jax.training import memory
  from eva_clip_jax.training import sharding as sharding_lib
  from eva_clip_jax.training import step as step_lib
  config = copy.deepcopy(config)
  config.sharding.strategy, config.model.remat = strategy, remat
  mesh_config = memory.strategy_mesh(mesh_config, strategy)
  multiple = step_lib.micro_batches(config)  # per-device batches the accumulation can split
  if batch_per_device % multiple:
    raise ValueError(f'--batch_per_device={batch_per_device} does not split into config.accum_steps={multiple} '
                     'micro-batches: pass a multiple of it')
  num_devices = math.prod(mesh_config.values())
  mesh = sharding_lib.make_mesh(mesh_config, devices=list(devices or jax.devices())[:num_devices])
  estimates: dict[int, memory.MemoryEstimate] = {}
  refused: dict[int, int] = {}  # batches the compiler refused for want of memory: what it said they need

  def measure(batch: int) -> int:
    try:
      estimates[batch] = memory.compile_train_step(config, mesh, batch)[1]
    except Exception as e:  # a JaxRuntimeError from XLA; all but a refusal for want of memory is raised again
      needed = memory.exhausted_bytes(e)
      if needed is None:
        raise
      refused[batch] = max(needed, budget + 1)  # over the device's memory, so over the budget
      return refused[batch]
    return estimates[batch].total

  if batch_per_device:
    measure(batch_per_device)
    chosen = batch_per_device
  else:
    chosen, _ = memory.largest_batch(measure, budget, start=start, limit=limit, max_measurements=max_compiles,
                                     multiple=multiple)
  if not estimates:
    raise RuntimeError(f'{strategy}, remat {remat}: the compiler refused every batch tried for want of memory '
                       f'(needed GiB: {", ".join(f"{b}: {n / 2**30:.1f}" for b, n in sorted(refused.items()))})')
  at = estimates[chosen] if chosen else estimates[min(estimates)]  # nothing fits: show the smallest batch tried
  per_sample = fixed = None
  others = sorted((b for b in estimates if b != at.batch_per_device), key=lambda b: abs(b - at.batch_per_device))
  if others:
    other = estimates[others[0]]
    per_sample = (other.total - at.total) / (other.batch_per_device - at.batch_per_device)
    fixed = at.total - per_sample * at.batch_per_device
  return {**dataclasses.asdict(at), 'total': at.total, 'mesh': memory.format_mesh(mesh_config),
          'global_batch': at.batch_per_device * sharding_lib.data_parallel_size(mesh), 'fits': at.total <= budget,
          'largest': chosen if not batch_per_device else None, 'budget': budget, 'per_sample': per_sample,
          'fixed': fixed, 'compiles': len(estimates) + len(refused),
          'measured': dict(sorted({**refused, **{b: e.total for b, e in estimates.items()}}.items())),
          'compile_seconds': sum(e.compile_seconds for e in estimates.values())}


def format_row(row: dict) -> str:
  per_sample = f"{row['per_sample'] / 2**20:8.1f}" if row['per_sample'] is not None else f"{'-':>8}"
  fixed = _gib(row['fixed']) if row['fixed'] is not None else f"{'-':>7}"
  batch = row['batch_per_device'] if row['largest'] is None or row['largest'] else 0  # not one sample fits
  return (f"{row['strategy']:8} {row['remat']:13} {row['mesh']:16} {_gib(row['params'])} {_gib(row['opt_state'])} "
          f"{fixed} {per_sample} {batch!s:>9} {row['global_batch']:8d} {_gib(row['temp'])} {_gib(row['total'])} "
          f"{'yes' if row['fits'] else 'no':>4} {row['compiles']:3d} ({row['compile_seconds']:3.0f}s)")

r"""Plans per-device memory for a topology this machine does not have: the train step is compiled ahead of time for
as many CPU devices as the mesh names, from abstract inputs (nothing is allocated; eva_clip_jax/training/memory.py).

  python -m eva_clip_jax.plan --config=configs/l14.py --mesh=data:64 --device_memory_gb=80
  python -m eva_clip_jax.plan --config=configs/e14.py --mesh=data:9,fsdp:16 --strategies=fsdp --remat=full
  python -m eva_clip_jax.plan --config=configs/b16.py --mesh=data:16 --strategies=zero1 --batch_per_device=2048

For each strategy x remat policy: parameter and optimizer-state bytes per device, the step's fixed bytes and bytes
per sample, and the largest per-device batch within --device_memory_gb x --usable_fraction (found by compiling a
few batch sizes; --batch_per_device compiles one size instead). fsdp rows move the data axis onto 'fsdp' when the
mesh has none. The numbers are XLA:CPU's buffer assignment: launch/README.md says how a GPU's or TPU's differ.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file', lock_config=False)
_MESH = flags.DEFINE_string('mesh', 'data:8', "devices by mesh axis: 'data:64' or 'data:8,fsdp:8'")
_MEMORY = flags.DEFINE_float('device_memory_gb', 80.0, 'memory per device in GiB (A100/H100 80GB: 80)')
_FRACTION = flags.DEFINE_float('usable_fraction', 0.9, 'share of it the step may use (GPU: '
                               'XLA_PYTHON_CLIENT_MEM_FRACTION; the rest is runtime and fragmentation headroom)')
_STRATEGIES = flags.DEFINE_list('strategies', ['dp', 'zero1', 'fsdp'], 'sharding strategies to plan')
_REMAT = flags.DEFINE_list('remat', ['none', 'full'], 'remat policies to plan')
_BATCH = flags.DEFINE_integer('batch_per_device', 0, 'compile this per-device batch only (0: search the largest)')
_START = flags.DEFINE_integer('start_batch', 16, 'first per-device batch of the search')
_LIMIT = flags.DEFINE_integer('max_batch_per_device', 1 << 16, 'the search stops here')
_COMPILES = flags.DEFINE_integer('max_compiles', 5, 'compiles per row of the search (each takes 10-60 s)')
_JSON = flags.DEFINE_string('json', None, 'also write the rows to this file')
flags.mark_flags_as_required(['config'])

_HEADER = (f"{'strategy':8} {'remat':13} {'mesh':16} {'params':>7} {'opt':>7} {'fixed':>7} {'MiB/smp':>8} "
           f"{'batch/dev':>9} {'global':>8} {'temp':>7} {'total':>7} {'fits':>4} {'compiles':>8}")


def _gib(n: float) -> str:
  return f'{n / 2**30:7.2f}'


def plan_row(config, mesh_config: dict, strategy: str, remat: str, *, budget: int, batch_per_device: int = 0,
             start: int = 16, limit: int = 1 << 16, max_compiles: int = 5) -> dict:
  """One strategy x remat: the estimate at the planned batch, and the line fitted through the compiles."""
  import jax

  from eva_clip_jax.training import memory
  from eva_clip_jax.training import sharding as sharding_lib
  config = copy.deepcopy(config)
  config.sharding.strategy, config.model.remat = strategy, remat
  mesh_config = memory.strategy_mesh(mesh_config, strategy)
  devices = math.prod(mesh_config.values())
  mesh = sharding_lib.make_mesh(mesh_config, devices=jax.devices()[:devices])
  estimates: dict[int, memory.MemoryEstimate] = {}

  def measure(batch: int) -> int:
    estimates[batch] = memory.compile_train_step(config, mesh, batch)[1]
    return estimates[batch].total

  if batch_per_device:
    measure(batch_per_device)
    chosen = batch_per_device
  else:
    chosen, _ = memory.largest_batch(measure, budget, start=start, limit=limit, max_measurements=max_compiles)
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
          'fixed': fixed, 'compiles': len(estimates), 'measured': {b: e.total for b, e in sorted(estimates.items())},
          'compile_seconds': sum(e.compile_seconds for e in estimates.values())}


def format_row(row: dict) -> str:
  per_sample = f"{row['per_sample'] / 2**20:8.1f}" if row['per_sample'] is not None else f"{'-':>8}"
  fixed = _gib(row['fixed']) if row['fixed'] is not None else f"{'-':>7}"
  batch = row['batch_per_device'] if row['largest'] is None or row['largest'] else 0  # not one sample fits
  return (f"{row['strategy']:8} {row['remat']:13} {row['mesh']:16} {_gib(row['params'])} {_gib(row['opt_state'])} "
          f"{fixed} {per_sample} {batch!s:>9} {row['global_batch']:8d} {_gib(row['temp'])} {_gib(row['total'])} "
          f"{'yes' if row['fits'] else 'no':>4} {row['compiles']:3d} ({row['compile_seconds']:3.0f}s)")


def main(argv):
  del argv
  import jax

  from eva_clip_jax.training import memory
  mesh_config = memory.parse_mesh(_MESH.value)
  # XLA:CPU devices stand in for the accelerators: a fresh process makes as many as the mesh names.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', math.prod(mesh_config.values()))
  from eva_clip_jax.models import count_params, create_model

  config = _CONFIG.value
  budget = int(_MEMORY.value * _FRACTION.value * memory.GIB)
  params = count_params(create_model(config.model.name, abstract=True))
  print(f'{config.model.name}: {params / 1e6:.0f}M parameters, {config.model.dtype} compute, '
        f'{config.model.param_dtype} parameters, attention {config.model.attention}, '
        f'patch dropout {config.model.patch_dropout}, optimizer {config.optimizer.name}')
  print(f'mesh {memory.format_mesh(mesh_config)}; budget {_MEMORY.value:g} GiB x {_FRACTION.value:g} = '
        f'{budget / memory.GIB:.1f} GiB per device; compiled for XLA:CPU by JAX {jax.__version__} '
        f'(GiB per device; fixed + MiB/smp x batch = total)')
  print(_HEADER, flush=True)
  rows = []
  for strategy in _STRATEGIES.value:
    for remat in _REMAT.value:
      row = plan_row(config, mesh_config, strategy, remat, budget=budget, batch_per_device=_BATCH.value,
                     start=_START.value, limit=_LIMIT.value, max_compiles=_COMPILES.value)
      rows.append(row)
      print(format_row(row), flush=True)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)

r"""Plans per-device memory for a topology this machine does not have: the train step is compiled ahead of time, from
abstract inputs (nothing is allocated), by the target's own compiler. This file holds the flags and the printing; the
planning itself (targets, compile, estimate, batch search) is the flag-free eva_clip_jax/training/planning.py.

  python -m eva_clip_jax.plan --config=configs/b16.py --target=tpu --topology=v5p:4x4x4
  python -m eva_clip_jax.plan --config=configs/b16.py --target=gpu --gpu=h100 --topology=1x8x8
  python -m eva_clip_jax.plan --config=configs/e14.py --target=tpu --topology=v5p:8x4x4 --mesh=data:8,fsdp:16
  python -m eva_clip_jax.plan --config=configs/l14.py --target=cpu --mesh=data:64 --device_memory_gb=80

--target=tpu: the TPU compiler (libtpu, from jax[tpu]) for a slice GENERATION:CHIPS (v4, v5e, v5p, v6e; HBM per
chip from planning.TPU_HBM_GIB). --target=gpu: XLA's GPU compiler without a GPU (jax-cuda12-plugin), for --gpu
(h100, h200, a100: XLA device descriptions in eva_clip_jax/assets/gpu_targets) on HOSTSxSLICESxGPUS. --target=cpu:
XLA:CPU devices, the fallback when neither package is installed (`pip install -r requirements-accel.txt`); its
buffers overstate an accelerator's (launch/README.md). For each strategy x remat policy: parameter and optimizer-state
bytes per device, the step's fixed bytes and bytes per sample, and the largest per-device batch within the device's
memory x --usable_fraction (a few compiles, each of a multiple of config.accum_steps; --batch_per_device compiles one
size instead). fsdp rows move the data
axis onto 'fsdp' when the mesh has none.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from eva_clip_jax import cli, storage

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file', lock_config=False)
_TARGET = flags.DEFINE_enum('target', 'cpu', ['tpu', 'gpu', 'cpu'], 'whose compiler: the TPU, GPU or CPU one')
_TOPOLOGY = flags.DEFINE_string('topology', '', "tpu: 'v5p:4x4x4' (chips); gpu: hosts x slices x GPUs, '1x8x8'")
_GPU = flags.DEFINE_enum('gpu', 'h100', ['h100', 'h200', 'a100'], 'the GPU of --target=gpu')
_MESH = flags.DEFINE_string('mesh', '', "devices by mesh axis: 'data:64' or 'data:8,fsdp:8' (default: all devices "
                            "on 'data'; --target=cpu: data:8)")
_MEMORY = flags.DEFINE_float('device_memory_gb', 0.0, "memory per device in GiB (0: the target's; CPU: 80)")
_FRACTION = flags.DEFINE_float('usable_fraction', 0.9, 'share of it the step may use (GPU: '
                               'XLA_PYTHON_CLIENT_MEM_FRACTION; the rest is runtime and fragmentation headroom)')
_STRATEGIES = flags.DEFINE_list('strategies', ['dp', 'zero1', 'fsdp'], 'sharding strategies to plan')
_REMAT = flags.DEFINE_list('remat', ['none', 'full'], 'remat policies to plan')
_BATCH = flags.DEFINE_integer('batch_per_device', 0, 'compile this per-device batch only (0: search the largest)')
_START = flags.DEFINE_integer('start_batch', 16, 'first per-device batch of the search')
_LIMIT = flags.DEFINE_integer('max_batch_per_device', 1 << 16, 'the search stops here')
_COMPILES = flags.DEFINE_integer('max_compiles', 5, 'compiles per row of the search (each takes 10-60 s)')
_JSON = flags.DEFINE_string('json', None, 'also write the rows to this file')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'encode'], "train: the train step; encode: zero-shot inference "
                          "(the image tower's forward; pass --config.model.param_dtype=bfloat16 for bf16 weights)")
flags.mark_flags_as_required(['config'])

def _reexec_with_gpu_flags() -> None:
  """XLA reads XLA_FLAGS once, when the process starts its first backend: set the GPU flag and start again."""
  from eva_clip_jax.training import planning
  if planning.GPU_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {planning.GPU_XLA_FLAGS}".strip()
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.execv(sys.executable, [sys.executable, '-m', 'eva_clip_jax.plan', *sys.argv[1:]])


def main(argv):
  del argv
  if _TARGET.value == 'gpu':
    _reexec_with_gpu_flags()
  import jax

  from eva_clip_jax.training import planning
  from eva_clip_jax.sharding import format_mesh, parse_mesh
  mesh_text = _MESH.value or ('data:8' if _TARGET.value == 'cpu' else '')
  # The host runs on XLA:CPU: accelerator targets are compiled for, never initialised (no TPU or GPU is needed).
  jax.config.update('jax_platforms', 'cpu')
  if _TARGET.value == 'cpu':  # XLA:CPU devices stand in for the accelerators: as many as the mesh names
    jax.config.update('jax_num_cpu_devices', math.prod(parse_mesh(mesh_text).values()))
  target = planning.target_devices(_TARGET.value, _TOPOLOGY.value, _GPU.value)
  mesh_config = parse_mesh(mesh_text or f'data:{len(target.devices)}')
  if math.prod(mesh_config.values()) != len(target.devices):
    raise app.UsageError(f'--mesh={format_mesh(mesh_config)} names {math.prod(mesh_config.values())} '
                         f'devices; {target.name} has {len(target.devices)}')
  from eva_clip_jax.models import count_params, create_model

  config = _CONFIG.value
  memory_gib = _MEMORY.value or (target.memory_bytes / planning.GIB if target.memory_bytes else 80.0)
  budget = int(memory_gib * _FRACTION.value * planning.GIB)
  params = count_params(create_model(config.model.name, abstract=True))
  compiler = {'tpu': f'the TPU compiler (libtpu) for {target.name}, {target.devices[0].device_kind}',
              'gpu': f'XLA:GPU without a GPU for {target.name}, {target.devices[0].device_kind} (no autotuning)',
              'cpu': 'XLA:CPU, the fallback: CPU buffers overstate an accelerator\'s (launch/README.md)'}[target.kind]
  print(f'{_MODE.value}: {config.model.name}: {params / 1e6:.0f}M parameters, {config.model.dtype} compute, '
        f'{config.model.param_dtype} parameters, attention {config.model.attention}, '
        f'patch dropout {config.model.patch_dropout}, optimizer {config.optimizer.name}')
  print(f'mesh {format_mesh(mesh_config)}; budget {memory_gib:g} GiB x {_FRACTION.value:g} = '
        f'{budget / planning.GIB:.1f} GiB per device; compiled by {compiler}, JAX {jax.__version__} '
        f'(GiB per device; fixed + MiB/smp x batch = total)')
  print(planning.HEADER, flush=True)
  rows = []
  for strategy in _STRATEGIES.value:
    for remat in _REMAT.value:
      row = planning.plan_row(config, mesh_config, strategy, remat, budget=budget, batch_per_device=_BATCH.value,
                              start=_START.value, limit=_LIMIT.value, max_compiles=_COMPILES.value,
                              devices=target.devices, mode=_MODE.value)
      row['target'] = target.name
      rows.append(row)
      print(planning.format_row(row), flush=True)
  if _JSON.value:
    storage.write_text(_JSON.value, json.dumps(rows, indent=1))


if __name__ == '__main__':
  cli.run(main)

r"""Trains EVA-CLIP from a config; starting again with the same workdir resumes.

  python -m eva_clip_jax.train --config=configs/l14.py --workdir=/ckpt/l14 \
      --config.batch_size=32768 --config.data.sources="(('/data/laion/{00000..99999}.tar', 1.0),)"
  python -m eva_clip_jax.train --config=configs/tiny.py --workdir=/tmp/tiny      # the bundled demo set
  python -m eva_clip_jax.train --config=configs/b16.py:runlocal --workdir=/tmp/b16  # a few steps on a laptop

Multi-host: JAX's distributed runtime is initialised from --coordinator_address/--num_processes/--process_id when
given, and detected automatically on TPU pods and under SLURM (see launch/).
"""

from __future__ import annotations

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from eva_clip_jax import accelerator, cli, storage

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file ([:runlocal])', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'checkpoints, TensorBoard events and results go here')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes (multi-process runs)')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process (multi-process runs)')
_NUM_CPU_DEVICES = flags.DEFINE_integer('num_cpu_devices', None, 'fake CPU devices per process (testing)')
flags.mark_flags_as_required(['config', 'workdir'])


def _cluster_detected() -> bool:
  env = os.environ
  slurm = int(env.get('SLURM_NTASKS', '1')) > 1
  tpu_pod = ',' in env.get('TPU_WORKER_HOSTNAMES', '') or 'MEGASCALE_COORDINATOR_ADDRESS' in env
  return slurm or tpu_pod


def initialize_distributed() -> None:
  import jax
  if _NUM_CPU_DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _NUM_CPU_DEVICES.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _cluster_detected():
    jax.distributed.initialize()  # reads SLURM's / the TPU metadata's variables


def main(argv):
  del argv
  initialize_distributed()
  accelerator.require_accelerator_in_use()  # before anything is built: a GPU host with CPU-only JAX stops here
  import jax

  from eva_clip_jax.models import get_model_spec
  from eva_clip_jax.training.loop import train_and_evaluate
  config, workdir = _CONFIG.value, _WORKDIR.value
  get_model_spec(config.model.name)  # an unknown name fails here, in one line, before anything is built
  logging.info('JAX %s: process %d of %d, %d devices (%d local)', jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count())
  _, metrics = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    storage.write_text(storage.join(workdir, 'final_metrics.json'), json.dumps(final, indent=1, sort_keys=True))
    shown = {k: v for k, v in final.items() if k in ('step', 'loss') or '/top' in k or '/image_retrieval' in k
             or '/text_retrieval' in k}
    print('final: ' + ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                for k, v in sorted(shown.items())))


if __name__ == '__main__':
  cli.run(main)

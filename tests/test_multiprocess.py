"""Two processes x 4 CPU devices through jax.distributed train exactly like one process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from eva_clip_jax.training.checkpoint import read_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, devices, *extra):
  return [sys.executable, '-m', 'eva_clip_jax.train', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--num_cpu_devices={devices}', '--config.total_steps=2', '--config.batch_size=16',
          '--config.log_every_steps=1', '--config.data.synthetic=True', '--config.evals={}', *extra]


def _env():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return env


def _result(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    metrics = json.load(f)
  return metrics, read_state(os.path.join(workdir, 'checkpoints', '2'))


def test_two_processes_equal_one(tmp_path):
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  port = _free_port()
  procs = [subprocess.Popen(_command(multi, 4, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                                     f'--process_id={i}'), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  outputs = [p.communicate(timeout=900)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'process 1 of 2, 8 devices (4 local)' in outputs[1]
  subprocess.run(_command(single, 8), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)

  (metrics_single, state_single), (metrics_multi, state_multi) = _result(single), _result(multi)
  assert metrics_multi['step'] == metrics_single['step'] == 2
  np.testing.assert_allclose(metrics_multi['loss'], metrics_single['loss'], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state_multi['params']), jax.tree.leaves(state_single['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # The moments hold the gradients, whose all-reduce sums in a different order over 2x4 than over 1x8:
  # compare to float32 precision relative to each tensor's scale.
  for a, b in zip(jax.tree.leaves(state_multi['opt_state']), jax.tree.leaves(state_single['opt_state'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))

"""An interrupted run resumes where it stopped, whatever stopped it.

The trainer runs as `python -m eva_clip_jax.train` on the demo shards with two grain worker processes and
asynchronous checkpoints every step. Faults come from outside the product: SIGKILL of the trainer process alone (as
the kernel's OOM killer does it) at random moments, a truncated array file in the latest checkpoint, SIGTERM.
Each time the final state must be bit-identical to an uninterrupted run, and no process of a killed run may live on.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from eva_clip_jax.data import demo
from eva_clip_jax.training.checkpoint import read_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 8


def _command(workdir, data_root, total=TOTAL):
  return [sys.executable, '-m', 'eva_clip_jax.train', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.total_steps={total}', '--config.batch_size=16', '--config.log_every_steps=2',
          '--config.checkpoint.every_steps=1', f"--config.data.sources=(('{data_root}/train', 1.0),)",
          '--config.data.shuffle_buffer=32', '--config.data.num_workers=2', '--config.evals={}']


def _env():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return env


def _steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _final_state(workdir):
  return read_state(os.path.join(workdir, 'checkpoints', str(TOTAL)))


def _assert_identical(expected, got):
  assert int(got['step']) == TOTAL
  for name in ('params', 'opt_state', 'loss_scale', 'rng', 'step'):
    leaves_a, leaves_b = jax.tree.leaves(expected[name]), jax.tree.leaves(got[name])
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _descendants(pid):
  """Every live process below `pid` (the grain workers, their forkserver), from /proc."""
  children = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          ppid = int(f.read().rsplit(')', 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      children.setdefault(ppid, []).append(int(entry))
  found, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.append(child)
      todo.append(child)
  return found


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo') / 'demo_data'
  demo.write_demo_set(str(root), num_train=192, num_val=16, samples_per_shard=32)
  return str(root)


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_root):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  result = subprocess.run(_command(workdir, data_root), cwd=ROOT, env=_env(), check=True, capture_output=True,
                          timeout=900)
  assert b'leaked shared_memory' not in result.stderr  # every shared-memory batch block was released
  return workdir


def test_sigkill_at_random_moments_resumes_bit_identical_and_leaves_no_process(tmp_path, data_root, straight):
  """Three SIGKILLs of the trainer alone: one during start-up, two just after a checkpoint appeared (mid-step or
  mid-save, as chance has it); then a run to the end."""
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  workdir = str(tmp_path / 'interrupted')
  killed_pids = []
  for kill in range(3):
    before = _steps(workdir)
    proc = subprocess.Popen(_command(workdir, data_root), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 600
    if kill == 0:  # start-up: imports, data workers starting, compiling
      time.sleep(rng.uniform(3.0, 8.0))
    else:  # after the first new checkpoint, a random fraction of a step or save later
      while proc.poll() is None and time.time() < deadline and not set(_steps(workdir)) - set(before):
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 0.6))
    if proc.poll() is not None:  # it finished first: nothing to kill this round
      assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
      continue
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_pids += workers
  deadline = time.time() + 15  # the workers notice their trainer is gone within a second or two
  while any(_alive(p) for p in killed_pids) and time.time() < deadline:
    time.sleep(0.2)
  assert not [p for p in killed_pids if _alive(p)], f'processes of killed runs still alive (seed {seed})'

  result = subprocess.run(_command(workdir, data_root), cwd=ROOT, env=_env(), capture_output=True, timeout=900)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  _assert_identical(_final_state(straight), _final_state(workdir))


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_finishes(tmp_path, data_root, straight):
  """A truncated array file in the latest step: the restart says which step it set aside, resumes from the one
  before and ends in the uninterrupted run's state."""
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(straight, workdir)
  expected = _final_state(straight)
  step_dir = os.path.join(workdir, 'checkpoints', str(TOTAL))
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, 'state')) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)

  result = subprocess.run(_command(workdir, data_root), cwd=ROOT, env=_env(), capture_output=True, timeout=900)
  stderr = result.stderr.decode()
  assert result.returncode == 0, stderr[-3000:]
  assert f'Checkpoint step {TOTAL} cannot be restored' in stderr
  assert f'Resumed from step {TOTAL - 1}' in stderr
  assert 'Traceback' not in stderr
  aside = [d for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.startswith(f'damaged.{TOTAL}.')]
  assert len(aside) == 1
  _assert_identical(expected, _final_state(workdir))


def test_sigterm_saves_and_stops_cleanly(tmp_path, data_root):
  """A preemption notice (SIGTERM) makes the run save at the next log step and exit 0; it then resumes there."""
  workdir = str(tmp_path / 'preempted')
  command = _command(workdir, data_root, total=100000)
  command[command.index('--config.checkpoint.every_steps=1')] = '--config.checkpoint.every_steps=100000'
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 900
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr.decode()[-3000:]
  assert 'after a preemption notice' in stderr.decode()
  saved = max(_steps(workdir))
  assert saved >= 2 and saved % 2 == 0  # a log step (every 2)
  assert int(read_state(os.path.join(workdir, 'checkpoints', str(saved)))['step']) == saved

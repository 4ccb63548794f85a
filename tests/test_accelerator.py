"""A GPU or TPU the system shows but JAX does not use stops the trainer and the evaluators in one line, unless the
user asked for the CPU. The device files and nvidia-smi are faked in a temporary folder."""

import os
import pathlib
import subprocess
import sys

import pytest

from eva_clip_jax import accelerator

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fake_nvidia_smi(folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  tool = folder / 'nvidia-smi'
  tool.write_text('#!/bin/sh\nexit 9\n')  # found on PATH is the evidence; it is never run
  tool.chmod(0o755)
  return folder


def _dev(tmp_path: pathlib.Path, *files: str) -> pathlib.Path:
  dev = tmp_path / 'dev'
  dev.mkdir(parents=True)
  for name in files:
    (dev / name).parent.mkdir(parents=True, exist_ok=True)
    (dev / name).touch()
  return dev


def test_nothing_visible_on_a_plain_host(tmp_path):
  dev = _dev(tmp_path, 'null', 'vfio/vfio')  # the VFIO driver's control file alone is no TPU
  assert accelerator.visible_accelerators(dev, path=str(tmp_path / 'bin')) == {}
  assert accelerator.visible_accelerators(tmp_path / 'missing', path='') == {}


def test_gpu_seen_by_device_files_or_nvidia_smi(tmp_path):
  dev = _dev(tmp_path, 'nvidia0', 'nvidiactl')
  assert accelerator.visible_accelerators(dev, path='') == {'gpu': [f'{dev}/nvidia0', f'{dev}/nvidiactl']}
  bin_dir = _fake_nvidia_smi(tmp_path / 'bin')
  empty = _dev(tmp_path / 'other')
  assert accelerator.visible_accelerators(empty, path=f'/nonexistent:{bin_dir}') == {'gpu': [f'{bin_dir}/nvidia-smi']}


@pytest.mark.parametrize('files', [('accel0', 'accel1'), ('vfio/vfio', 'vfio/0')])
def test_tpu_seen_by_accel_or_vfio_groups(tmp_path, files):
  dev = _dev(tmp_path, *files)
  visible = accelerator.visible_accelerators(dev, path='')
  assert list(visible) == ['tpu'] and all('vfio/vfio' not in e for e in visible['tpu']) and visible['tpu'], visible


def test_message_only_when_an_accelerator_would_sit_idle():
  gpu = {'gpu': ['/dev/nvidia0']}
  message = accelerator.unused_accelerator_message('cpu', None, gpu)
  assert message.startswith('this host has a GPU (/dev/nvidia0) but JAX runs on the CPU only')
  assert 'pip install "jax[cuda12]==0.10.2"' in message and 'JAX_PLATFORMS=cpu' in message and '\n' not in message
  assert 'pip install "jax[tpu]==0.10.2"' in accelerator.unused_accelerator_message('cpu', '', {'tpu': ['/dev/accel0']})
  assert accelerator.unused_accelerator_message('cpu', 'cpu', gpu) is None  # the user asked for the CPU
  assert accelerator.unused_accelerator_message('cpu', 'cuda,cpu', gpu) is not None  # CPU only as a fallback
  assert accelerator.unused_accelerator_message('gpu', None, gpu) is None
  assert accelerator.unused_accelerator_message('cpu', None, {}) is None
  # The plugin is there but did not start (a driver too old for it, say): no reinstall advice.
  failed = accelerator.unused_accelerator_message('cpu', None, gpu, {'gpu': 'jax-cuda12-plugin'})
  assert 'jax-cuda12-plugin is installed but did not start' in failed and 'pip install' not in failed


def test_the_requirement_follows_jax_platforms(tmp_path):
  import jax
  dev = _dev(tmp_path, 'nvidia0')
  assert jax.config.jax_platforms == 'cpu'  # conftest.py: the tests ask for the CPU, so they pass the check
  accelerator.require_accelerator_in_use(dev, path='')
  jax.config.update('jax_platforms', None)  # the backend stays the CPU; only the request is gone
  try:
    with pytest.raises(accelerator.AcceleratorUnused, match='has a GPU'):
      accelerator.require_accelerator_in_use(dev, path='')
  finally:
    jax.config.update('jax_platforms', 'cpu')


@pytest.mark.parametrize('entry_point', ['eva_clip_jax.train', 'eva_clip_jax.evaluate'])
def test_entry_points_stop_in_one_line_on_a_gpu_host_with_cpu_only_jax(tmp_path, entry_point):
  """nvidia-smi on PATH (faked), JAX_PLATFORMS unset: the CLI ends with `error: ...` and status 2 before building
  anything."""
  bin_dir = _fake_nvidia_smi(tmp_path / 'bin')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env.update(PATH=f'{bin_dir}:/usr/bin:/bin', PYTHONPATH=str(ROOT))
  command = [sys.executable, '-m', entry_point, f'--config={ROOT}/configs/tiny.py']
  command += [f'--workdir={tmp_path}/work'] if entry_point.endswith('train') else [f'--output={tmp_path}/r.json']
  proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: this host has a GPU ({bin_dir}/nvidia-smi) but JAX runs on the CPU only: ')
  # CI installs the CUDA plugin (requirements-accel.txt), which fails to start here; without it, the install.
  cuda = accelerator.installed_plugins().get('gpu')
  assert (f'{cuda} is installed but did not start' if cuda else 'jax[cuda12]==0.10.2') in last, last
  assert 'AcceleratorUnused' not in proc.stderr  # one line, no traceback of it

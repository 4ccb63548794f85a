"""benchmarks/gpu_check.py --dry-run: the one-shot GPU check's code path on CPU with the tiny model, so that the
script a GPU session runs first cannot rot between the sessions that have a GPU."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  # No budget cut here: a loaded CI machine must not turn a slow section into a skipped one.
  command = [sys.executable, 'benchmarks/gpu_check.py', '--dry-run', '--budget_s=3600', f'--out={tmp_path}']
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / 'gpu_check.json').read_text())
  sections = report['sections']
  assert set(sections) == {'kernels', 'attention', 'train', 'torch'} and not report['skipped_sections']
  assert sections['kernels']['returncode'] == 0, sections['kernels']
  rows = sections['attention']['rows']
  timed = [r for r in rows if 'ms' in r]
  assert {(r['backend'], r['pass']) for r in timed} == {(b, p) for b in ('xla', 'pallas_flash') for p in ('fwd', 'fwd+bwd')}
  assert all(r['err_vs_xla'] < 1e-5 for r in timed if r['backend'] == 'pallas_flash'), rows  # the kernel, interpreted
  assert [r for r in rows if r['backend'] == 'cudnn'] == [{'case': 'tiny', 'backend': 'cudnn',
                                                           'skipped': 'cuDNN needs an NVIDIA GPU'}]
  assert [r for r in rows if r['backend'] == 'mosaic'] == [{'case': 'tiny', 'backend': 'mosaic',
                                                            'skipped': 'Mosaic GPU needs a Hopper or Blackwell GPU'}]
  train, mosaic = sections['train']['rows']
  assert train['attention'] == 'auto' and mosaic['attention'] == 'mosaic', sections['train']
  assert train['samples_per_s'] > 0 and train['memory_bytes'] > 0 and 0 < train['mfu'] < 1, train
  assert mosaic['skipped'] == 'Mosaic GPU needs a Hopper or Blackwell GPU', mosaic
  torch_section = sections['torch']
  assert 'skipped' in torch_section or torch_section['rows'][0]['samples_per_s'] > 0, torch_section
  table = (tmp_path / 'gpu_check.md').read_text()
  assert '| train step | tiny | jax' in table and '| attention fwd+bwd | tiny | pallas_flash |' in table
  assert '| train step | tiny | jax (mosaic) | 50% | 8 | | | | | skipped: Mosaic GPU needs' in table

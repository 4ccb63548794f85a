"""benchmarks/gpu_check.py --dry-run: the one-shot GPU check's code path on CPU with the tiny model, so that the
script a GPU session runs first cannot rot between the sessions that have a GPU; run with only the GPU machine's
packages importable (its image's, tests/data/gpu_image_packages.txt, and the wheels carried to it,
benchmarks/gpu_wheels.txt), as it will run there."""

import importlib.metadata
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE = ROOT / 'tests' / 'data' / 'gpu_image_packages.txt'
WHEELS = ROOT / 'benchmarks' / 'gpu_wheels.txt'
MISSING_MODULE = re.compile(r'ModuleNotFoundError|No module named|not installed|None in sys\.modules')


def _gpu_image_env(wheel_list: pathlib.Path = WHEELS) -> dict:
  """This interpreter as the GPU machine's: tests/gpu_image/sitecustomize.py hides, in this process and every Python
  process it starts, each installed module that is neither on the image nor in `wheel_list`."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'GPU_IMAGE_WHEEL_LIST': str(wheel_list),
          'PYTHONPATH': os.pathsep.join([str(ROOT / 'tests' / 'gpu_image'), str(ROOT)])}


def _names(path: pathlib.Path) -> set[str]:
  lines = (line.split('#')[0].strip() for line in path.read_text().splitlines())
  return {re.sub(r'[-_.]+', '-', line.split('==')[0]).lower() for line in lines if line}


def test_gpu_check_dry_run_on_the_gpu_machines_packages(tmp_path):
  # No budget cut here: a loaded CI machine must not turn a slow section into a skipped one.
  command = [sys.executable, 'benchmarks/gpu_check.py', '--dry-run', '--budget_s=3600', f'--out={tmp_path}']
  proc = subprocess.run(command, cwd=ROOT, env=_gpu_image_env(), capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / 'gpu_check.json').read_text())
  sections = report['sections']
  assert set(sections) == {'kernels', 'attention', 'train', 'torch'} and not report['skipped_sections']
  assert report['running'] is None and not any('error' in s for s in sections.values()), sections
  assert not MISSING_MODULE.search(json.dumps(report)), report  # every row ran, or was skipped for another reason
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
  (torch_row,) = sections['torch']['rows']  # open_clip's step, from the carried wheel
  assert torch_row['samples_per_s'] > 0 and torch_row['framework'] == 'torch', torch_row
  assert report['environment']['ml_collections'] == '1.1.0' and report['environment']['open_clip'] == '3.3.0'
  table = (tmp_path / 'gpu_check.md').read_text()
  assert table.startswith('# gpu_check (dry run, CPU, tiny model)\n'), table  # finished: no 'partial'
  assert '| train step | tiny | jax' in table and '| attention fwd+bwd | tiny | pallas_flash |' in table
  assert '| train step | tiny | jax (mosaic) | 50% | 8 | | | | | skipped: Mosaic GPU needs' in table


def test_without_the_wheels_the_train_rows_say_what_to_carry(tmp_path):
  """The image alone (no carried wheels) lacks ml_collections and open_clip: both train sections are skipped with
  the reason and the remedy, not failed with a traceback (the issue's 'failed: ... import ml_collections')."""
  empty = tmp_path / 'no_wheels.txt'
  empty.write_text('')
  command = [sys.executable, 'benchmarks/gpu_check.py', '--dry-run', '--sections=train,torch', f'--out={tmp_path}']
  proc = subprocess.run(command, cwd=ROOT, env=_gpu_image_env(empty), capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sections = json.loads((tmp_path / 'gpu_check.json').read_text())['sections']
  assert sections['train']['skipped'].startswith('not installed: ml_collections (')
  assert sections['torch']['skipped'].startswith('not installed: open_clip ('), sections['torch']
  assert all('benchmarks/gpu_wheels.py' in s['skipped'] and s['rows'] == [] for s in sections.values())


def test_a_killed_check_keeps_the_rows_before_it(tmp_path):
  """The device tool kills a command at its time limit: the rows done by then are on disk, the title says so."""
  command = [sys.executable, 'benchmarks/gpu_check.py', '--dry-run', '--sections=attention,train', f'--out={tmp_path}']
  proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  report, deadline = {}, time.monotonic() + 300
  try:
    while report.get('running') != 'train' and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
      path = tmp_path / 'gpu_check.json'
      report = json.loads(path.read_text()) if path.exists() else {}  # replaced whole: never half-written
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the check and its train-step worker, mid-row
    proc.wait()
  assert report.get('running') == 'train', report
  report = json.loads((tmp_path / 'gpu_check.json').read_text())
  assert len([r for r in report['sections']['attention']['rows'] if 'ms' in r]) == 4, report
  table = (tmp_path / 'gpu_check.md').read_text()
  assert table.startswith("# gpu_check (dry run, CPU, tiny model) (partial: written while section 'train' ran)")
  assert '| attention fwd+bwd | tiny | pallas_flash |' in table


def test_the_import_hook_hides_what_the_image_lacks(tmp_path):
  """The hook the tests above rely on: grain (not on the image) cannot be imported or found, a carried wheel's
  module (ml_collections) can, and without the wheels the recipe fails as on the GPU machine."""
  probe = '''
import importlib.metadata, importlib.util
try:
  import grain
  print('grain imported')
except ModuleNotFoundError:
  pass
assert importlib.util.find_spec('clu') is None
try:
  importlib.metadata.version('tensorflow-cpu')
  print('tensorflow metadata found')
except importlib.metadata.PackageNotFoundError:
  pass
import jax, flax, optax, orbax.checkpoint, absl  # on the image
import eva_clip_jax.recipe
print('recipe imported')
'''
  with_wheels = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=_gpu_image_env(), capture_output=True,
                               text=True, timeout=120, check=False)
  assert with_wheels.returncode == 0 and with_wheels.stdout.strip() == 'recipe imported', with_wheels
  empty = tmp_path / 'no_wheels.txt'
  empty.write_text('')
  image_only = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=_gpu_image_env(empty),
                              capture_output=True, text=True, timeout=120, check=False)
  assert image_only.returncode == 1 and "import of ml_collections halted" in image_only.stderr, image_only


def test_wheel_list_is_pinned_as_ci_tests_it_and_complete():
  """`gpu_wheels.py --list` (what CI can run without a download) prints the pins; each agrees with
  requirements*.txt where those name it; and every dependency of a carried wheel is on the image or carried."""
  listed = subprocess.run([sys.executable, 'benchmarks/gpu_wheels.py', '--list'], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True).stdout.split()
  assert listed and all(re.fullmatch(r'[\w.-]+==[\w.]+', pin) for pin in listed), listed
  required = {}
  for path in ROOT.glob('requirements*.txt'):
    for line in path.read_text().splitlines():
      name, _, version = line.split('#')[0].strip().partition('==')
      if version:
        required[re.sub(r'[-_.]+', '-', name).lower()] = version.strip()
  available = _names(IMAGE) | _names(WHEELS)
  for pin in listed:
    name, version = pin.split('==')
    key = re.sub(r'[-_.]+', '-', name).lower()
    assert required.get(key, version) == version, f'{pin} differs from requirements: {required[key]}'
    for requirement in map(Requirement, importlib.metadata.requires(name) or []):
      applies = requirement.marker is None or requirement.marker.evaluate({'extra': '', 'python_version': '3.12'})
      assert not applies or re.sub(r'[-_.]+', '-', requirement.name).lower() in available, (pin, str(requirement))


def test_jax_gpu_deprecations_are_ignored_in_the_checks_processes():
  """jax 0.11 warns at every Pallas Triton lowering; with warnings as errors (the user's PYTHONWARNINGS=error) the
  check's workers still ignore exactly those warnings, and still fail on any other."""
  script = ('import json, sys; sys.argv = ["gpu_check"]; sys.path.insert(0, "benchmarks"); import gpu_check; '
            'print(json.dumps([gpu_check._env(True)["PYTHONWARNINGS"], gpu_check.JAX_GPU_DEPRECATIONS]))')
  env = {**os.environ, 'PYTHONWARNINGS': 'error'}
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                       check=True).stdout
  warning_env, messages = json.loads(out)
  assert warning_env.startswith('error,') and len(messages) == 4
  warn = 'import sys, warnings; warnings.warn(sys.argv[1], DeprecationWarning)'
  for message in messages:
    full = message + ' and will be removed in a future JAX version.'
    ignored = subprocess.run([sys.executable, '-c', warn, full], env={**os.environ, 'PYTHONWARNINGS': warning_env},
                             capture_output=True, text=True, timeout=60, check=False)
    assert ignored.returncode == 0 and not ignored.stderr, ignored
  other = subprocess.run([sys.executable, '-c', warn, 'something else is deprecated'],
                         env={**os.environ, 'PYTHONWARNINGS': warning_env}, capture_output=True, text=True,
                         timeout=60, check=False)
  assert other.returncode == 1 and 'DeprecationWarning: something else' in other.stderr

"""The architecture's boundaries: models need only jax and flax; torch stays inside conversion/; a config loads without
the checkpoint, conversion or data machinery; models reach attention only through the seam."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

_BLOCKED_IMPORT = '''
import sys
for name in ('torch', 'timm', 'open_clip', 'grain', 'PIL', 'ftfy', 'regex', 'orbax', 'tensorflow',
             'tensorflow_datasets', 'ml_collections'):  # optax is a dependency of flax itself
  sys.modules[name] = None  # any import of these now fails
import eva_clip_jax as ec
model = ec.create_model('tiny', abstract=True)
print(ec.param_counts(model)['total'])
'''


def test_models_import_and_build_with_only_jax_and_flax():
  out = subprocess.run([sys.executable, '-c', _BLOCKED_IMPORT], capture_output=True, text=True, cwd=ROOT,
                       env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert out.returncode == 0, out.stderr[-1500:]
  assert int(out.stdout.strip()) > 3_000_000


def test_only_conversion_imports_torch():
  """No file of the package outside conversion/ mentions a torch import; benchmarks live in benchmarks/."""
  offenders = []
  for path in (ROOT / 'eva_clip_jax').rglob('*.py'):
    text = path.read_text()
    if ('import torch' in text or 'from torch' in text) and 'conversion' not in path.relative_to(ROOT).parts:
      offenders.append(str(path.relative_to(ROOT)))
  assert offenders == []


def test_models_reach_attention_only_through_the_seam():
  """A model imports `eva_clip_jax.ops` (its public names) or the seam `ops.attention`, never a backend's module:
  the seam chooses the kernel, so a new backend needs no model change."""
  seam = {'eva_clip_jax.ops', 'eva_clip_jax.ops.attention'}
  modules = {p.stem for p in (ROOT / 'eva_clip_jax' / 'ops').iterdir()}  # ops' submodules and packages
  offenders = []
  for path in (ROOT / 'eva_clip_jax' / 'models').rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == 'eva_clip_jax.ops':  # a module by name is a backend's
        names = [f'eva_clip_jax.ops.{a.name}' for a in node.names if a.name in modules]
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('eva_clip_jax.ops'):
        names = [node.module]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.startswith('eva_clip_jax.ops')]
      else:
        continue
      offenders += [f'{path.name}: {name}' for name in names if name not in seam]
  assert offenders == []


_LOAD_CONFIGS = '''
import importlib.util, pathlib, sys
for path in sorted(pathlib.Path('configs').glob('*.py')):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.get_config()
  module.get_config('runlocal')
heavy = ('orbax', 'eva_clip_jax.conversion', 'eva_clip_jax.data', 'torch', 'tensorflow', 'grain', 'PIL')
print(sorted({m.split('.')[0] if not m.startswith('eva_clip_jax') else m for m in sys.modules
              if m.startswith(heavy)}))
'''


def test_loading_a_config_imports_no_checkpoint_conversion_or_data_code():
  out = subprocess.run([sys.executable, '-c', _LOAD_CONFIGS], capture_output=True, text=True, cwd=ROOT,
                       env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert out.returncode == 0, out.stderr[-1500:]
  assert out.stdout.strip() == '[]'


def test_the_benchmark_scripts_are_all_smoke_tested():
  """Every script in benchmarks/ is run by some test (most in test_benchmarks.py, at toy settings)."""
  tests = '\n'.join(p.read_text() for p in (ROOT / 'tests').glob('test_*.py'))
  scripts = sorted(p.name for p in (ROOT / 'benchmarks').glob('*.py'))
  assert scripts and [s for s in scripts if f"'{s}'" not in tests and f'/{s}' not in tests] == []

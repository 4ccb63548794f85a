"""The architecture's boundaries: models need only jax and flax; torch stays inside conversion/."""

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
  offenders = []
  for path in (ROOT / 'eva_clip_jax').rglob('*.py'):
    text = path.read_text()
    if ('import torch' in text or 'from torch' in text) and path.parent.name != 'conversion' \
        and path.name not in ('bench.py',):  # the side-by-side benchmarks time PyTorch on purpose
      offenders.append(str(path.relative_to(ROOT)))
  assert offenders == []

"""The architecture's boundaries: models need only jax and flax; torch stays inside conversion/; a config loads without
the checkpoint, conversion or data machinery; models reach attention only through the seam."""

import ast
import pathlib
import re
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


# What benchmarks/gpu_check.py runs on the GPU machine, whose image has no grain, clu or TensorFlow: the check
# itself with its attention cases, and its JAX train-step worker (benchmarks/train_step.py's run_jax) up to the
# built step. tests/test_gpu_check.py runs the whole dry run with only that image's packages.
_GPU_CHECK_PATH = '''
import sys
for name in ('grain', 'clu', 'tensorflow', 'tensorflow_datasets'):
  sys.modules[name] = None  # any import of these now fails
sys.path.insert(0, 'benchmarks')
sys.argv = ['gpu_check']
import gpu_check, attention
from eva_clip_jax.ops.experimental import mosaic_attention
from eva_clip_jax.recipe import clip_recipe
from eva_clip_jax import sharding
from eva_clip_jax.training import flops, planning, step
config = clip_recipe(model='tiny', visual_lr=2e-4, text_lr=2e-5, visual_layer_decay=0.75, text_layer_decay=0.75,
                     batch_size=8, samples_seen=8000, patch_dropout=0.5)
setup = step.make_setup(config, sharding.make_mesh(dict(data=-1)))
print(type(setup).__name__)
'''


def test_the_gpu_checks_import_path_needs_no_grain_clu_or_tensorflow():
  out = subprocess.run([sys.executable, '-c', _GPU_CHECK_PATH], capture_output=True, text=True, cwd=ROOT,
                       env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(ROOT)})
  assert out.returncode == 0, out.stderr[-1500:]
  assert out.stdout.strip() == 'TrainSetup'


def test_the_benchmark_scripts_are_all_smoke_tested():
  """Every script in benchmarks/ is run by some test (most in test_benchmarks.py, at toy settings)."""
  tests = '\n'.join(p.read_text() for p in (ROOT / 'tests').glob('test_*.py'))
  scripts = sorted(p.name for p in (ROOT / 'benchmarks').glob('*.py'))
  assert scripts and [s for s in scripts if f"'{s}'" not in tests and f'/{s}' not in tests] == []


def test_evaluation_does_not_import_training():
  """Evaluators are handed a model function, mesh and shardings by their caller (train or the CLI); importing the
  trainer from evaluation/ would close a loop with training/loop.py, which builds them."""
  offenders = [str(path.relative_to(ROOT)) for path in (ROOT / 'eva_clip_jax' / 'evaluation').rglob('*.py')
               if re.search(r'^\s*(from eva_clip_jax\.training\b|from eva_clip_jax import .*\btraining\b|'
                            r'import eva_clip_jax\.training\b)', path.read_text(), re.MULTILINE)]
  assert offenders == []


# Files that may touch the local file system directly, and why; every other module reaches a user-named location
# (shards, workdirs, evaluation data, weights, outputs: local or gs://) through eva_clip_jax/storage.py.
_LOCAL_FILES_ALLOWED = {
    'eva_clip_jax/storage.py': 'the path layer itself',
    'eva_clip_jax/tokenizer.py': 'the BPE vocabulary inside the package',
    'eva_clip_jax/accelerator.py': 'device files under /dev and PATH lookups',
    'eva_clip_jax/data/workers.py': '/proc, to see whether the trainer still lives',
    'eva_clip_jax/training/metrics.py': 'its local staging folder for a bucket workdir (uploaded through storage)',
    'eva_clip_jax/pretrained.py': "the Hugging Face hub's cache, a local folder by design (URLs pass through)",
}
_PATH_CALLS = re.compile(r'^(open|os\.path\.\w+|os\.(rename|replace|makedirs|mkdir|listdir|walk|scandir|remove|'
                         r'rmdir|unlink)|glob\.\w+|shutil\.\w+|gzip\.open|io\.open)$')


def _dotted(node) -> str:
  import ast  # pylint: disable=g-import-not-at-top
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f'{_dotted(node.value)}.{node.attr}'
  return ''


def test_user_named_locations_go_through_the_storage_layer():
  """No `open`, `os.path`, `glob`, `os.rename`, `shutil` outside the storage layer (and the files above, for their
  stated reasons), so a gs:// path works wherever a local one does. Package assets are read with importlib.resources
  or through `storage`, whose local branch is plain file access."""
  import ast  # pylint: disable=g-import-not-at-top
  offenders = []
  for path in sorted((ROOT / 'eva_clip_jax').rglob('*.py')):
    name = str(path.relative_to(ROOT))
    if name in _LOCAL_FILES_ALLOWED:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call) and _PATH_CALLS.match(_dotted(node.func)):
        offenders.append(f'{name}:{node.lineno}: {_dotted(node.func)}')
  assert offenders == [], '\n'.join(offenders)

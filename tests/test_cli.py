"""Every command reports a bad config, path or model name as one `error:` line and exit status 2, no traceback; a
ValueError or KeyError that is not the project's InputError is a bug and keeps its traceback."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from eva_clip_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    'train, no such config': (['eva_clip_jax.train', '--config=configs/no_such.py', '--workdir={tmp}'],
                              "No such file or directory: 'configs/no_such.py'"),
    'train, unknown model': (['eva_clip_jax.train', '--config=configs/tiny.py', '--workdir={tmp}',
                              '--config.model.name=EVA02-CLIP-Q-99'], "Unknown model 'EVA02-CLIP-Q-99'"),
    'train, no data there': (['eva_clip_jax.train', '--config=configs/tiny.py', '--workdir={tmp}',
                              "--config.data.sources=(('{tmp}/nothing', 1.0),)"], 'no shard matches'),
    'extract_features, no data there': (['eva_clip_jax.extract_features', '--config=configs/tiny.py',
                                         '--data={tmp}/nothing', '--output_dir={tmp}/out'], 'no shard matches'),
    'plan, unknown mesh axis': (['eva_clip_jax.plan', '--config=configs/tiny.py', '--mesh=model:8', '--target=cpu',
                                 '--strategies=zero1', '--remat=none', '--batch_per_device=1'], 'model'),
    'evaluate, unknown model': (['eva_clip_jax.evaluate', '--config=configs/tiny.py', '--config.model.name=nope-99',
                                 '--output_dir={tmp}/out'], "Unknown model 'nope-99'"),
    'convert, no such file': (['eva_clip_jax.convert', '--model=tiny', '--src={tmp}/missing.pt', '--dst={tmp}/out'],
                              'missing.pt'),
}


def _run(args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('EVA_CLIP_JAX_TRACEBACK', None)
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
  args, expected = CASES[case]
  proc = _run(['-m', *(a.format(tmp=tmp_path) for a in args)])
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


# A command whose main raises what the argument names: an InputError, a ValueError from inside jax (a shape jnp.split
# refuses), a bare KeyError.
_MAIN = '''
import sys
import jax.numpy as jnp
from eva_clip_jax import cli
from eva_clip_jax.errors import InputError
RAISE = {'input': lambda: InputError('no such thing\\nas that'), 'jax': lambda: jnp.split(jnp.ones(5), 2),
         'key': lambda: {}['missing']}
def main(argv):
  raise RAISE[argv[1]]()
cli.run(main)
'''


def test_an_input_error_is_one_line_and_exit_2():
  proc = _run(['-c', _MAIN, 'input'])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == ['error: no such thing as that']


@pytest.mark.parametrize('kind', ['jax', 'key'])
def test_a_library_value_error_or_key_error_keeps_its_traceback(kind):
  proc = _run(['-c', _MAIN, kind])
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' in proc.stderr and not any(line.startswith('error: ') for line in proc.stderr.splitlines())
  assert proc.stderr.strip().splitlines()[-1].startswith('ValueError' if kind == 'jax' else 'KeyError')


def test_checks_of_what_the_user_gives_raise_input_error():
  """The scheme of `eva_clip_jax.cli`: a check of the user's input raises InputError, a ValueError (callers that catch
  ValueError still do); cli reports InputError, OSError and UsageError in one line, and no ValueError or KeyError."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from eva_clip_jax import accelerator, cli, models, recipe  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.ops import attention  # pylint: disable=g-import-not-at-top
  from eva_clip_jax import sharding  # pylint: disable=g-import-not-at-top
  mistakes = {'model name': lambda: models.get_model_spec('EVA02-CLIP-Q-99'),
              'config argument': lambda: recipe.apply_variant(ml_collections.ConfigDict(), 'nope'),
              'attention backend': lambda: attention.validate_backend('nope'),
              'mesh flag': lambda: sharding.parse_mesh('model:8')}
  for what, mistake in mistakes.items():
    with pytest.raises(InputError):
      mistake()
      pytest.fail(f'no error for a bad {what}')
  assert issubclass(InputError, ValueError) and issubclass(accelerator.AcceleratorUnused, InputError)
  assert set(cli.USER_ERRORS) == {InputError, OSError, app.UsageError}


def test_entry_points_raise_no_bare_value_error():
  """An entry point's own checks are of its flags and config: they raise InputError (or app.UsageError), never a
  ValueError or KeyError that the command would print as a traceback."""
  entry_points = [p for p in (pathlib.Path(ROOT) / 'eva_clip_jax').rglob('*.py') if 'cli.run(' in p.read_text()]
  assert len(entry_points) >= 8
  offenders = []
  for path in entry_points:
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)
          and node.exc.func.id in ('ValueError', 'KeyError')):
        offenders.append(f'{path.name}:{node.lineno}')
  assert offenders == []


def test_a_missing_optional_library_is_one_line_naming_what_to_install(tmp_path):
  """torch is needed only to read PyTorch files: without it, `convert` says so in one line (MissingDependency, an
  InputError and an ImportError), not an ImportError traceback."""
  (tmp_path / 'weights.pt').write_bytes(b'not read')
  hide_torch = ("import runpy, sys; sys.modules['torch'] = None; "
                f"sys.argv = ['convert', '--model=tiny', '--src={tmp_path}/weights.pt', '--dst={tmp_path}/out']; "
                "runpy.run_module('eva_clip_jax.convert', run_name='__main__')")
  proc = _run(['-c', hide_torch])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == ('error: reading or writing PyTorch files needs torch: '
                                                  'pip install -r requirements-dev.txt')
  assert not (tmp_path / 'out').exists()

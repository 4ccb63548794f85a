"""Every command reports a bad config, path or model name as one `error:` line and exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
  args, expected = CASES[case]
  args = [a.format(tmp=tmp_path) for a in args]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('EVA_CLIP_JAX_TRACEBACK', None)
  proc = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr

"""The README's main job: `python -m eva_clip_jax.train --config=configs/tiny.py` on the demo set learns it
(loss falls, on the held-out pairs too; zero-shot top-1 on the held-out split >= 70%, chance 10%). About 3-4 minutes on 2 CPU cores."""

import json
import os
import subprocess
import sys

from eva_clip_jax.data import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_model_learns_the_demo_set(tmp_path):
  demo.write_demo_set(str(tmp_path / 'demo_data'))  # the config reads demo_data/ relative to the working dir
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-m', 'eva_clip_jax.train', f'--config={ROOT}/configs/tiny.py',
                           '--workdir=workdir'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'workdir' / 'metrics.jsonl') as f:
    history = [json.loads(line) for line in f]
  losses = [h['loss'] for h in history if 'loss' in h]
  top1 = [h['demo_zero_shot/top1'] for h in history if 'demo_zero_shot/top1' in h]
  assert len(losses) == 10 and len(top1) == 5  # logged every 50 steps, evaluated every 100, over 500 steps
  assert losses[-1] < 0.6 * losses[0], losses
  assert top1[-1] >= 0.70, top1
  val_losses = [h['demo_val/val_loss'] for h in history if 'demo_val/val_loss' in h]  # held-out pairs
  assert len(val_losses) == 5 and val_losses[-1] < val_losses[0], val_losses
  assert 'final: demo_zero_shot/top1=' in result.stdout

"""The README's quick start and the notebooks run as written."""

import json
import pathlib
import re

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path, monkeypatch):
  readme = (ROOT / 'README.md').read_text()
  snippet = re.search(r'## Quick start\n\n```python\n(.*?)```', readme, re.S).group(1)
  snippet = snippet.replace("'EVA02-CLIP-B-16'", "'tiny'").replace('image_transform(224', 'image_transform(64')
  monkeypatch.chdir(tmp_path)
  Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save('cat.jpg')
  scope = {}
  exec(compile(snippet, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  assert scope['logits_per_image'].shape == (1, 2)
  assert scope['image_features'].shape == (1, 64)


def test_quickstart_notebook_runs():
  notebook = json.loads((ROOT / 'colabs' / 'quickstart.ipynb').read_text())
  scope = {}
  for cell in notebook['cells']:
    if cell['cell_type'] == 'code':
      exec(compile(''.join(cell['source']), 'quickstart.ipynb', 'exec'), scope)  # pylint: disable=exec-used
  assert scope['logits_per_image'].shape == (1, 3)


def test_readme_commands_are_what_ci_and_the_demo_run():
  readme = (ROOT / 'README.md').read_text()
  ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()
  test_command = '.venv/bin/python -m pytest -q -n 2'
  assert ci[-1] == test_command and f'`{test_command}`' in readme
  main_job = re.search(r'```bash\n(python3 -m venv .*?)\n```', readme).group(1)
  assert 'pip install -q -r requirements.txt' in main_job
  assert '-m eva_clip_jax.data.demo --dst=demo_data' in main_job
  assert '-m eva_clip_jax.train --config=configs/tiny.py --workdir=' in main_job

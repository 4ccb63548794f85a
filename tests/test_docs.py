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

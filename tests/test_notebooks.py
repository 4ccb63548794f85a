"""The Colab notebooks run end to end: a tiny random-weight model served under B/16's tag by a local hub, a real
scikit-image photograph, the figure written as a PNG. Every cell runs; the install cell only finds the package
already importable (and says so) instead of calling pip."""

import os

import nbformat
import numpy as np
import pytest
from hub_server import HubServer
from nbclient import NotebookClient
from PIL import Image

import eva_clip_jax as ec
from eva_clip_jax.conversion import api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = 'timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k'
# Put after the notebook's parameters cell: the tiny model stands in for B/16, under B/16's tag, in the kernel.
INJECTED = f'''import eva_clip_jax as ec
ec.register_pretrained(ec.Pretrained('tiny', 'merged2b_s8b_b131k', {REPO!r}, 'open_clip_pytorch_model.bin',
                                     layout='open_clip'))
MODEL = 'tiny'
'''


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
  weights = tmp_path_factory.mktemp('weights') / 'open_clip_pytorch_model.bin'
  api.export_file(ec.create_model('tiny', seed=2), str(weights), 'tiny', 'open_clip')
  with HubServer() as server:
    server.add(REPO, 'open_clip_pytorch_model.bin', weights.read_bytes())
    yield server


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'zero_shot_eval.ipynb'])
def test_the_notebook_runs_end_to_end(name, hub, tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(ROOT, 'colabs', name), as_version=4)
  params = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1
  nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(INJECTED))
  for key, value in {'HF_ENDPOINT': hub.url, 'HF_HOME': str(tmp_path / 'hf'), 'NO_PROXY': '127.0.0.1,localhost',
                     'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, 'TFDS_DATA_DIR': str(tmp_path / 'tfds'),
                     'MPLBACKEND': 'Agg'}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  asked_before = len(hub.file_requests)
  NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()

  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count for c in code)  # every cell ran (an error would have raised above)
  text = {i: ''.join(o.get('text', '') for o in c.outputs) for i, c in enumerate(code)}
  assert 'eva_clip_jax is already installed' in text[0]
  assert 'cpu): computing in float32' in text[1]
  assert [m for m, _ in hub.file_requests[asked_before:]] == ['HEAD', 'GET']  # the tag was fetched, once
  printed = '\n'.join(text.values())
  for photo in ('chelsea', 'coffee', 'astronaut'):
    assert f'{photo:10s} ' in printed  # its top-5 line
  figure = Image.open(tmp_path / 'zero_shot_photos.png')
  assert figure.size[0] > 500 and np.asarray(figure.convert('L')).std() > 10  # drawn, not blank
  if name == 'zero_shot_eval.ipynb':
    assert 'demo/top1' in printed and 'demo_retrieval/' in printed
    assert 'imagenet2012 is not prepared under' in printed

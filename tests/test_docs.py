"""The README's quick start and the notebooks run as written."""

import json
import pathlib
import re

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path, monkeypatch):
  """The snippet as written, with the tiny model standing in for B/16 under B/16's tag on a local hub."""
  from hub_server import HubServer  # pylint: disable=g-import-not-at-top
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax import pretrained  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.conversion import api  # pylint: disable=g-import-not-at-top
  readme = (ROOT / 'README.md').read_text()
  snippet = re.search(r'## Quick start\n.*?```python\n(.*?)```', readme, re.S).group(1)
  assert "pretrained='merged2b_s8b_b131k'" in snippet
  snippet = snippet.replace("'EVA02-CLIP-B-16'", "'tiny'").replace('image_transform(224', 'image_transform(64')
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(pretrained, '_TABLE', dict(pretrained._TABLE))  # pylint: disable=protected-access
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
  monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  entry = pretrained.Pretrained('tiny', 'merged2b_s8b_b131k', 'timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k',
                                'open_clip_pytorch_model.bin', layout='open_clip')
  ec.register_pretrained(entry)
  api.export_file(ec.create_model('tiny', seed=1), 'weights.bin', 'tiny', 'open_clip')
  Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save('cat.jpg')
  with HubServer() as hub:
    hub.add(entry.repo, entry.filename, pathlib.Path('weights.bin').read_bytes())
    monkeypatch.setenv('HF_ENDPOINT', hub.url)
    scope = {}
    exec(compile(snippet, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
    assert [m for m, _ in hub.file_requests] == ['HEAD', 'GET']
  assert scope['logits_per_image'].shape == (1, 2)
  assert scope['image_features'].shape == (1, 64)


def test_readme_released_models_table_is_the_tags_and_the_papers_numbers():
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax import pretrained  # pylint: disable=g-import-not-at-top
  readme = (ROOT / 'README.md').read_text()
  section = readme[readme.index('## Released models'):readme.index('## Training\n')]
  rows = [[c.strip() for c in line.strip('|').split('|')] for line in section.splitlines()
          if line.startswith('| EVA')]
  paper = json.loads((ROOT / 'eva_clip_jax' / 'assets' / 'paper_tables.json').read_text())
  names = {v: k for k, v in paper['models'].items()}
  assert [r[0] for r in rows] == [m for m in ec.list_models() if m != 'tiny']
  successors = paper['successors']['rows']
  for row in [r for r in rows if r[0] in successors]:  # their own table: tag, repository, the README's averages
    entry = pretrained.get_pretrained(row[0], [t for m, t in ec.list_pretrained() if m == row[0]][0])
    assert row[1] == f'`{entry.tag}` (`{entry.repo}`)'
    published = successors[row[0]]
    assert [float(x) for x in row[5:8]] == [published['classification/avg'], published['video/avg'],
                                            published['retrieval/mean_recall']]
  for row in [r for r in rows if r[0] not in successors]:
    model = row[0]
    tags = [t for m, t in ec.list_pretrained() if m == model]
    assert row[1] == f'`{tags[0]}` / `{tags[1]}`'
    assert row[2] == f"`{[t for m, t in ec.list_pretrained('mim') if m == model][0]}`"
    tables = paper['tables']

    def cell(table, column, model=model):
      return tables[table]['rows'][names[model]][tables[table]['columns'].index(column)]

    expected = [cell('imagenet', 'imagenet1k'), cell('imagenet', 'avg'), cell('classification', 'avg'),
                cell('video', 'avg')]
    assert [float(x) for x in row[5:9]] == expected
    for text, dataset in ((row[9], 'flickr30k'), (row[10], 'coco')):
      assert [float(x) for x in text.split(' / ')] == [cell('retrieval', f'{dataset}/image_to_text_R@1'),
                                                       cell('retrieval', f'{dataset}/text_to_image_R@1')]


def test_readme_commands_are_what_ci_and_the_demo_run():
  readme = (ROOT / 'README.md').read_text()
  ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()
  test_command = '.venv/bin/python -m pytest -q -n 2'
  assert ci[-1] == test_command and f'`{test_command}`' in readme
  main_job = re.search(r'```bash\n(python3 -m venv .*?)\n```', readme).group(1)
  assert 'pip install -q -r requirements.txt' in main_job
  assert '-m eva_clip_jax.data.demo --dst=demo_data' in main_job
  assert '-m eva_clip_jax.train --config=configs/tiny.py --workdir=' in main_job

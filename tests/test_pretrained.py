"""Released checkpoints by tag: the table, downloads through a local hub (cache, hash check, offline), conversion."""

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import open_clip
import pytest
import torch
from hub_server import HubServer

import eva_clip_jax as ec
from eva_clip_jax import pretrained
from eva_clip_jax.conversion import api, model_params, torch_io
from eva_clip_jax.conversion.torch_reference import OPEN_CLIP_NAMES
from eva_clip_jax.models import replace_spec

EVA_FILES = ('EVA02_CLIP_B_psz16_s8B.pt', 'EVA02_CLIP_L_psz14_s4B.pt', 'EVA02_CLIP_L_336_psz14_s6B.pt',
             'EVA02_CLIP_E_psz14_s4B.pt', 'EVA02_CLIP_E_psz14_plus_s9B.pt', 'EVA01_CLIP_g_14_psz14_s11B.pt',
             'EVA01_CLIP_g_14_plus_psz14_s11B.pt')
MIM_FILES = ('EVA02_B_psz14to16.pt', 'EVA02_L_psz14.pt', 'EVA02_E_psz14.pt', 'EVA01_g_psz14.pt')
# The tiny model stands in for B/16 under B/16's released names, in both layouts.
TINY = {'eva': pretrained.Pretrained('tiny', 'EVA02_CLIP_B_psz16_s8B', pretrained.EVA_REPO,
                                     'EVA02_CLIP_B_psz16_s8B.pt', layout='eva'),
        'open_clip': pretrained.Pretrained('tiny', 'merged2b_s8b_b131k',
                                           'timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k',
                                           'open_clip_pytorch_model.bin', layout='open_clip')}


def leaves(model):
  return [np.asarray(x) for x in jax.tree.leaves(model_params(model))]


@pytest.fixture(scope='module')
def tiny_files(tmp_path_factory):
  """A seeded tiny model and its released-style files: {'eva': EVA .pt, 'open_clip': open_clip .bin}."""
  root = tmp_path_factory.mktemp('released')
  model = ec.create_model('tiny', seed=7)
  paths = {layout: str(root / entry.filename) for layout, entry in TINY.items()}
  for layout, path in paths.items():
    api.export_file(model, path, 'tiny', layout)
  return leaves(model), paths


@pytest.fixture
def hub(tmp_path, monkeypatch):
  """A local hub in HF_ENDPOINT, an empty cache in HF_HOME, and a table the test may add to (restored after)."""
  monkeypatch.setattr(pretrained, '_TABLE', dict(pretrained._TABLE))  # pylint: disable=protected-access
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
  monkeypatch.delenv('HF_HUB_CACHE', raising=False)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
  monkeypatch.chdir(tmp_path)  # a bare file name must not find a file in the working directory
  with HubServer() as server:
    monkeypatch.setenv('HF_ENDPOINT', server.url)
    yield server


def serve(hub, entry, path):
  ec.register_pretrained(entry)
  with open(path, 'rb') as f:
    hub.add(entry.repo, entry.filename, f.read())


def cached_files(tmp_path):
  root = tmp_path / 'hf' / 'hub'
  return sorted(str(p.relative_to(root)) for p in root.rglob('*')
                if p.is_file() and '.locks' not in p.parts and 'refs' not in p.parts and p.name != 'CACHEDIR.TAG')


def test_every_tag_names_a_registered_model_and_every_released_model_has_tags():
  released = set(ec.list_models()) - {'tiny'}  # 'tiny' is the test model: never released
  for model, _ in pretrained.list_pretrained(kind=None):
    assert ec.get_model_spec(model).name == model
  assert {m for m, _ in ec.list_pretrained()} == released
  # EVA-CLIP-8B-448 starts from EVA-CLIP-8B as a whole, not from a MIM tower.
  assert {m for m, _ in ec.list_pretrained(kind='mim')} == released - {'EVA-CLIP-8B-plus'}
  files = {pretrained.get_pretrained(m, t).filename for m, t in ec.list_pretrained(kind=None)}
  assert set(EVA_FILES) | set(MIM_FILES) <= files
  for model, tag in ec.list_pretrained():
    assert pretrained.get_pretrained(model, tag).kind == 'clip'


def test_open_clip_tags_and_repositories_are_open_clips():
  ours = {(m, t): pretrained.get_pretrained(m, t) for m, t in ec.list_pretrained()}
  for model, open_clip_name in OPEN_CLIP_NAMES.items():
    theirs = open_clip.list_pretrained_tags_by_model(open_clip_name)
    assert theirs
    for tag in theirs:
      entry = ours[(model, tag)]
      assert entry.layout == 'open_clip' and entry.filename == 'open_clip_pytorch_model.bin'
      assert entry.repo == open_clip.get_pretrained_cfg(open_clip_name, tag)['hf_hub'].rstrip('/')


@pytest.mark.parametrize('layout', ['eva', 'open_clip'])
def test_a_tag_downloads_once_then_loads_from_the_cache_like_the_local_file(layout, hub, tiny_files):
  expected, paths = tiny_files
  entry = TINY[layout]
  serve(hub, entry, paths[layout])
  by_tag = ec.create_model('tiny', pretrained=entry.tag)
  assert [m for m, _ in hub.file_requests] == ['HEAD', 'GET']
  local = ec.create_model('tiny', pretrained=paths[layout])
  for a, b, c in zip(leaves(by_tag), leaves(local), expected):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  asked = len(hub.requests)
  again = ec.create_model('tiny', pretrained=entry.filename if layout == 'eva' else entry.tag)  # 'X.pt' too
  assert len(hub.requests) == asked  # the cache answered; the server was not contacted at all
  for a, c in zip(leaves(again), expected):
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize('tag', ['EVA_CLIP_18B_psz14_s6B.fp16', 'EVA_CLIP_8B_psz14_plus_s0.6B.pt'])
def test_tags_with_dots_are_tags_not_paths(tag, hub, tiny_files):
  """EVA-CLIP-8B-448's and 18B's file names hold dots; they resolve to BAAI's repositories like any other tag."""
  expected, paths = tiny_files
  real = pretrained.get_pretrained('EVA-CLIP-18B' if '18B' in tag else 'EVA-CLIP-8B-448', tag)
  assert real.repo.startswith('BAAI/EVA-CLIP-') and real.layout == 'eva'
  serve(hub, dataclasses.replace(real, model='tiny'), paths['eva'])  # the tiny model stands in for the 8B/18B
  for a, c in zip(leaves(ec.create_model('tiny', pretrained=tag)), expected):
    np.testing.assert_array_equal(a, c)
  assert [path for _, path in hub.file_requests][-1].endswith(f'/{real.repo}/resolve/main/{real.filename}')


def test_a_corrupted_download_is_refused_and_leaves_nothing_in_the_cache(hub, tiny_files, tmp_path):
  expected, paths = tiny_files
  entry = TINY['eva']
  serve(hub, entry, paths['eva'])
  hub.corrupt.add((entry.repo, entry.filename))
  with pytest.raises(pretrained.CorruptedDownload, match='corrupted.*removed from the cache'):
    ec.create_model('tiny', pretrained=entry.tag)
  assert cached_files(tmp_path) == []
  hub.corrupt.clear()  # the next try downloads again and succeeds
  for a, c in zip(leaves(ec.create_model('tiny', pretrained=entry.tag)), expected):
    np.testing.assert_array_equal(a, c)
  assert len(cached_files(tmp_path)) == 2  # the blob and its snapshot link


def test_offline_with_an_empty_cache_says_what_to_download_and_where_in_one_line(hub, monkeypatch):
  ec.register_pretrained(TINY['open_clip'])
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(pretrained.PretrainedUnavailable) as error:
    ec.create_model('tiny', pretrained='merged2b_s8b_b131k')
  message = str(error.value)
  assert '\n' not in message
  for part in ('HF_HUB_OFFLINE', f'{hub.url}/timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k/resolve/main/'
               'open_clip_pytorch_model.bin', 'pretrained=/path/to/open_clip_pytorch_model.bin', 'HF_HOME'):
    assert part in message
  assert hub.file_requests == []


def test_offline_with_the_file_cached_loads_it(hub, tiny_files, monkeypatch):
  expected, paths = tiny_files
  serve(hub, TINY['open_clip'], paths['open_clip'])
  pretrained.resolve('merged2b_s8b_b131k', 'tiny')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  for a, c in zip(leaves(ec.create_model('tiny', pretrained='merged2b_s8b_b131k')), expected):
    np.testing.assert_array_equal(a, c)
  assert len(hub.file_requests) == 2


def test_an_unknown_tag_names_the_close_matches():
  with pytest.raises(ValueError, match=r"'merged2b_s4b' .*close matches: merged2b_s4b_b131k"):
    pretrained.resolve('merged2b_s4b', 'EVA02-CLIP-L-14')
  with pytest.raises(ValueError, match='it is a tag of EVA02-CLIP-B-16'):
    pretrained.resolve('merged2b_s8b_b131k', 'EVA02-CLIP-L-14')
  with pytest.raises(ValueError, match='MIM image tower.*init.visual'):
    pretrained.resolve('EVA02_L_psz14', 'EVA02-CLIP-L-14')


def test_a_file_of_another_architecture_names_the_mismatching_tensors(hub, tmp_path):
  other = replace_spec(ec.get_model_spec('tiny'), embed_dim=32)
  path = str(tmp_path / 'EVA02_CLIP_B_psz16_s8B.pt')
  api.export_file(ec.create_model(other), path, other, 'eva')
  serve(hub, TINY['eva'], path)
  with pytest.raises(ValueError, match=r'wrong shape \(3\): ') as error:
    ec.create_model('tiny', pretrained=TINY['eva'].tag)
  for part in ('text/text_projection: expected (64, 64), got (64, 32)', 'visual/head/kernel: expected (64, 64), got '
               '(64, 32)', 'visual/head/bias: expected (64,), got (32,)'):
    assert part in str(error.value)


def test_a_mim_tag_initialises_the_image_tower(hub, tmp_path):
  source = ec.create_model('tiny', seed=3)
  state = api.params_to_state_dict(model_params(source), source.spec, 'eva')
  tower = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.') and '.head.' not in k}
  path = str(tmp_path / 'EVA02_B_psz14to16.pt')
  torch_io.save_state_dict(tower, path)
  serve(hub, pretrained.Pretrained('tiny', 'EVA02_B_psz14to16', pretrained.EVA_REPO, 'EVA02_B_psz14to16.pt',
                                   kind='mim'), path)
  model = ec.create_model('tiny', seed=0)
  report = api.init_from_config(model, ml_collections.ConfigDict(dict(visual='EVA02_B_psz14to16', text='',
                                                                      skip=('visual.head',))))
  assert 'visual/blocks/attn/q_proj/kernel' in report['loaded'] and 'visual/head/kernel' in report['fresh']
  np.testing.assert_array_equal(np.asarray(model.visual.blocks.mlp.w3.kernel[...]),
                                np.asarray(source.visual.blocks.mlp.w3.kernel[...]))
  assert not np.array_equal(np.asarray(model.visual.head.kernel[...]), np.asarray(source.visual.head.kernel[...]))
  with pytest.raises(ValueError, match='MIM image tower'):
    ec.create_model('tiny', pretrained='EVA02_B_psz14to16')


def test_the_module_imports_neither_torch_nor_the_hub_client():
  import subprocess
  import sys
  code = ('import sys; import eva_clip_jax as ec; ec.list_pretrained(); '
          'print(sorted(m for m in ("torch", "huggingface_hub") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-1000:]
  assert out.stdout.strip() == '[]'

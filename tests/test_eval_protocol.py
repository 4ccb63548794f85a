"""The evaluation protocol, dataset by dataset, as CLIP_benchmark builds each one: small fabricated data, each test
written to fail on the reading it replaced (tfds' squashed UCF-101 frames and downscaled SUN397, all of RESISC45
with edited names, the VTAB Caltech-101, COCO cut to 5 captions, a Flickr30K of any size)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from eva_clip_jax.evaluation import datasets, suite


def _png(color) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((6, 8, 3), color, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


class _Builder:
  """A prepared tfds builder as the loaders see it: label names and split sizes."""

  def __init__(self, names, splits=None):
    label = type('Label', (), {'names': names, 'num_classes': len(names)})()
    self.info = type('Info', (), {'features': {'label': label}, 'splits': splits or {}})()


@pytest.fixture
def captured(monkeypatch):
  """Records the tfds builders and splits the loaders ask for, and the (source, label) items they hand on."""
  seen = {'builders': [], 'splits': [], 'items': []}

  def builder(name, data_dir, layout=''):
    seen['builders'].append(name)
    return seen['builder']

  def records(name, split, data_dir, keys, **kwargs):
    seen['builders'].append(name)
    seen['splits'].append(split)
    return iter(seen['records'])

  def streamed(items, image_size, batch_size, chunk_batches=16):
    seen['items'].extend(items)
    return iter([])

  def labelled(items, image_size, batch_size=64, num_workers=0, shard_by_process=True):
    seen['items'].extend(items)
    return iter([])

  monkeypatch.setattr(datasets, 'tfds_builder', builder)
  monkeypatch.setattr(datasets, 'tfds_records', records)
  monkeypatch.setattr(datasets, 'streamed_batches', streamed)
  monkeypatch.setattr(datasets, 'labelled_batches', labelled)
  return seen


def _load(key, data_dir='unused'):
  spec = suite.DATASETS[key]
  return spec.load(spec, str(data_dir), 32, 8, 0)


def test_ucf101_reads_the_original_frames_and_takes_the_middle_one(captured):
  frames = [_png(c) for c in (10, 20, 30, 40, 50)]
  captured['builder'] = _Builder(['ApplyEyeMakeup', 'YoYo'])
  captured['records'] = [{'video': frames, 'label': 1}, {'video': frames[:2], 'label': 0}]
  task = _load('ucf101')
  # ucf101_1, not tfds' default ucf101_1_256 (frames squashed to 256x256 before our resize and crop).
  assert set(captured['builders']) == {'ucf101/ucf101_1'}
  assert captured['items'] == [(frames[2], 1), (frames[1], 0)]
  assert task.classnames == ['Apply Eye Makeup', 'Yo Yo']


def test_resisc45_is_vtabs_test_split_with_tfds_names_as_they_are(captured):
  tfds = pytest.importorskip('tensorflow_datasets')
  captured['builder'] = _Builder(['airplane', 'baseball_diamond'])
  captured['records'] = [{'image': b'x', 'label': 1}]
  task = _load('resisc45')
  assert task.classnames == ['airplane', 'baseball_diamond']  # CLIP_benchmark keeps the underscores
  (split,) = captured['splits']
  # The last 20% of the 31,500 images: train[25200:], 6,300 images.
  split_info = type('SplitInfo', (), {'num_examples': 31500})()
  (absolute,) = tfds.core.ReadInstruction.from_spec(split).to_absolute({'train': split_info})
  assert absolute.from_ == 25200 and absolute.to in (None, 31500)


def _write(path, data=b''):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def test_sun397_reads_every_full_resolution_image_labelled_by_its_folder(captured, tmp_path):
  root = tmp_path / 'sun397' / 'SUN397'
  _write(str(root / 'ClassName.txt'), b'/a/abbey\n/a/apartment_building/outdoor\n/b/bakery/shop\n')
  # Labels by folder, deliberately not in file order: a mapping by position or by sorted name would differ.
  files = {'b/bakery/shop/sun_c.jpg': 2, 'a/abbey/sun_a.jpg': 0, 'a/apartment_building/outdoor/sun_b.jpg': 1,
           'a/abbey/sun_d.jpg': 0}
  for name in files:
    _write(str(root / name))
  _write(str(root / 'a' / 'abbey' / 'notes.txt'))  # not an image of the set
  task = _load('sun397', tmp_path)
  assert task.classnames == ['abbey', 'apartment building outdoor', 'bakery shop']
  got = {os.path.relpath(path, root): label for path, label in captured['items']}
  assert got == files and task.size == 4


def test_caltech101_is_clip_benchmarks_full_folder_variant(captured, tmp_path):
  names = suite.benchmark_classnames('caltech101')
  assert len(names) == 102 and names[0] == 'background'  # 101 categories and BACKGROUND_Google
  folders = ['BACKGROUND_Google', 'Faces', 'Faces_easy'] + [f'category_{i:03d}' for i in range(99)]
  for i, folder in enumerate(folders):
    for j in range(1 + i % 2):
      _write(str(tmp_path / 'caltech101' / '101_ObjectCategories' / folder / f'image_{j:04d}.jpg'))
  task = _load('caltech101', tmp_path)
  assert task.classnames == names and task.size == sum(1 + i % 2 for i in range(102))  # every image, no split
  labels = {os.path.basename(os.path.dirname(path)): label for path, label in captured['items']}
  assert labels['BACKGROUND_Google'] == 0 and labels['Faces'] == 1 and labels['category_098'] == 101


def test_coco_keeps_every_caption_of_each_image(captured):
  captured['records'] = [{'image': b'a', 'captions': {'text': [f'{i}'.encode() for i in range(5)]}},
                         {'image': b'b', 'captions': {'text': [f'{i}'.encode() for i in range(7)]}}]
  task = _load('coco')
  assert len(task.captions) == 12 and task.text_to_image.tolist() == [0] * 5 + [1] * 7


def _flickr(tmp_path, images, captions_per_image):
  folder = tmp_path / 'flickr30k'
  rows = ['path,caption']
  for i in range(images):
    _write(str(folder / 'images' / f'{i}.jpg'))
    rows += [f'images/{i}.jpg,caption {j} of {i}' for j in range(captions_per_image)]
  (folder / 'test.csv').write_text('\n'.join(rows) + '\n')


def test_flickr30k_is_the_1k_test_images_with_5_captions_each(tmp_path):
  _flickr(tmp_path / 'right', 1000, 5)
  task = _load('flickr30k', tmp_path / 'right')
  assert len(task.images) == 1000 and len(task.captions) == 5000
  for images, per_image in ((200, 5), (1000, 4)):
    _flickr(tmp_path / f'{images}x{per_image}', images, per_image)
    with pytest.raises(ValueError, match='1000 Karpathy test images with 5 captions each'):
      _load('flickr30k', tmp_path / f'{images}x{per_image}')


def test_evaluate_reads_and_writes_a_bucket(gcs_bucket):
  """`python -m eva_clip_jax.evaluate --suite` with a folder dataset (Rendered SST2), a CSV dataset (GTSRB, path,label
  rows) and the output dir all in a bucket on a local GCS server: every location goes through eva_clip_jax.storage."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from eva_clip_jax import storage  # pylint: disable=g-import-not-at-top
  data, out = f'{gcs_bucket}/eval', f'{gcs_bucket}/results'
  for label, color in (('negative', 0), ('positive', 255)):
    for i in range(2):
      storage.write_bytes(f'{data}/renderedsst2/test/{label}/{i}.png', _png(color))
  rows = ['path,label']
  for i in range(3):
    storage.write_bytes(f'{data}/gtsrb/images/{i}.png', _png(40 * i))
    rows.append(f'images/{i}.png,{i}')
  storage.write_text(f'{data}/gtsrb/test.csv', '\n'.join(rows) + '\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'eva_clip_jax.evaluate', f'--config={root}/configs/tiny.py',
                         '--suite=classification', '--datasets=renderedsst2,gtsrb', f'--data_dir={data}',
                         f'--output_dir={out}', '--batch_size=4'], capture_output=True, text=True, cwd=root,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(storage.read_text(f'{out}/results.json'))['results']
  assert results['renderedsst2']['num_samples'] == 4 and results['gtsrb']['num_samples'] == 3
  assert results['gtsrb']['num_classes'] == 43
  assert storage.exists(f'{out}/tables.txt') and storage.exists(f'{out}/results.csv')
  assert storage.exists(f'{out}/datasets/gtsrb.json') and storage.listdir(f'{out}/text_embeddings')

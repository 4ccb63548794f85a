"""`python -m eva_clip_jax.classify`: top-k per image equal to encode_image/encode_text by hand; one-line errors."""

import csv
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import eva_clip_jax as ec
from eva_clip_jax.evaluation.classifier import ZeroShotClassifier, imagenet_templates, parse_templates, read_image
from eva_clip_jax.conversion import api
from eva_clip_jax.data import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ['a red shape', 'a blue shape', 'a cat', 'a dog']


def run_cli(args, env=None, cwd=ROOT):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, **(env or {})}
  return subprocess.run([sys.executable, '-m', 'eva_clip_jax.classify', *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope='module')
def demo_images(tmp_path_factory):
  """Five demo images: three as files, two in a nested folder (the CLI expands folders)."""
  root = tmp_path_factory.mktemp('demo')
  demo.write_demo_set(str(root / 'demo'), num_train=0, num_val=5)
  files = sorted((root / 'demo' / 'images').iterdir())
  folder = root / 'folder' / 'nested'
  folder.mkdir(parents=True)
  for f in files[3:]:
    shutil.copy(f, folder / f.name)
  (folder / 'notes.txt').write_text('not an image')
  return [str(f) for f in files[:3]] + [str(folder / f.name) for f in files[3:]], str(root / 'folder')


def by_hand(model, paths, labels, templates, k):
  """Embeddings from the model's own encoders, the classifier and softmax written out in numpy."""
  tokenizer = ec.get_tokenizer('tiny')
  preprocess = ec.image_transform(model.spec.vision.image_size)
  classifier = []
  for label in labels:
    t = np.asarray(model.encode_text(jnp.asarray(tokenizer([tpl.format(label) for tpl in templates]))))
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    mean = t.mean(0)
    classifier.append(mean / np.linalg.norm(mean))
  images = np.stack([preprocess(Image.open(p)) for p in paths])
  f = np.asarray(model.encode_image(jnp.asarray(images)))
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  logits = float(np.exp(np.asarray(model.logit_scale[...]))) * f @ np.stack(classifier).T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return [[(labels[i], p[i]) for i in np.argsort(-p)[:k]] for p in probs]


def test_classify_prints_the_top_k_computed_by_hand(demo_images, tmp_path):
  paths, folder = demo_images
  model = ec.create_model('tiny', seed=5)
  weights = str(tmp_path / 'EVA02_CLIP_B_psz16_s8B.pt')
  api.export_file(model, weights, 'tiny', 'eva')
  out_csv = str(tmp_path / 'out' / 'results.csv')
  result = run_cli(['--model=tiny', f'--pretrained={weights}', f'--labels={",".join(LABELS)}', '--top_k=3',
                    '--batch_size=2', f'--output={out_csv}', *paths[:3], folder])
  assert result.returncode == 0, result.stderr[-3000:]
  printed = [line for line in result.stdout.splitlines() if not line.startswith('wrote ')]
  expected = by_hand(model, paths, LABELS, imagenet_templates(), 3)
  assert len(printed) == len(paths) == 5
  rows = list(csv.DictReader(open(out_csv)))
  for line, path, top in zip(printed, paths, expected):
    name, ranked = line.split(': ', 1)
    assert name == path
    got = [item.rsplit(' ', 1) for item in ranked.split(' | ')]
    assert [label for label, _ in got] == [label for label, _ in top]
    np.testing.assert_allclose([float(p) for _, p in got], [p for _, p in top], atol=2e-4)
    mine = [r for r in rows if r['image'] == path]
    assert [r['label'] for r in mine] == [label for label, _ in top] and [r['rank'] for r in mine] == ['1', '2', '3']


def test_custom_templates_give_the_scores_computed_by_hand(demo_images):
  paths, _ = demo_images
  model = ec.create_model('tiny', seed=5)
  templates = parse_templates('a {} shape.|a photo of something {}.')
  assert templates == ['a {} shape.', 'a photo of something {}.'] and parse_templates('none') == ['{}']
  classifier = ZeroShotClassifier(model, ['red', 'blue', 'green'], templates, batch_size=4)
  got = classifier.classify([read_image(p) for p in paths], top_k=2)  # 5 images: a full batch and a padded one
  for mine, expected in zip(got, by_hand(model, paths, ['red', 'blue', 'green'], templates, 2)):
    assert [label for label, _ in mine] == [label for label, _ in expected]
    np.testing.assert_allclose([p for _, p in mine], [p for _, p in expected], atol=2e-5)
  with pytest.raises(ValueError, match='needs {}'):
    parse_templates('a photo')


def _one_error_line(result):
  assert result.returncode == 2, (result.stdout, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ')
  return last


def test_offline_with_an_empty_cache_exits_2_with_one_line(demo_images, tmp_path):
  paths, _ = demo_images
  result = run_cli(['--model=EVA02-CLIP-B-16', '--pretrained=merged2b_s8b_b131k', '--labels=cat,dog', paths[0]],
                   env={'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'empty')})
  line = _one_error_line(result)
  assert ('timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k/resolve/main/open_clip_pytorch_model.bin' in line
          and 'HF_HUB_OFFLINE' in line and str(tmp_path / 'empty') in line)


def test_an_unknown_tag_exits_2_naming_the_close_matches(demo_images):
  paths, _ = demo_images
  line = _one_error_line(run_cli(['--model=EVA02-CLIP-L-14', '--pretrained=merged2b_s4b', '--labels=cat,dog',
                                  paths[0]]))
  assert 'close matches: merged2b_s4b_b131k' in line


def test_a_missing_image_exits_2(tmp_path):
  line = _one_error_line(run_cli(['--model=tiny', '--labels=cat,dog', str(tmp_path / 'nope.jpg')]))
  assert 'nope.jpg' in line

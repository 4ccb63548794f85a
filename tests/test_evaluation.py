"""Zero-shot classification, retrieval and sharded feature extraction, on fixtures whose answers are known."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import eva_clip_jax as ec
from eva_clip_jax.data import demo
from eva_clip_jax.evaluation import (FeatureExtractor, build_evaluators, data_mesh, retrieval_recall,
                                     score_zero_shot, topk_accuracy, zero_shot_classifier)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topk_accuracy_by_hand():
  logits = np.array([[0.1, 0.9, 0.0, 0.2],   # label 1: top-1 hit
                     [0.8, 0.1, 0.3, 0.2],   # label 2: second -> top-2 hit only
                     [0.0, 0.1, 0.2, 0.3]])  # label 0: last -> miss at k <= 3
  labels = np.array([1, 2, 0])
  assert topk_accuracy(logits, labels, ks=(1, 2, 4)) == {'top1': 1 / 3, 'top2': 2 / 3, 'top4': 1.0}


def test_recall_at_k_by_hand():
  # 3 images, 5 captions: image 0 has captions 0, 1; image 1 has 2, 3; image 2 has 4.
  images = np.eye(3)
  texts = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0.9, 0.8, 0], [0, 0, 0.5]])
  text_to_image = [0, 0, 1, 1, 2]
  r = retrieval_recall(images, texts, text_to_image, ks=(1, 2))
  # text->image ranks: t0->img0 rank 0; t1 (best img2) -> img0 rank 1; t2 -> img1 rank 0;
  # t3 scores (0.9, 0.8, 0) -> img1 rank 1; t4 -> img2 rank 0.
  assert r['text_to_image_R@1'] == pytest.approx(3 / 5) and r['text_to_image_R@2'] == 1.0
  # image->text: img0 best caption t0 rank 0 (t3 0.9 < 1.0); img1 sims (0,0,1,0.8,0): t2 rank 0;
  # img2 sims (0,1,0,0,0.5): t4 rank 1 (t1 beats it).
  assert r['image_to_text_R@1'] == pytest.approx(2 / 3) and r['image_to_text_R@2'] == 1.0
  with pytest.raises(ValueError, match='at least one caption'):
    retrieval_recall(images, texts[:4], [0, 0, 1, 1])


class _KnownTextFeatures:
  """A stand-in extractor: every prompt's feature is fixed by its class and template, so the classifier and
  the accuracy can be worked out by hand."""

  def __init__(self, table):
    self.table = table

  def texts(self, prompts):
    return np.stack([self.table[p] for p in prompts])

  def images(self, images):  # the 'images' are already their features
    return images


def test_zero_shot_classifier_averages_templates_and_renormalises():
  # Prompt features of unequal lengths: averaging them without first normalising each would weight 'a cat' 3:1
  # and give (0.95, 0.32), not the class direction (0.71, 0.71).
  table = {'a cat': np.array([3.0, 0.0]), 'the cat': np.array([0.0, 1.0]),
           'a dog': np.array([-2.0, 0.0]), 'the dog': np.array([-0.5, 0.0])}
  extractor = _KnownTextFeatures(table)
  classifier = zero_shot_classifier(extractor, lambda prompts: prompts, ['cat', 'dog'], ['a {}', 'the {}'])
  np.testing.assert_allclose(classifier[:, 0], [np.sqrt(0.5), np.sqrt(0.5)])  # mean (0.5, 0.5), renormalised
  np.testing.assert_allclose(classifier[:, 1], [-1.0, 0.0])
  images = np.array([[1.0, 1.0], [0.2, 1.0], [-1.0, 0.1], [-0.1, -1.0]])
  labels = np.array([0, 0, 1, 1])  # the last image sits closer to 'dog' (-0.1) than to 'cat' (-0.78): a hit
  result = score_zero_shot(extractor, lambda p: p, [{'image': images, 'label': labels}], ['cat', 'dog'],
                           ['a {}', 'the {}'])
  assert result['top1'] == 1.0 and result['num_samples'] == 4
  with pytest.raises(ValueError, match="must contain"):
    zero_shot_classifier(extractor, lambda p: p, ['cat'], ['no placeholder'])


def test_features_on_8_devices_equal_one_device():
  assert jax.device_count() == 8
  model = ec.create_model('tiny', seed=2)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(13, 64, 64, 3)).astype(np.float32)  # not a multiple of 8: padded and trimmed
  tokens = ec.tokenize([f'caption {i}' for i in range(11)], 32)
  sharded = FeatureExtractor.for_model(model, data_mesh())
  single = FeatureExtractor.for_model(model, data_mesh(jax.devices()[:1]))
  np.testing.assert_allclose(sharded.images(images), single.images(images), atol=1e-5)
  np.testing.assert_allclose(sharded.texts(tokens), single.texts(tokens), atol=1e-5)
  assert sharded.images(images).shape == (13, 64)


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  demo.write_demo_set(str(root / 'demo_data'), num_train=16, num_val=64, samples_per_shard=16)
  return root


def test_evaluate_command_on_the_demo_set(demo_root):
  out = demo_root / 'results.json'
  result = subprocess.run([sys.executable, '-m', 'eva_clip_jax.evaluate', f'--config={ROOT}/configs/tiny.py',
                           f'--output={out}'], cwd=demo_root, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.loads(out.read_text())
  assert metrics['demo_zero_shot/num_samples'] == 64
  for key in ('demo_zero_shot/top1', 'demo_zero_shot/top5', 'demo_retrieval/image_to_text_R@1',
              'demo_retrieval/text_to_image_R@10'):
    assert 0.0 <= metrics[key] <= 1.0
  assert 'demo_zero_shot/top1' in result.stdout  # the table


def test_retrieval_from_shards(demo_root):
  """Retrieval straight from shards (one caption per image): the plumbing, on the tiny model. The arithmetic of
  Recall@K is checked by hand in test_recall_at_k_by_hand."""
  model = ec.create_model('tiny')
  (evaluator,) = build_evaluators({'r': dict(kind='retrieval', dataset='caption_shards',
                                             data=str(demo_root / 'demo_data' / 'val'), batch_size=32)})
  result = evaluator.run(model)
  recalls = {f'r/{d}_R@{k}' for d in ('image_to_text', 'text_to_image') for k in (1, 5, 10)}
  assert set(result) == recalls | {'r/num_images', 'r/num_captions'}
  assert result['r/num_images'] == result['r/num_captions'] == 64
  assert all(0.0 <= result[k] <= 1.0 for k in recalls)
  assert result['r/text_to_image_R@10'] >= result['r/text_to_image_R@1']


def test_csv_readers_share_one_check_of_file_and_columns(tmp_path):
  from eva_clip_jax.evaluation import datasets  # pylint: disable=g-import-not-at-top
  (tmp_path / 'a.png').write_bytes(b'')
  (tmp_path / 'labels.csv').write_text('path,label\na.png,1\na.png,dog\n')
  assert datasets.labelled_csv(str(tmp_path / 'labels.csv'), ['cat', 'dog']) == [(str(tmp_path / 'a.png'), 1)] * 2
  (tmp_path / 'captions.csv').write_text('path,caption\na.png,one\na.png,two\n')
  paths, captions, text_to_image = datasets.caption_pairs(str(tmp_path / 'captions.csv'))
  assert paths == [str(tmp_path / 'a.png')] and captions == ['one', 'two'] and list(text_to_image) == [0, 0]
  for read, column in ((datasets.labelled_csv, 'label'), (datasets.caption_pairs, 'caption')):
    with pytest.raises(datasets.MissingDataset, match=f'no CSV at .*nope.csv .expected columns path, {column}'):
      read(str(tmp_path / 'nope.csv'))
    (tmp_path / 'bad.csv').write_text('path,other\na.png,x\n')
    with pytest.raises(ValueError, match=f'bad.csv needs a header with columns path, {column}; missing {column}$'):
      read(str(tmp_path / 'bad.csv'))
    (tmp_path / 'empty.csv').write_text(f'path,{column}\n')
    with pytest.raises(ValueError, match='empty.csv has a header but no rows'):
      read(str(tmp_path / 'empty.csv'))


def test_a_process_whose_share_ran_out_keeps_calling_every_encoder_with_no_rows(monkeypatch):
  """in_lockstep as one of two processes: this one has 1 batch, the other 3 (the all-gather is simulated)."""
  from eva_clip_jax.evaluation import features as features_lib  # pylint: disable=g-import-not-at-top
  gathered = []

  def allgather(has_batch):
    gathered.append(bool(has_batch))
    return np.array([bool(has_batch), len(gathered) <= 3])

  calls = []
  encoders = {key: lambda x, key=key: calls.append((key, x.shape, x.dtype)) or np.full(len(x), key)
              for key in ('image', 'text')}
  batch = {'image': np.ones((2, 3), np.float32), 'text': np.ones((2, 4), np.int32), 'key': ['a', 'b']}
  monkeypatch.setattr(features_lib.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(features_lib.multihost_utils, 'process_allgather', allgather)
  out = list(features_lib.in_lockstep([batch], encoders))
  assert len(out) == 1 and out[0][0] is batch and {k: list(v) for k, v in out[0][1].items()} == {
      'image': ['image', 'image'], 'text': ['text', 'text']}
  assert gathered == [True, False, False, False]  # the 4th gather finds both done
  idle = [('image', (0, 3), np.float32), ('text', (0, 4), np.int32)]
  assert calls == [('image', (2, 3), np.float32), ('text', (2, 4), np.int32)] + idle * 2
  gathered.clear()
  with pytest.raises(ValueError, match='no data while others did'):
    list(features_lib.in_lockstep([], encoders))


def test_the_towers_are_traced_in_the_callers_context():
  """The caller's trace context (training's activation sharding) is entered when a tower is traced, once per
  compiled shape, not per call."""
  import contextlib  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.models.factory import model_from_params  # pylint: disable=g-import-not-at-top
  entered = []

  @contextlib.contextmanager
  def context():
    entered.append(True)
    yield

  model = ec.create_model('tiny')
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mesh = data_mesh()
  pure = params.to_pure_dict()
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), pure)
  extractor = FeatureExtractor(lambda p: model_from_params(graphdef, params, p, rest), mesh, shardings, 8,
                               trace_context=context)
  images = np.zeros((8, 64, 64, 3), np.float32)
  for _ in range(2):
    extractor.encode_image(jax.device_put(pure, shardings), images)
  assert entered == [True]

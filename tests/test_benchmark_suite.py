"""The paper's zero-shot suite: the protocol on planted features, every tfds-backed dataset end to end on
tensorflow-datasets' mock data with the tiny model, the folder layouts, the tables, and evaluators compiled once on
the training mesh."""

import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import eva_clip_jax as ec
from eva_clip_jax.evaluation import (FeatureExtractor, build_evaluators, classification_counts, datasets,
                                     metrics_from_counts, report, retrieval_recall, runner, score_zero_shot, suite)
from eva_clip_jax.evaluation.zero_shot import class_subset, imagenet_metadata
from eva_clip_jax.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(rng, size=(20, 24)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def _write_png(path, rng):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(_png(rng))


# ------------------------------------------------------------------------------------------- planted protocol

class _PlantedExtractor:
  """Text features: class k's prompts embed to the one-hot e_k (so the classifier is the identity); images are
  their own features."""

  def __init__(self, classnames):
    self.index = {name: i for i, name in enumerate(classnames)}
    self.dim = len(classnames)

  def texts(self, prompts):
    out = np.zeros((len(prompts), self.dim), np.float32)
    for row, prompt in enumerate(prompts):
      out[row, self.index[prompt]] = 1.0
    return out

  def images(self, images):
    return np.asarray(images, np.float32)


def test_imagenet_a_and_r_score_their_200_classes():
  names = imagenet_metadata()[0]
  extractor = _PlantedExtractor(names)
  for which in ('imagenet_a', 'imagenet_r'):
    subset = class_subset(which)
    assert len(subset) == 200 and subset == sorted(subset)
    ks = [subset[3], subset[150], subset[199]]
    images = np.eye(1000, dtype=np.float32)[ks]  # image feature == class k's text embedding
    positions = [3, 150, 199]  # k's position within the subset
    result = score_zero_shot(extractor, lambda p: p, [{'image': images, 'label': np.asarray(positions)}], names,
                             ['{}'], subset=subset)
    assert result['top1'] == 1.0 and result['num_samples'] == 3
    # The same images scored against the wrong positions: all misses (the restriction is what makes them hits).
    wrong = score_zero_shot(extractor, lambda p: p, [{'image': images, 'label': np.asarray(ks) % 200}], names,
                            ['{}'], subset=subset)
    assert wrong['top1'] == 0.0
  # ImageNet-A's and -R's first classes differ (the subsets are not one list).
  assert class_subset('imagenet_a')[0] != class_subset('imagenet_r')[0]


def test_topk_mean_per_class_recall_and_kinetics_metric_by_hand():
  # 6 classes; each row's label sits at the given rank of its logits.
  ranks, labels = [0, 0, 2, 5, 1, 0, 6 - 1], [0, 0, 1, 1, 2, 3, 4]
  logits = np.zeros((len(labels), 6))
  for row, (rank, label) in enumerate(zip(ranks, labels)):
    order = [c for c in range(6) if c != label]
    order.insert(rank, label)  # descending order of scores
    logits[row, order] = np.arange(6, 0, -1)
  m = metrics_from_counts(classification_counts(logits, np.asarray(labels), 6))
  assert m['top1'] == pytest.approx(3 / 7)  # ranks 0, 0, 0 (rows 0, 1, 5)
  assert m['top5'] == pytest.approx(5 / 7)  # ranks < 5: all but the two at rank 5
  # per class (classes with samples): c0 2/2, c1 0/2, c2 0/1, c3 1/1, c4 0/1 -> mean 2/5
  assert m['mean_per_class_recall'] == pytest.approx(2 / 5)
  assert m['mean_top1_top5'] == pytest.approx((3 / 7 + 5 / 7) / 2)
  assert m['num_samples'] == 7
  two = metrics_from_counts(classification_counts(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]), 2))
  assert two == {'top1': 0.5, 'mean_per_class_recall': 0.5, 'num_samples': 2}  # no top-5 with 2 classes


def test_retrieval_with_five_captions_per_image_by_hand():
  # 2 images (e0, e1), 10 captions, 5 each; dimension 3.
  images = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  texts = np.array([[0.2, 0.9, 0], [0.1, 0.0, 1.0], [0.3, 0.2, 0], [0.0, 0.0, 1.0], [0.5, 0.6, 0],   # image 0's
                    [0.9, 0.1, 0], [0.0, 0.3, 0], [0.0, 0.0, 1.0], [0.0, 0.2, 0.5], [0.0, 0.1, 0.9]])  # image 1's
  text_to_image = [0] * 5 + [1] * 5
  r = retrieval_recall(images, texts, text_to_image, ks=(1, 5, 10))
  # text->image (2 candidates): t0 0.2<0.9 miss, t1 0.1>0 hit, t2 0.3>0.2 hit, t3 tie 0=0 hit, t4 0.5<0.6 miss;
  # t5 0.1<0.9 miss, t6 0.3>0 hit, t7 tie hit, t8 0.2>0 hit, t9 0.1>0 hit -> R@1 = 7/10, R@5 = 1.
  assert r['text_to_image_R@1'] == pytest.approx(0.7) and r['text_to_image_R@5'] == 1.0
  # image->text: e0's scores (0.2, .1, .3, 0, .5, .9, 0, 0, 0, 0): its best caption t4 (0.5) ranks 2nd after t5:
  # R@1 miss, R@5 hit. e1's scores: t0 0.9 (image 0's) beats its best t6 0.3 and t4 0.6: rank 2 -> miss at 1, 2.
  assert r['image_to_text_R@1'] == 0.0 and r['image_to_text_R@5'] == 1.0 and r['image_to_text_R@10'] == 1.0
  r2 = retrieval_recall(images, texts, text_to_image, ks=(2, 3))
  assert r2['image_to_text_R@2'] == 0.5 and r2['image_to_text_R@3'] == 1.0


def test_imagenet_v2_numeric_folders_map_by_number(tmp_path):
  rng = np.random.default_rng(0)
  for c in range(12):  # '10' and '11' must not sort before '2'
    _write_png(str(tmp_path / 'imagenet_v2' / str(c) / f'{c}.png'), rng)
  items, classes = datasets.image_folder(str(tmp_path / 'imagenet_v2'))
  labels = [label for _, label in items]
  folders = [int(os.path.basename(os.path.dirname(path))) for path, _ in items]
  assert labels == folders == list(range(12)) and classes == [str(c) for c in range(12)]
  # The suite's loader maps them to ImageNet indices by number, through the same batches the scorer reads.
  # Each image's own label, in reading order: a wrong mapping with the same set of labels must fail.
  task = suite.DATASETS['imagenet_v2'].load(suite.DATASETS['imagenet_v2'], str(tmp_path), 32, 5, 0)
  got = np.concatenate([b['label'] for b in task.batches])
  assert got.tolist() == folders and len(task.classnames) == 1000


# ------------------------------------------------------------------------------------------------ tables

def test_table_rows_follow_the_paper_with_its_numbers_beside_ours():
  results = {key: {'status': 'done', 'top1': 0.5, 'mean_top1_top5': 0.5} for key in suite.SUITES['classification']}
  table = report.format_table('classification', results, 'EVA02-CLIP-B-16')
  rows = table.splitlines()[3:3 + 27]
  titles = [suite.DATASETS[k].title for k in suite.SUITES['classification']]
  assert [row[:len(t)] for row, t in zip(rows, titles)] == titles  # one row per dataset, in the paper's order
  # EVA-02-CLIP-B/16's row of the paper's Table 2, typed from the paper (not read from the JSON the code reads, so
  # a transcription error there fails here).
  b16 = [74.7, 67.0, 54.1, 82.5, 57.7, 62.3, 98.4, 87.7, 47.9, 86.3, 70.7, 24.8, 21.4, 78.6, 37.7, 53.1, 67.0, 51.2,
         75.9, 89.4, 46.3, 50.9, 92.2, 54.1, 60.7, 99.5, 80.2]
  for row, number in zip(rows, b16):
    assert row.split()[-3:-1] == ['50.0', f'{number:.1f}'], row
  assert table.splitlines()[3 + 27].split() == ['avg', '50.0', '65.6']
  imagenet = report.format_table('imagenet', results, 'EVA02-CLIP-L-14-336')  # the paper's EVA-02-CLIP-L/14+
  assert [line.split()[0] for line in imagenet.splitlines()[3:9]] == ['ImageNet-1K', 'ImageNet-A', 'ImageNet-R',
                                                                     'ImageNet-V2', 'ImageNet-Sketch', 'ObjectNet']
  assert '82.9' in imagenet.splitlines()[4]  # L/14+ on ImageNet-A
  assert 'no paper column' in report.format_table('video', {}, 'tiny')


def test_successors_show_their_readme_averages_and_retrieval_shows_mean_recall():
  # EVA-CLIP-18B/README.md's model cards, typed here (not read from the JSON the code reads).
  published = {'EVA-CLIP-8B': (79.4, 73.6, 86.2), 'EVA-CLIP-8B-448': (80.0, 73.7, 86.4),
               'EVA-CLIP-18B': (80.7, 75.0, 87.8)}
  recalls = {f'{d}_R@{k}': 0.5 + 0.01 * k for d in ('image_to_text', 'text_to_image') for k in (1, 5, 10)}
  results = {'flickr30k': dict(recalls), 'coco': dict(recalls)}
  for model, (classification, video, mean_recall) in published.items():
    table = report.format_table('classification', {}, model).splitlines()
    assert 'README' in table[1] and table[-1].split() == ['avg', '-', f'{classification}']
    assert report.format_table('video', {}, model).splitlines()[-1].split() == ['avg', '-', f'{video}']
    last = report.format_table('retrieval', results, model).splitlines()[-1]
    assert last.split() == ['mean', 'recall', '55.3', f'{mean_recall}']  # ours: the mean of 51, 55, 60 (x4)
  # A paper model's mean recall is the mean of its twelve published recalls (E/14+: Table 4).
  e14_plus = [93.9, 99.4, 99.8, 68.8, 87.8, 92.8, 78.8, 94.2, 96.8, 51.1, 75.0, 82.7]
  last = report.format_table('retrieval', results, 'EVA02-CLIP-bigE-14-plus').splitlines()[-1]
  assert last.split()[-1] == f'{sum(e14_plus) / 12:.1f}'


# --------------------------------------------------------------------- end to end on tfds mock data (tiny model)

TFDS_KEYS = ['imagenet1k', 'imagenet_v2', 'imagenet_sketch', 'cifar10', 'cifar100', 'mnist', 'cars', 'dtd', 'eurosat', 'flowers', 'food101', 'pcam', 'pets', 'resisc45', 'stl10', 'ucf101']
# tfds' random generator breaks on these (Sequence features of unequal lengths; 1000-way labels mostly outside a
# 200-class subset): their mock examples are written below, in the shape tfds would hand them over.
HAND_MOCKED = ['imagenet_a', 'imagenet_r', 'voc2007', 'coco']


def _hand_mocked_examples(self, split, decoders=None, read_config=None, **kwargs):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  del split, decoders, read_config, kwargs
  rng = np.random.default_rng(1)
  images = [_png(rng) for _ in range(3)]
  if self.name in ('imagenet_a', 'imagenet_r'):
    labels = np.asarray(class_subset(self.name)[:3], np.int64)
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  if self.name == 'voc':
    def gen():
      for i, image in enumerate(images):
        yield {'image': image, 'objects': {'label': np.arange(i + 1, dtype=np.int64) % 20,
                                           'bbox': np.tile(np.float32([[0.1, 0.2, 0.8, 0.9]]), (i + 1, 1))}}
    return tf.data.Dataset.from_generator(gen, output_signature={
        'image': tf.TensorSpec((), tf.string), 'objects': {'label': tf.TensorSpec((None,), tf.int64),
                                                           'bbox': tf.TensorSpec((None, 4), tf.float32)}})
  assert self.name == 'coco_captions', self.name
  captions = [[f'caption {i} {j}'.encode() for j in range(5 + i)] for i in range(3)]  # 5, 6, 7: all kept
  def gen():
    for image, texts in zip(images, captions):
      yield {'image': image, 'captions': {'text': np.asarray(texts, object)}}
  return tf.data.Dataset.from_generator(gen, output_signature={
      'image': tf.TensorSpec((), tf.string), 'captions': {'text': tf.TensorSpec((None,), tf.string)}})


@pytest.fixture(scope='module')
def tiny_extractor():
  return FeatureExtractor.for_model(ec.create_model('tiny', seed=0), batch_size=8)


def test_every_tfds_dataset_runs_on_mock_data(tiny_extractor, tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  # One template per dataset keeps the text tower's work small (the templates themselves are data, checked below).
  templates = suite.benchmark_templates
  monkeypatch.setattr(suite, 'benchmark_templates', lambda key: templates(key)[:1])
  seen = {}

  def recording(extractor, tokenizer, batches, classnames, templates, subset=None, progress=None):
    batches = list(batches)
    seen[current[0]] = (np.concatenate([b['label'] for b in batches]), len(classnames), subset)
    return score_zero_shot(extractor, tokenizer, batches, classnames, templates, subset=subset, progress=progress)

  monkeypatch.setattr(runner, 'score_zero_shot', recording)
  current = [None]
  results = {}
  tokenizer = get_tokenizer(context_length=32)
  for keys, mock in ((TFDS_KEYS, dict(num_examples=3)), (HAND_MOCKED, dict(as_dataset_fn=_hand_mocked_examples))):
    with tfds.testing.mock_data(**mock):
      for key in keys:
        current[0] = key
        results.update(runner.run_suite(tiny_extractor, tokenizer, [key], data_dir=str(tmp_path / 'tfds'),
                                        image_size=64, output_dir=str(tmp_path / 'out'), model_id='tiny',
                                        batch_size=8, log=lambda _: None))
  for key in TFDS_KEYS + HAND_MOCKED:
    assert results[key]['status'] == 'done', (key, results[key])
    if suite.DATASETS[key].task == 'classification':
      labels, num_names, subset = seen[key]
      num_classes = len(subset) if subset is not None else num_names
      assert results[key]['num_classes'] == num_classes
      assert labels.min() >= 0 and labels.max() < num_classes, key
      if key not in ('imagenet_a', 'imagenet_r', 'voc2007'):  # the builder's label range is the class-name list's
        assert num_names == tfds.builder(_tfds_name(key), data_dir=str(tmp_path)).info.features['label'].num_classes
  assert seen['imagenet_a'][0].tolist() == [0, 1, 2]  # ImageNet indices -> positions within the subset
  assert results['voc2007']['num_samples'] == 1 + 2 + 3  # one example per object
  assert results['coco']['num_images'] == 3 and results['coco']['num_captions'] == 5 + 6 + 7
  # Every dataset's number lands in its table's row.
  tables = report.format_suite('paper', results, 'EVA02-CLIP-B-16')
  for key in TFDS_KEYS + HAND_MOCKED:
    if suite.DATASETS[key].task == 'classification':
      rows = [line for line in tables.splitlines() if line.startswith(suite.DATASETS[key].title + ' ')]
      assert rows and all(row.split()[-3] != '-' for row in rows), (key, rows)
  coco = [line for line in tables.splitlines() if line.startswith('COCO ')]
  assert len(coco) == 2 and '-' not in coco[0].split()[2::2]
  # Class-text embeddings: ImageNet's five variants shared one classifier, kept on disk for a rerun.
  assert sum(len(names) == 1000 for names, _ in tiny_extractor.classifiers) == 1
  assert len(os.listdir(tmp_path / 'out' / 'text_embeddings')) == len(tiny_extractor.classifiers)


def _tfds_name(key):
  return {'imagenet1k': 'imagenet2012', 'cars': 'cars196', 'eurosat': 'eurosat/rgb', 'flowers': 'oxford_flowers102',
          'pcam': 'patch_camelyon', 'pets': 'oxford_iiit_pet', 'ucf101': 'ucf101/ucf101_1'}.get(key, key)


def test_templates_and_class_names_are_clip_benchmarks():
  assert suite.benchmark_templates('cifar10')[0] == 'a photo of a {}.'
  assert len(suite.benchmark_templates('imagenet1k')) == 80
  assert suite.benchmark_templates('ucf101') == suite.benchmark_templates('imagenet1k')  # its default
  assert len(suite.benchmark_classnames('country211')) == 211 and len(suite.benchmark_classnames('gtsrb')) == 43


# ------------------------------------------------------------------------------------ folder layouts, reruns

def test_folder_layouts_missing_datasets_and_reruns(tiny_extractor, tmp_path, capsys):
  rng = np.random.default_rng(0)
  data = tmp_path / 'data'
  # FGVC-Aircraft's official files.
  aircraft = data / 'fgvc_aircraft' / 'fgvc-aircraft-2013b' / 'data'
  os.makedirs(aircraft / 'images')
  (aircraft / 'variants.txt').write_text('707-320\nA300B4\nF-16A/B\n')
  (aircraft / 'images_variant_test.txt').write_text('0001 A300B4\n0002 F-16A/B\n0003 707-320\n')
  for i in (1, 2, 3):
    _write_png(str(aircraft / 'images' / f'000{i}.jpg'), rng)
  # ObjectNet: folders, the mapping files; 'chair' maps to ImageNet, 'mug_x' does not and is left out.
  objectnet = data / 'objectnet' / 'objectnet-1.0'
  for folder in ('chair', 'mug_x', 'alarm_clock'):
    _write_png(str(objectnet / 'images' / folder / 'a.png'), rng)
  os.makedirs(objectnet / 'mappings')
  (objectnet / 'mappings' / 'folder_to_objectnet_label.json').write_text(
      json.dumps({'chair': 'Chair', 'mug_x': 'Mug X', 'alarm_clock': 'Alarm clock'}))
  (objectnet / 'mappings' / 'objectnet_to_imagenet_1k.json').write_text(
      json.dumps({'Chair': 'folding chair; rocking chair', 'Alarm clock': 'analog clock'}))
  # Kinetics: centre frames by class folder.
  for c in ('abseiling', 'air drumming', 'archery', 'bowling', 'juggling', 'yoga'):
    _write_png(str(data / 'kinetics400' / 'val' / c / 'clip.jpg'), rng)
  tokenizer = get_tokenizer(context_length=32)
  keys = ['fgvc_aircraft', 'objectnet', 'kinetics400', 'birdsnap', 'flickr30k']
  results = runner.run_suite(tiny_extractor, tokenizer, keys, data_dir=str(data), image_size=64,
                             output_dir=str(tmp_path / 'out'), model_id='tiny', batch_size=8)
  assert results['fgvc_aircraft']['num_classes'] == 3 and results['fgvc_aircraft']['num_samples'] == 3
  assert results['objectnet']['num_classes'] == 2 and results['objectnet']['num_samples'] == 2
  assert results['kinetics400']['mean_top1_top5'] == pytest.approx(
      (results['kinetics400']['top1'] + results['kinetics400']['top5']) / 2)
  for key in ('birdsnap', 'flickr30k'):  # reported by name with the layout expected; the suite went on
    assert results[key]['status'] == 'missing'
    assert key in results[key]['message'] and suite.DATASETS[key].layout in results[key]['message']
  # A rerun skips what is done and tries again what was missing.
  out = capsys.readouterr().out
  assert 'MISSING' in out
  again = runner.run_suite(tiny_extractor, tokenizer, keys, data_dir=str(data), image_size=64,
                           output_dir=str(tmp_path / 'out'), model_id='tiny', batch_size=8)
  out = capsys.readouterr().out
  assert out.count('done before, skipped') == 3 and again['objectnet'] == results['objectnet']
  report.write_csv(str(tmp_path / 'r.csv'), again, 'EVA02-CLIP-B-16')
  report.write_json(str(tmp_path / 'r.json'), again, 'EVA02-CLIP-B-16', 'paper')
  assert 'objectnet,top1,' in (tmp_path / 'r.csv').read_text()
  assert json.loads((tmp_path / 'r.json').read_text())['paper']['imagenet']['objectnet'] == 62.3


# ------------------------------------------------------------------- evaluators on the training mesh (issue 11)

def _setup(strategy: str, mesh_shape: dict):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from eva_clip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('tiny_config', os.path.join(ROOT, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.mesh.update(mesh_shape)
  config.sharding.strategy = strategy
  mesh = sharding_lib.make_mesh(config.mesh)
  setup = step_lib.make_setup(config, mesh)
  return mesh, setup.model, setup.shardings.params, step_lib.init_state(setup).params


def _labelled_folder(root, rng, classes=('red', 'green', 'blue'), per_class=3):
  for c in classes:
    for i in range(per_class):
      _write_png(os.path.join(root, c, f'{i}.png'), rng)


def test_two_evaluations_compile_each_tower_once(tmp_path):
  mesh, model_fn, shardings, params = _setup('dp', dict(data=-1))
  _labelled_folder(str(tmp_path / 'val'), np.random.default_rng(0))
  _labelled_folder(str(tmp_path / 'renderedsst2' / 'test'), np.random.default_rng(1), ('negative', 'positive'), 2)
  evals = {'a': dict(kind='zero_shot', dataset='folder', data=str(tmp_path / 'val'), classnames='folder',
                     templates=['a {} photo.'], batch_size=8),
           'b': dict(kind='zero_shot', dataset='folder', data=str(tmp_path / 'val'), classnames='folder',
                     templates=['{}'], batch_size=8),
           'sst2': dict(kind='zero_shot', dataset='renderedsst2', data=str(tmp_path), batch_size=8)}
  evaluators = build_evaluators(evals, model_fn=model_fn, mesh=mesh, param_shardings=shardings)
  extractor = evaluators[0].extractor
  assert all(e.extractor is extractor for e in evaluators)  # one extractor for all
  first = evaluators[0].run(params)
  assert first['a/num_samples'] == 9 and 0 <= first['a/top1'] <= 1
  second_params = jax.tree.map(lambda x: x * 1.0, params)  # a later step: new arrays, same shapes
  second = {}
  for evaluator in evaluators:
    second.update(evaluator.run(second_params))
  assert second['sst2/num_samples'] == 4 and second['sst2/num_classes'] == 2
  assert extractor.encode_image._cache_size() == 1 and extractor.encode_text._cache_size() == 1
  assert evaluators[0].run(params) == first  # same parameters, same numbers (the text cache was refreshed)


def test_under_fsdp_the_extractor_keeps_the_training_shardings():
  assert jax.device_count() == 8
  mesh, model_fn, shardings, params = _setup('fsdp', dict(data=1, fsdp=8))
  extractor = FeatureExtractor(model_fn, mesh, shardings, batch_size=8)
  images = np.zeros((8, 64, 64, 3), np.float32)
  for encode, x in ((extractor.encode_image, images), (extractor.encode_text, np.zeros((8, 32), np.int32))):
    # The compiled towers take the parameters as training shards them (a tower's unused parameters: None).
    in_params = encode.lower(params, x).compile().input_shardings[0][0]
    got = jax.tree.leaves(in_params, is_leaf=lambda s: s is None)
    expected, leaves = jax.tree.leaves(shardings), jax.tree.leaves(params)
    assert len(got) == len(expected) and sum(g is not None for g in got) > len(got) // 3
    assert all(g is None or g.is_equivalent_to(e, leaf.ndim) for g, e, leaf in zip(got, expected, leaves))
  live = sum(a.nbytes for a in jax.live_arrays())
  big = [leaf for leaf in jax.tree.leaves(params) if leaf.size >= 4096]
  assert big and all(not leaf.sharding.is_fully_replicated for leaf in big)  # really sharded, not a copy
  features = extractor.bind(params).images(images[:5])
  assert features.shape == (5, 64)
  assert sum(a.nbytes for a in jax.live_arrays()) <= live + 8 * 64 * 4  # no copy of the parameters was made
  # The same numbers as with the parameters replicated.
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), shardings)
  reference = FeatureExtractor(model_fn, mesh, replicated, batch_size=8).bind(jax.device_put(params, replicated))
  np.testing.assert_allclose(features, reference.images(images[:5]), atol=2e-5)


def test_readme_documents_reproducing_the_tables():
  readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  section = readme[readme.index("## Reproducing the paper's tables"):]
  section = section[:section.index('\n## ')]
  for suite_name in suite.SUITES:
    assert f'--suite={suite_name}' in section or f'`{suite_name}`' in section
  for key in suite.SUITES['paper']:  # every dataset's layout: its folder or its tfds builder
    assert f'{key}/' in section or key in section, key
  assert 'python -m eva_clip_jax.evaluate' in section and '--data_dir=' in section


def test_two_processes_with_uneven_shares_score_like_one(tmp_path):
  """Each encoder call is a collective over processes: a process whose share ran out must keep calling."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  worker = os.path.join(ROOT, 'tests', 'multiprocess_eval_worker.py')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(tmp_path / f'{i}.json')], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads((tmp_path / f'{i}.json').read_text()) for i in range(2)]
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  from multiprocess_eval_worker import shares  # pylint: disable=g-import-not-at-top
  one = FeatureExtractor.for_model(ec.create_model('tiny', seed=3), batch_size=4)
  expected = score_zero_shot(one, ec.get_tokenizer('tiny'), [b for share in shares() for b in share],
                             ['red', 'green', 'blue'], ['a {} thing'])
  assert results[0] == results[1] == expected and expected['num_samples'] == 16


def test_evaluate_reports_bad_input_as_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('EVA_CLIP_JAX_TRACEBACK', None)
  proc = subprocess.run([sys.executable, '-m', 'eva_clip_jax.evaluate', '--config=configs/tiny.py', '--suite=video',
                         '--datasets=kinetics400,nope', f'--data_dir={tmp_path}'], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=300)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert "--datasets ['nope'] are not in suite 'video'" in proc.stderr

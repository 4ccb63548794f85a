"""Evaluators built from a config block, usable from `python -m eva_clip_jax.evaluate` and from training.

  config.evals.imagenet = dict(kind='zero_shot', data='/data/imagenet/val', format='folder',
                               classnames='imagenet', templates='openai', every_steps=5000)
  config.evals.flickr = dict(kind='retrieval', data='/data/flickr30k/test.csv')

`evaluator.run(model)` returns {'imagenet/top1': ..., ...}. Formats: folder, shards, tfds:NAME (zero-shot);
csv (retrieval).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from eva_clip_jax.evaluation import datasets
from eva_clip_jax.evaluation.features import FeatureExtractor
from eva_clip_jax.evaluation.retrieval import retrieval_recall
from eva_clip_jax.evaluation.zero_shot import imagenet_metadata, read_lines, topk_accuracy, zero_shot_classifier
from eva_clip_jax.tokenizer import get_tokenizer


def _names_and_templates(cfg: Mapping[str, Any], folder_classes: list[str] | None):
  classnames = cfg.get('classnames', 'imagenet')
  templates = cfg.get('templates', 'openai')
  imagenet_names, openai_templates = imagenet_metadata()
  if classnames == 'imagenet':
    classnames = imagenet_names
  elif classnames == 'folder':
    classnames = [c.replace('_', ' ') for c in folder_classes or []]
  elif isinstance(classnames, str):
    classnames = read_lines(classnames)
  templates = openai_templates if templates == 'openai' else (
      read_lines(templates) if isinstance(templates, str) else list(templates))
  return list(classnames), list(templates)


class ZeroShotEvaluator:

  def __init__(self, name: str, cfg: Mapping[str, Any]):
    self.name, self.cfg = name, dict(cfg)
    self.every_steps = int(self.cfg.get('every_steps', 0))

  def run(self, model: nnx.Module) -> dict[str, float]:
    cfg, spec = self.cfg, model.spec
    size, batch_size = spec.vision.image_size, int(cfg.get('batch_size', 64))
    fmt, folder_classes = cfg.get('format', 'folder'), None
    if fmt == 'folder':
      batches, folder_classes = datasets.folder_batches(cfg['data'], size, batch_size, cfg.get('num_workers', 0))
    elif fmt == 'shards':
      batches = datasets.shard_batches(cfg['data'], size, batch_size, spec.text.context_length)
    elif fmt.startswith('tfds:'):
      batches = datasets.tfds_batches(fmt[5:], size, batch_size, cfg.get('split', 'validation'), cfg.get('data'))
    else:
      raise ValueError(f'{self.name}: unknown zero-shot data format {fmt!r} (folder, shards, tfds:NAME)')
    classnames, templates = _names_and_templates(cfg, folder_classes)
    extractor = FeatureExtractor(model)
    tokenizer = get_tokenizer(context_length=spec.text.context_length)
    classifier = zero_shot_classifier(extractor, tokenizer, classnames, templates)
    features, others = extractor.images_from(batches)
    labels = np.concatenate([o['label'] for o in others])
    keep = labels >= 0
    ks = (1, min(5, len(classnames)))
    local = topk_accuracy(features[keep] @ classifier, labels[keep], ks) if keep.any() else {f'top{k}': 0. for k in ks}
    counts = np.asarray([local[f'top{k}'] * keep.sum() for k in ks] + [keep.sum()], np.float64)
    if jax.process_count() > 1:  # each process scored its own slice of the data
      counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
    result = {f'{self.name}/top{k}': float(counts[i] / counts[-1]) for i, k in enumerate(ks)}
    result[f'{self.name}/num_samples'] = int(counts[-1])
    return result


class RetrievalEvaluator:

  def __init__(self, name: str, cfg: Mapping[str, Any]):
    self.name, self.cfg = name, dict(cfg)
    self.every_steps = int(self.cfg.get('every_steps', 0))

  def run(self, model: nnx.Module) -> dict[str, float]:
    cfg, spec = self.cfg, model.spec
    fmt, batch_size = cfg.get('format', 'csv'), int(cfg.get('batch_size', 64))
    extractor = FeatureExtractor(model)
    if fmt == 'csv':  # path,caption rows; several captions may share an image
      paths, captions, text_to_image = datasets.caption_pairs(cfg['data'])
      tokenizer = get_tokenizer(context_length=spec.text.context_length)
      image_features, _ = extractor.images_from(datasets.image_batches(paths, spec.vision.image_size, batch_size))
      text_features = np.concatenate([extractor.texts(tokenizer(captions[i:i + batch_size]))
                                      for i in range(0, len(captions), batch_size)])
    elif fmt == 'shards':  # one caption per image; every process reads all of it
      batches = [b for b in datasets.shard_batches(cfg['data'], spec.vision.image_size, batch_size,
                                                   spec.text.context_length, shard_by_process=False)]
      image_features = np.concatenate([extractor.images(b['image']) for b in batches])
      text_features = np.concatenate([extractor.texts(b['text']) for b in batches])
      keep = np.concatenate([b['valid'] for b in batches])
      image_features, text_features = image_features[keep], text_features[keep]
      text_to_image = np.arange(image_features.shape[0])
    else:
      raise ValueError(f"{self.name}: retrieval reads format='csv' (path,caption rows) or 'shards'")
    recall = retrieval_recall(image_features, text_features, text_to_image)
    return {f'{self.name}/{k}': v for k, v in recall.items()}


KINDS = {'zero_shot': ZeroShotEvaluator, 'retrieval': RetrievalEvaluator}


def build_evaluators(evals: Mapping[str, Mapping[str, Any]]) -> list:
  evaluators = []
  for name, cfg in evals.items():
    kind = cfg.get('kind')
    if kind not in KINDS:
      raise ValueError(f'evals.{name}: kind must be one of {sorted(KINDS)}, got {kind!r}')
    evaluators.append(KINDS[kind](name, cfg))
  return evaluators

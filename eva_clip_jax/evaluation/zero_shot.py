"""Zero-shot classification as the paper (through CLIP_benchmark) measures it.

Class names x prompt templates -> normalised text embeddings, averaged per class and re-normalised -> a
[embed_dim, classes] classifier; image features @ classifier -> logits -> top-1 / top-5 accuracy and the mean
per-class recall. `score_zero_shot` is the one scoring function: the CLI's suite and the in-training evaluators
both call it. Each process scores its own slice of the data; the counts are summed over processes.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from eva_clip_jax import storage
from eva_clip_jax.errors import InputError
from eva_clip_jax.evaluation.features import in_lockstep


def _asset(name: str):
  return json.loads(importlib.resources.files('eva_clip_jax').joinpath('assets', name).read_text(encoding='utf-8'))


def imagenet_metadata() -> tuple[list[str], list[str]]:
  """ImageNet-1k class names and the 80 OpenAI prompt templates ('a photo of a {}.')."""
  data = _asset('imagenet_zeroshot.json')
  return data['classnames'], data['templates']


def benchmark_classnames(key: str) -> list[str]:
  """CLIP_benchmark's class names for a dataset (assets/clip_benchmark_en_classnames.json)."""
  names = _asset('clip_benchmark_en_classnames.json')
  if key not in names:
    raise InputError(f'no CLIP_benchmark class names for {key!r}; known: {", ".join(sorted(names))}')
  return names[key]


def benchmark_templates(key: str) -> list[str]:
  """CLIP_benchmark's prompt templates for a dataset; ImageNet's for any dataset it has none for (as it does)."""
  templates = _asset('clip_benchmark_en_zeroshot_classification_templates.json')
  return [t.replace('{c}', '{}') for t in templates.get(key, templates['imagenet1k'])]


def imagenet_wnids() -> dict[str, list[str]]:
  """{'imagenet_wordnet_ids': the 1000 ids in class order, 'imagenet_a_wnids': 200, 'imagenet_r_wnids': 200}."""
  return _asset('clip_benchmark_imagenet_variant_wnids.json')


def class_subset(name: str) -> list[int]:
  """ImageNet class indices (ascending) of ImageNet-A ('imagenet_a') or ImageNet-R ('imagenet_r')."""
  ids = imagenet_wnids()
  subset = set(ids[f'{name}_wnids'])
  return [i for i, wnid in enumerate(ids['imagenet_wordnet_ids']) if wnid in subset]


def read_lines(path: str) -> list[str]:
  """The non-empty lines of a user's text file (class names, templates; local or in a bucket)."""
  return [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]


def zero_shot_classifier(extractor, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                         batch_size: int = 256) -> np.ndarray:
  """[embed_dim, len(classnames)] float32: per class, the re-normalised mean of its prompts' text features.

  Cached on the extractor (when it has a cache) per (class names, templates): ImageNet's variants share one."""
  if not classnames or not templates:
    raise InputError('zero-shot classification needs class names and at least one template')
  templates = [t.replace('{c}', '{}') for t in templates]
  bad = [t for t in templates if '{}' not in t]
  if bad:
    raise InputError(f"templates must contain '{{}}' (or '{{c}}') for the class name: {bad[:3]}")
  cache = getattr(extractor, 'classifiers', None)
  key = (tuple(classnames), tuple(templates))
  if cache is not None and key in cache:
    return cache[key]
  prompts = [template.format(name) for name in classnames for template in templates]
  features = np.concatenate([extractor.texts(tokenizer(prompts[i:i + batch_size]))
                             for i in range(0, len(prompts), batch_size)]).astype(np.float32)
  # Each prompt's feature normalised before the average (CLIP_benchmark's order), whatever the extractor returned.
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  per_class = features.reshape(len(classnames), len(templates), -1).mean(axis=1)
  per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
  classifier = per_class.T.astype(np.float32)
  if cache is not None:
    cache[key] = classifier
  return classifier


def _ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Position of each label in its row's descending order (ties broken by class index, as a stable sort)."""
  order = np.argsort(-logits, axis=1, kind='stable')
  return np.argmax(order == labels[:, None], axis=1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Fraction of samples whose label is among the k highest logits (ties broken by class index)."""
  labels = np.asarray(labels)
  if labels.shape[0] == 0:
    raise InputError('no labelled samples to score')
  ranks = _ranks(np.asarray(logits), labels)
  return {f'top{k}': float(np.mean(ranks < k)) for k in ks}


def classification_counts(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, 3] float64: per true class, (samples, top-1 hits, top-5 hits). Summable over processes."""
  labels = np.asarray(labels, np.int64)
  counts = np.zeros((num_classes, 3), np.float64)
  if labels.size:
    ranks = _ranks(np.asarray(logits), labels)
    np.add.at(counts, labels, np.stack([np.ones_like(ranks), ranks < 1, ranks < 5], axis=1).astype(np.float64))
  return counts


def metrics_from_counts(counts: np.ndarray) -> dict[str, float]:
  """top1, top5 and mean_top1_top5 (Kinetics' metric; both left out with fewer than 5 classes, where CLIP_benchmark
  reports NaN), mean_per_class_recall (over the classes that have samples, as scikit-learn's balanced accuracy that
  CLIP_benchmark calls) and num_samples."""
  total = counts[:, 0].sum()
  if total == 0:
    raise InputError('no labelled samples to score')
  present = counts[:, 0] > 0
  top1, top5 = float(counts[:, 1].sum() / total), float(counts[:, 2].sum() / total)
  result = {'top1': top1, 'top5': top5, 'mean_top1_top5': (top1 + top5) / 2}
  if counts.shape[0] < 5:
    result = {'top1': top1}
  result['mean_per_class_recall'] = float(np.mean(counts[present, 1] / counts[present, 0]))
  result['num_samples'] = int(total)
  return result


def score_zero_shot(extractor, tokenizer, batches: Iterable[dict], classnames: Sequence[str],
                    templates: Sequence[str], *, subset: Sequence[int] | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, float]:
  """Zero-shot metrics over `batches` of {'image', 'label'} (this process's share; counts summed over processes).

  subset: for ImageNet-A/-R, the class indices (into `classnames`) the set uses: the classifier is restricted to
    those columns and a label must be a position within the subset. Labels < 0 are padding and not scored.
  """
  classifier = zero_shot_classifier(extractor, tokenizer, classnames, templates)
  if subset is not None:
    classifier = classifier[:, np.asarray(subset)]
  num_classes = classifier.shape[1]
  counts = np.zeros((num_classes, 3), np.float64)
  seen = False
  for batch, encoded in in_lockstep(batches, {'image': extractor.images}):
    features = encoded['image']
    seen = True
    labels = np.asarray(batch['label'])
    keep = labels >= 0
    if keep.any():
      if labels[keep].max() >= num_classes:
        raise InputError(f'label {labels[keep].max()} out of range for {num_classes} classes')
      counts += classification_counts(features[keep] @ classifier, labels[keep], num_classes)
    if progress:
      progress(len(labels))
  if not seen:
    raise InputError('the evaluation data yielded no batches')
  if jax.process_count() > 1:  # integers: exact through jax's 32-bit transfer, unlike float64 counts
    gathered = multihost_utils.process_allgather(counts.astype(np.int32))
    counts = np.asarray(gathered).sum(axis=0).astype(np.float64)
  return metrics_from_counts(counts)


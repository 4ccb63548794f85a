"""Zero-shot classification as the paper measures it.

Class names x prompt templates -> normalised text embeddings, averaged per class and re-normalised -> a
[embed_dim, classes] classifier; image features @ classifier -> logits -> top-1 and top-5 accuracy.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from eva_clip_jax.evaluation.features import FeatureExtractor

_ASSET = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'assets', 'imagenet_zeroshot.json')


def imagenet_metadata() -> tuple[list[str], list[str]]:
  """ImageNet-1k class names and the 80 OpenAI prompt templates ('a photo of a {}.')."""
  with open(_ASSET) as f:
    data = json.load(f)
  return data['classnames'], data['templates']


def read_lines(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def zero_shot_classifier(extractor: FeatureExtractor, tokenizer, classnames: Sequence[str],
                         templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
  """[embed_dim, len(classnames)] float32: per class, the re-normalised mean of its prompts' text features."""
  if not classnames or not templates:
    raise ValueError('zero-shot classification needs class names and at least one template')
  bad = [t for t in templates if '{}' not in t]
  if bad:
    raise ValueError(f"templates must contain '{{}}' for the class name: {bad[:3]}")
  prompts = [template.format(name) for name in classnames for template in templates]
  features = np.concatenate([extractor.texts(tokenizer(prompts[i:i + batch_size]))
                             for i in range(0, len(prompts), batch_size)])
  per_class = features.reshape(len(classnames), len(templates), -1).mean(axis=1)
  per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
  return per_class.T.astype(np.float32)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Fraction of samples whose label is among the k highest logits (ties broken by class index)."""
  labels = np.asarray(labels)
  if labels.shape[0] == 0:
    raise ValueError('no labelled samples to score')
  order = np.argsort(-logits, axis=1, kind='stable')
  return {f'top{k}': float(np.mean((order[:, :k] == labels[:, None]).any(axis=1))) for k in ks}


def evaluate_zero_shot(extractor: FeatureExtractor, tokenizer, batches, classnames: Sequence[str],
                       templates: Sequence[str]) -> dict[str, float]:
  """Top-1/top-5 of zero-shot classification over `batches` of {'image', 'label'}."""
  classifier = zero_shot_classifier(extractor, tokenizer, classnames, templates)
  features, others = extractor.images_from(batches)
  labels = np.concatenate([o['label'] for o in others])
  keep = labels >= 0
  if not keep.all():
    features, labels = features[keep], labels[keep]
  result = topk_accuracy(features @ classifier, labels, ks=(1, min(5, len(classnames))))
  result['num_samples'] = int(labels.shape[0])
  return result

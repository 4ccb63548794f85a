"""Evaluators built once from a config block, run from training and from `python -m eva_clip_jax.evaluate`.

  config.evals.imagenet = dict(kind='zero_shot', data='/data/imagenet/val', format='folder',
                               classnames='imagenet', templates='openai', every_steps=5000)
  config.evals.flickr = dict(kind='retrieval', data='/data/flickr30k/test.csv')
  config.evals.cifar10 = dict(kind='benchmark', dataset='cifar10', data='/data/tfds')  # a suite dataset
  config.evals.val = dict(kind='contrastive_val', data='/data/val/{00000..00009}.tar', every_steps=1000)

  evaluators = build_evaluators(config.evals, model_fn=setup.model, mesh=mesh, param_shardings=shardings.params)
  evaluator.run(state.params)  # {'imagenet/top1': ..., ...}

All evaluators of one call share one FeatureExtractor: its two jitted towers take the parameters as they are
sharded for training, and compile once for the whole run. Zero-shot formats: folder, shards, csv (path,label rows),
tfds:NAME; retrieval formats: csv (path,caption rows), shards; benchmark: any key of `suite.DATASETS`;
contrastive_val: held-out shards (validation loss and ranks, `contrastive_val.py`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from eva_clip_jax.evaluation import datasets
from eva_clip_jax.evaluation.features import BoundExtractor, FeatureExtractor
from eva_clip_jax.evaluation.retrieval import retrieval_recall, score_retrieval
from eva_clip_jax.evaluation.zero_shot import imagenet_metadata, read_lines, score_zero_shot
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


class _Evaluator:
  """name, every_steps, cfg; `run(params)` scores the parameters (a pure dict sharded as param_shardings)."""

  def __init__(self, name: str, cfg: Mapping[str, Any], extractor: FeatureExtractor | None = None,
               model_fn: Callable[[Any], nnx.Module] | None = None):
    self.name, self.cfg = name, dict(cfg)
    self.every_steps = int(self.cfg.get('every_steps', 0))
    self.extractor, self.model_fn = extractor, model_fn

  def _bind(self, params) -> tuple[BoundExtractor, Any]:
    """(the extractor bound to `params`, the model's spec). A bare nnx.Module is accepted too (notebooks)."""
    if isinstance(params, nnx.Module):
      return FeatureExtractor.for_model(params), params.spec
    return self.extractor.bind(params), self.model_fn(params).spec

  def run(self, params) -> dict[str, float]:
    bound, spec = self._bind(params)
    tokenizer = get_tokenizer(context_length=spec.text.context_length)
    return {f'{self.name}/{k}': v for k, v in self.score(bound, tokenizer, spec).items()}


class ZeroShotEvaluator(_Evaluator):

  def score(self, bound, tokenizer, spec) -> dict[str, float]:
    cfg = self.cfg
    size, batch_size = spec.vision.image_size, int(cfg.get('batch_size', 64))
    fmt, folder_classes = cfg.get('format', 'folder'), None
    workers = int(cfg.get('num_workers', 0))
    if fmt == 'folder':
      batches, folder_classes = datasets.folder_batches(cfg['data'], size, batch_size, workers)
    elif fmt == 'shards':
      batches = datasets.shard_batches(cfg['data'], size, batch_size, spec.text.context_length)
    elif fmt == 'csv':
      batches = datasets.labelled_batches(datasets.labelled_csv(cfg['data']), size, batch_size, workers)
    elif fmt.startswith('tfds:'):
      batches = datasets.tfds_batches(fmt[5:], size, batch_size, cfg.get('split', 'validation'),
                                      cfg.get('data_dir'))
    else:
      raise ValueError(f'{self.name}: unknown zero-shot data format {fmt!r} (folder, shards, csv, tfds:NAME)')
    classnames, templates = _names_and_templates(cfg, folder_classes)
    return score_zero_shot(bound, tokenizer, batches, classnames, templates)


class RetrievalEvaluator(_Evaluator):

  def score(self, bound, tokenizer, spec) -> dict[str, float]:
    cfg = self.cfg
    fmt, batch_size = cfg.get('format', 'csv'), int(cfg.get('batch_size', 64))
    if fmt == 'csv':  # path,caption rows; several captions may share an image
      paths, captions, text_to_image = datasets.caption_pairs(cfg['data'])
      batches = datasets.image_batches(paths, spec.vision.image_size, batch_size)
      return score_retrieval(bound, tokenizer, batches, captions, text_to_image, batch_size)
    if fmt == 'shards':  # one caption per image; every process reads all of it
      batches = list(datasets.shard_batches(cfg['data'], spec.vision.image_size, batch_size,
                                            spec.text.context_length, shard_by_process=False))
      image_features = np.concatenate([bound.images(b['image']) for b in batches])
      text_features = np.concatenate([bound.texts(b['text']) for b in batches])
      keep = np.concatenate([b['valid'] for b in batches]).astype(bool)
      image_features, text_features = image_features[keep], text_features[keep]
      return retrieval_recall(image_features, text_features, np.arange(image_features.shape[0]))
    raise ValueError(f"{self.name}: retrieval reads format='csv' (path,caption rows) or 'shards'")


class BenchmarkEvaluator(_Evaluator):
  """One dataset of the paper's suite (`suite.DATASETS`), read from the prepared data_dir in cfg['data']."""

  def score(self, bound, tokenizer, spec) -> dict[str, float]:
    from eva_clip_jax.evaluation.runner import evaluate_dataset  # pylint: disable=g-import-not-at-top
    result = evaluate_dataset(bound, tokenizer, self.cfg['dataset'], self.cfg['data'], spec.vision.image_size,
                              int(self.cfg.get('batch_size', 64)), int(self.cfg.get('num_workers', 0)))
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


class ContrastiveValEvaluator(_Evaluator):
  """Validation loss and mean / median rank on held-out shards (`contrastive_val.py`)."""

  def run(self, params) -> dict[str, float]:
    scale = params.logit_scale[...] if isinstance(params, nnx.Module) else params['logit_scale']
    self._logit_scale = float(np.exp(np.asarray(jax.device_get(scale), np.float64)))
    return super().run(params)

  def score(self, bound, tokenizer, spec) -> dict[str, float]:
    from eva_clip_jax.evaluation.contrastive_val import score_contrastive_val  # pylint: disable=g-import-not-at-top
    batch_size = int(self.cfg.get('batch_size', 64))
    batches = datasets.shard_batches(self.cfg['data'], spec.vision.image_size, batch_size, spec.text.context_length,
                                     shard_by_process=False)
    return score_contrastive_val(bound, batches, self._logit_scale, batch_size)


KINDS = {'zero_shot': ZeroShotEvaluator, 'retrieval': RetrievalEvaluator, 'benchmark': BenchmarkEvaluator,
         'contrastive_val': ContrastiveValEvaluator}


def build_evaluators(evals_config: Mapping[str, Mapping[str, Any]], *,
                     model_fn: Callable[[Any], nnx.Module] | None = None, mesh: Mesh | None = None,
                     param_shardings: Any = None, batch_size: int | None = None) -> list:
  """Evaluators for each block of `evals_config`, sharing one FeatureExtractor on `mesh` (built here, once).

  model_fn: params -> nnx.Module, pure (used inside jit); param_shardings: the parameters' NamedShardings (training's).
  batch_size: the per-process batch the towers are compiled for (default: the largest batch_size of the blocks).
  Without model_fn, `run` takes an nnx.Module and extracts on its own replicated copy (each call compiles anew:
  only for notebooks and the old call in training/loop.py until it passes model_fn).
  """
  for name, cfg in evals_config.items():
    if cfg.get('kind') not in KINDS:
      raise ValueError(f'evals.{name}: kind must be one of {sorted(KINDS)}, got {cfg.get("kind")!r}')
  extractor = None
  if model_fn is not None:
    sizes = [int(cfg.get('batch_size', 64)) for cfg in evals_config.values()]
    extractor = FeatureExtractor(model_fn, mesh, param_shardings, batch_size or max(sizes + [1]))
  return [KINDS[cfg['kind']](name, cfg, extractor, model_fn) for name, cfg in evals_config.items()]

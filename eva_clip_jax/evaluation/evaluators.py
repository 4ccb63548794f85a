"""Evaluators named in the config and built once, run from training and from `python -m eva_clip_jax.evaluate`.

  config.evals.imagenet = dict(kind='zero_shot', dataset='folder', data='/data/imagenet/val',
                               classnames='imagenet', templates='openai', every_steps=5000)
  config.evals.cifar10 = dict(kind='zero_shot', dataset='cifar10', data='/data/eval')  # a dataset of the suite
  config.evals.flickr = dict(kind='retrieval', dataset='captions_csv', data='gs://bucket/flickr30k/test.csv')
  config.evals.val = dict(kind='contrastive_val', data='/data/val/{00000..00009}.tar', every_steps=1000)

  evaluators = build_evaluators(config.evals, model_fn=setup.model, mesh=mesh, param_shardings=shardings.params)
  evaluator.run(params)  # {'imagenet/top1': ..., ...}

`dataset` is a key of `suite.DATASETS` (the one registry: the paper's datasets, read from their prepared data_dir,
and the generic readers of `generic.py`, read from the folder, CSV or shards in `data`); zero-shot and retrieval
evaluators score it through `runner.evaluate_dataset`, the route the suite takes too. The caller hands in the model
function, mesh and parameter shardings (evaluation knows no trainer); all evaluators of one call share one
FeatureExtractor, whose two jitted towers compile once for the whole run.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from eva_clip_jax.errors import InputError
from eva_clip_jax.evaluation import datasets, runner, suite
from eva_clip_jax.evaluation.contrastive_val import score_contrastive_val
from eva_clip_jax.evaluation.features import BoundExtractor, FeatureExtractor
from eva_clip_jax.tokenizer import get_tokenizer

# Config keys every evaluator reads itself; the rest of a block are its dataset's options.
_COMMON = ('kind', 'dataset', 'data', 'batch_size', 'num_workers', 'every_steps')


class _Evaluator:
  """name, every_steps, cfg; `run(params)` scores the parameters (a pure dict sharded as param_shardings)."""

  def __init__(self, name: str, cfg: Mapping[str, Any], extractor: FeatureExtractor | None = None,
               model_fn: Callable[[Any], nnx.Module] | None = None):
    self.name, self.cfg = name, dict(cfg)
    self.every_steps = int(self.cfg.get('every_steps', 0))
    self.batch_size = int(self.cfg.get('batch_size', 64))
    self.extractor, self.model_fn = extractor, model_fn

  def _bind(self, params) -> tuple[BoundExtractor, Any]:
    """(the extractor bound to `params`, the model's spec). A bare nnx.Module is accepted too (notebooks)."""
    if isinstance(params, nnx.Module):
      return FeatureExtractor.for_model(params), params.spec
    return self.extractor.bind(params), self.model_fn(params).spec

  def run(self, params) -> dict[str, float]:
    bound, spec = self._bind(params)
    tokenizer = get_tokenizer(context_length=spec.text.context_length)
    return {f'{self.name}/{k}': v for k, v in self.score(bound, tokenizer, spec, params).items()}


class DatasetEvaluator(_Evaluator):
  """Zero-shot classification or retrieval on one dataset of `suite.DATASETS` (kind must match its task)."""

  TASKS = {'zero_shot': 'classification', 'retrieval': 'retrieval'}

  def __init__(self, name, cfg, extractor=None, model_fn=None):
    super().__init__(name, cfg, extractor, model_fn)
    key = self.cfg.get('dataset')
    if key not in suite.DATASETS:
      raise InputError(f'evals.{name}: dataset must be one of {", ".join(suite.DATASETS)}; got {key!r}')
    task = suite.DATASETS[key].task
    if self.TASKS[self.cfg['kind']] != task:
      raise InputError(f"evals.{name}: dataset {key!r} is a {task} dataset, not kind={self.cfg['kind']!r}")
    self.dataset = key
    self.options = {k: v for k, v in self.cfg.items() if k not in _COMMON}

  def score(self, bound, tokenizer, spec, params) -> dict[str, float]:
    del params
    options = dict(self.options)
    if 'context_length' in suite.DATASETS[self.dataset].options:  # shards are tokenised for this model
      options['context_length'] = spec.text.context_length
    result = runner.evaluate_dataset(bound, tokenizer, self.dataset, self.cfg['data'], spec.vision.image_size,
                                     self.batch_size, int(self.cfg.get('num_workers', 0)), options,
                                     show_progress=False)
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


class ContrastiveValEvaluator(_Evaluator):
  """Validation loss and mean / median rank on held-out shards (`contrastive_val.py`)."""

  def score(self, bound, tokenizer, spec, params) -> dict[str, float]:
    del tokenizer
    scale = params.logit_scale[...] if isinstance(params, nnx.Module) else params['logit_scale']
    logit_scale = float(np.exp(np.asarray(jax.device_get(scale), np.float64)))
    batches = datasets.shard_batches(self.cfg['data'], spec.vision.image_size, self.batch_size,
                                     spec.text.context_length, shard_by_process=False)
    return score_contrastive_val(bound, batches, logit_scale, self.batch_size)


KINDS = {'zero_shot': DatasetEvaluator, 'retrieval': DatasetEvaluator, 'contrastive_val': ContrastiveValEvaluator}


def build_evaluators(evals_config: Mapping[str, Mapping[str, Any]], *,
                     model_fn: Callable[[Any], nnx.Module] | None = None, mesh: Mesh | None = None,
                     param_shardings: Any = None, batch_size: int | None = None,
                     trace_context: Callable[[], Any] | None = None) -> list:
  """Evaluators for the blocks of `evals_config` that name their data (the others are logged and left out, so a
  config can list evaluations whose data a machine lacks), sharing one FeatureExtractor on `mesh`, built here once.

  model_fn: params -> nnx.Module, pure (used inside jit); param_shardings: the parameters' NamedShardings (training's).
  batch_size: the per-process batch the towers are compiled for (default: the largest batch_size of the blocks).
  trace_context: what the towers are traced in (FeatureExtractor's; training passes its activation sharding).
  Without model_fn, `run` takes an nnx.Module and extracts on its own replicated copy (each call compiles anew:
  for notebooks).
  """
  for name, cfg in evals_config.items():
    if cfg.get('kind') not in KINDS:
      raise InputError(f'evals.{name}: kind must be one of {sorted(KINDS)}, got {cfg.get("kind")!r}')
  skipped = sorted(name for name, cfg in evals_config.items() if not cfg.get('data'))
  if skipped:
    logging.info('Evaluations without data, skipped: %s', ', '.join(skipped))
  evals_config = {name: cfg for name, cfg in evals_config.items() if cfg.get('data')}
  extractor = None
  if model_fn is not None and evals_config:
    sizes = [int(cfg.get('batch_size', 64)) for cfg in evals_config.values()]
    extractor = FeatureExtractor(model_fn, mesh, param_shardings, batch_size or max(sizes),
                                 **({'trace_context': trace_context} if trace_context else {}))
  return [KINDS[cfg['kind']](name, cfg, extractor, model_fn) for name, cfg in evals_config.items()]

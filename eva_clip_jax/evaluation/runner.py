"""Running one dataset of the suite, or all of a suite's: results kept per dataset (a rerun skips what is done),
class-text embeddings kept per (model, dataset), a missing dataset reported by name and layout while the suite
goes on, and a progress line per dataset."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from eva_clip_jax import storage
from eva_clip_jax.errors import InputError
from eva_clip_jax.evaluation import datasets, suite
from eva_clip_jax.evaluation.features import paired_features
from eva_clip_jax.evaluation.retrieval import retrieval_recall, score_retrieval
from eva_clip_jax.evaluation.tasks import PairedRetrieval, Retrieval
from eva_clip_jax.evaluation.zero_shot import score_zero_shot, zero_shot_classifier
from eva_clip_jax.progress import Progress


def _image_progress(name: str, total: int | None) -> Progress:
  """'name  1234/50000 images  2%  310 img/s' on stderr: rewritten in place on a terminal, a line per 10%
  elsewhere; process 0 only. Called with each batch's image count."""

  def describe(progress: Progress) -> str:
    of = f'/{total}' if total else ''
    pct = f' {100 * progress.done / total:3.0f}%' if total else ''
    return f'{name}  {progress.done}{of} images{pct}  {progress.rate:.0f} img/s'

  return Progress(total, stream=sys.stderr, tenths=True, describe=describe)


class _DiskCachedClassifiers(dict):
  """The extractor's in-memory classifier cache, backed by <dir>/<hash>.npy for one model identity."""

  def __init__(self, memory: dict, directory: str, model_id: str):
    super().__init__()
    self.memory, self.directory, self.model_id = memory, directory, model_id

  def _path(self, key) -> str:
    digest = hashlib.sha256(json.dumps([self.model_id, list(key[0]), list(key[1])]).encode()).hexdigest()[:24]
    return storage.join(self.directory, f'{digest}.npy')

  def __contains__(self, key) -> bool:
    return key in self.memory or storage.exists(self._path(key))

  def __getitem__(self, key):
    if key not in self.memory:
      self.memory[key] = np.load(io.BytesIO(storage.read_bytes(self._path(key))))
    return self.memory[key]

  def __setitem__(self, key, value) -> None:
    self.memory[key] = value
    if jax.process_index() == 0:
      with storage.atomic_write(self._path(key), 'wb') as f:
        np.save(f, value)


class _CachedExtractor:
  """A bound extractor whose classifier cache is also on disk."""

  def __init__(self, bound, cache: _DiskCachedClassifiers):
    self._bound, self.classifiers = bound, cache

  def __getattr__(self, name):
    return getattr(self._bound, name)


def evaluate_dataset(bound, tokenizer, key: str, data: str, image_size: int, batch_size: int = 64,
                     num_workers: int = 0, options: Mapping | None = None, show_progress: bool = True) -> dict:
  """The metrics of one dataset of `suite.DATASETS` read from `data` (raises MissingDataset when it is not there).

  The one scoring route: the suite's runs and the config's evaluators (in training and from the CLI) both come
  here. options: the loader's options (`DatasetSpec.options`) as the config gives them; anything else is an error.
  """
  spec = suite.DATASETS[key]
  options = dict(options or {})
  unknown = sorted(set(options) - set(spec.options))
  if unknown:
    raise InputError(f'dataset {key!r} takes no option {", ".join(unknown)} (it takes: {", ".join(spec.options)})')
  task = spec.load(spec, data, image_size, batch_size, num_workers, **options)
  progress = None
  if isinstance(task, PairedRetrieval):
    image_features, text_features = paired_features(bound, task.batches)
    result = retrieval_recall(image_features, text_features, np.arange(image_features.shape[0]))
    result.update(num_images=image_features.shape[0], num_captions=text_features.shape[0])
  elif isinstance(task, Retrieval):
    progress = _image_progress(key, len(task.images)) if show_progress else None
    batches = datasets.image_batches(task.images, image_size, batch_size, num_workers)
    result = score_retrieval(bound, tokenizer, batches, task.captions, task.text_to_image, progress=progress)
    result.update(num_images=len(task.images), num_captions=len(task.captions))
  else:
    zero_shot_classifier(bound, tokenizer, task.classnames, task.templates)  # before the progress line starts
    progress = _image_progress(key, task.size) if show_progress else None
    result = score_zero_shot(bound, tokenizer, task.batches, task.classnames, task.templates, subset=task.subset,
                             progress=progress)
    result['num_classes'] = len(task.subset) if task.subset is not None else len(task.classnames)
  if progress:
    progress.close()
  return result


def run_suite(bound, tokenizer, keys: Sequence[str], *, data_dir: str, image_size: int, output_dir: str,
              model_id: str, batch_size: int = 64, num_workers: int = 0, rerun: bool = False,
              log: Callable[[str], None] = print) -> dict[str, dict]:
  """Evaluates each dataset in `keys` unless <output_dir>/datasets/<key>.json records it done; returns
  {key: {'status': 'done' | 'missing' | 'failed', metrics or 'message'}}. model_id names the weights (class-text
  embeddings cached under <output_dir>/text_embeddings/ are reused only for the same model_id)."""
  unknown = [k for k in keys if k not in suite.DATASETS]
  if unknown:
    raise InputError(f'unknown datasets {unknown}; known: {", ".join(suite.DATASETS)}')
  per_dataset = storage.join(output_dir, 'datasets')
  disk = _DiskCachedClassifiers(bound.classifiers, storage.join(output_dir, 'text_embeddings'), model_id)
  cached = _CachedExtractor(bound, disk)
  results: dict[str, dict] = {}
  for key in keys:
    path = storage.join(per_dataset, f'{key}.json')
    if not rerun and storage.exists(path):
      saved = json.loads(storage.read_text(path))
      if saved.get('status') == 'done' and saved.get('model_id') == model_id:
        results[key] = saved['result']
        log(f'{key}: done before, skipped ({path})')
        continue
    try:
      result = dict(status='done', **evaluate_dataset(cached, tokenizer, key, data_dir, image_size, batch_size,
                                                      num_workers))
    except datasets.MissingDataset as e:
      result = {'status': 'missing', 'message': str(e)}
      log(f'{key}: MISSING - {e}')
    except (InputError, OSError) as e:  # bad data of one dataset (unreadable file, wrong class list): go on;
      # any other error is a bug and keeps its traceback
      result = {'status': 'failed', 'message': f'{type(e).__name__}: {e}'}
      log(f'{key}: FAILED - {result["message"]}')
    results[key] = result
    if result['status'] == 'done':
      log(f'{key}: ' + ', '.join(f'{m}={v:.4f}' if isinstance(v, float) else f'{m}={v}'
                                 for m, v in result.items() if m != 'status'))
      if jax.process_index() == 0:
        storage.write_text(path, json.dumps({'model_id': model_id, 'status': 'done', 'result': result}, indent=1))
  return results


def model_identity(config: Mapping) -> str:
  """What the cached results belong to: the model, its weights and the evaluation precision."""
  return json.dumps({'model': config['model']['name'], 'pretrained': config.get('pretrained') or None,
                     'dtype': config['model'].get('dtype')}, sort_keys=True)

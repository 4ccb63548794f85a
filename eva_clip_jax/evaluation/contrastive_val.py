"""Validation loss and ranks on held-out image-text pairs, as the reference's `evaluate` reports them
(open_clip / EVA-CLIP training/train.py: `val_loss` and get_clip_metrics).

  config.evals.val = dict(kind='contrastive_val', data='/data/val/{00000..00009}.tar', batch_size=256,
                          every_steps=1000)

  val/val_loss                   the contrastive loss of consecutive batches of `batch_size` pairs, averaged over
                                 the samples (each batch's loss weighted by its size), at the model's logit scale
  val/image_to_text_mean_rank    1 + the mean number of texts scored above an image's own caption, over the whole
  val/image_to_text_median_rank  set; the median as the reference takes it (floor of the median, plus 1)
  val/image_to_text_R@1, 5, 10   the share of images whose caption is among the K best texts
  val/text_to_image_...          the same from the texts' side
  val/num_samples

Ranks count strictly better candidates, so ties go in the query's favour (as `retrieval_recall`).
"""

from __future__ import annotations

import numpy as np

from eva_clip_jax.evaluation.features import paired_features

ROW_CHUNK = 1024  # rows of the [N, N] similarity matrix held at once


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def batch_loss(image_features: np.ndarray, text_features: np.ndarray, logit_scale: float) -> float:
  """The symmetric InfoNCE of one batch (float64): (CE(image -> text) + CE(text -> image)) / 2."""
  logits = logit_scale * np.asarray(image_features, np.float64) @ np.asarray(text_features, np.float64).T
  diagonal = np.arange(logits.shape[0])
  return float(-(_log_softmax(logits)[diagonal, diagonal].mean() + _log_softmax(logits.T)[diagonal, diagonal].mean())
               / 2)


def validation_loss(image_features: np.ndarray, text_features: np.ndarray, logit_scale: float,
                    batch_size: int) -> float:
  """The reference's val_loss: per-batch losses over consecutive batches, weighted by batch size."""
  n = image_features.shape[0]
  total = sum(batch_loss(image_features[i:i + batch_size], text_features[i:i + batch_size], logit_scale)
              * min(batch_size, n - i) for i in range(0, n, batch_size))
  return total / n


def _ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """For query i, how many candidates score strictly above candidate i."""
  queries, candidates = np.asarray(queries, np.float64), np.asarray(candidates, np.float64)
  ranks = np.empty(queries.shape[0], np.int64)
  for start in range(0, queries.shape[0], ROW_CHUNK):
    sims = queries[start:start + ROW_CHUNK] @ candidates.T
    rows = np.arange(sims.shape[0])
    true = sims[rows, start + rows]  # from the same product, so a pair never outscores itself by rounding
    ranks[start:start + ROW_CHUNK] = (sims > true[:, None]).sum(axis=1)
  return ranks


def clip_metrics(image_features: np.ndarray, text_features: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """Mean and median rank and R@K of paired features, both directions (get_clip_metrics)."""
  result = {}
  for name, ranks in (('image_to_text', _ranks(image_features, text_features)),
                      ('text_to_image', _ranks(text_features, image_features))):
    result[f'{name}_mean_rank'] = float(ranks.mean() + 1)
    result[f'{name}_median_rank'] = float(np.floor(np.median(ranks)) + 1)
    for k in ks:
      result[f'{name}_R@{k}'] = float(np.mean(ranks < k))
  return result


def score_contrastive_val(bound, batches, logit_scale: float, batch_size: int) -> dict[str, float]:
  """Loss and ranks of the valid pairs of `batches` (every process reads the whole set)."""
  image_features, text_features = paired_features(bound, batches)
  result = {'val_loss': validation_loss(image_features, text_features, logit_scale, batch_size)}
  result.update(clip_metrics(image_features, text_features))
  result['num_samples'] = int(image_features.shape[0])
  return result

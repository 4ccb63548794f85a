"""Zero-shot image-text retrieval (Flickr30K / COCO style, several captions per image): Recall@K both ways."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@K for image->text and text->image.

  text_to_image[j] is the index of the image caption j describes. Image->text counts a hit when any of the
  image's captions is among its K most similar texts; text->image when the caption's image is among its K most
  similar images. Ties count in the query's favour (a strictly better candidate is needed to push it down).
  """
  text_to_image = np.asarray(text_to_image)
  sims = np.asarray(image_features, np.float64) @ np.asarray(text_features, np.float64).T  # [images, texts]
  n_images, n_texts = sims.shape
  if text_to_image.shape != (n_texts,) or text_to_image.min() < 0 or text_to_image.max() >= n_images:
    raise ValueError(f'text_to_image must give an image index in [0, {n_images}) for each of {n_texts} texts')
  if len(set(text_to_image.tolist())) != n_images:
    raise ValueError('every image needs at least one caption')
  # text -> image: rank of the true image among all images for each text.
  true_scores = sims[text_to_image, np.arange(n_texts)]
  t2i_rank = (sims > true_scores[None, :]).sum(axis=0)
  # image -> text: best rank over the image's captions.
  i2t_rank = np.full(n_images, n_texts)
  for j, i in enumerate(text_to_image):
    rank = int((sims[i] > sims[i, j]).sum())
    i2t_rank[i] = min(i2t_rank[i], rank)
  result = {}
  for k in ks:
    result[f'image_to_text_R@{k}'] = float(np.mean(i2t_rank < k))
    result[f'text_to_image_R@{k}'] = float(np.mean(t2i_rank < k))
  return result


def score_retrieval(extractor, tokenizer, image_batches, captions: Sequence[str], text_to_image: Sequence[int],
                    batch_size: int = 256, progress=None) -> dict[str, float]:
  """Recall@1/5/10 both ways: every process embeds all images (`image_batches` in order) and all captions."""
  image_features, _ = extractor.images_from(image_batches, progress=progress)
  text_features = np.concatenate([extractor.texts(tokenizer(list(captions[i:i + batch_size])))
                                  for i in range(0, len(captions), batch_size)])
  return retrieval_recall(image_features, text_features, text_to_image)

"""Zero-shot classification of a user's own images against labels they choose: the library behind
`python -m eva_clip_jax.classify` and the notebooks. Flag-free, so notebooks and tests import it beside any CLI.

Each label becomes one text embedding: the label in every prompt template, embedded, normalised, averaged and
normalised again, as CLIP's zero-shot classifier is built. An image's probabilities are the softmax of the model's
own logit scale times the cosine similarities. Paths may be gs:// (read through `storage`).
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import json
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_clip_jax import storage
from eva_clip_jax.errors import InputError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def imagenet_templates() -> list[str]:
  """The 80 OpenAI prompt templates ('a photo of a {}.'), from the package's ImageNet zero-shot asset."""
  text = importlib.resources.files('eva_clip_jax').joinpath('assets/imagenet_zeroshot.json').read_text('utf-8')
  return json.loads(text)['templates']


def parse_templates(value: str) -> list[str]:
  """'imagenet' | 'none' | a file of templates (one per line) | 'a photo of a {}.|a drawing of a {}.'."""
  if value == 'imagenet':
    return imagenet_templates()
  if value == 'none':
    return ['{}']
  if '{}' not in value and storage.isfile(value):
    templates = [line.strip() for line in storage.read_text(value).splitlines() if line.strip()]
  else:
    templates = [t.strip() for t in value.split('|') if t.strip()]
  bad = [t for t in templates if '{}' not in t]
  if not templates or bad:
    raise InputError(f'every template needs {{}} where the label goes: {bad or value!r}')
  return templates


def image_paths(inputs: Iterable[str]) -> list[str]:
  """Files as given, folders expanded to the images under them (recursively, sorted)."""
  paths = []
  for item in inputs:
    if storage.isdir(item):
      found = [p for p in storage.walk_files(item) if storage.splitext(p)[1].lower() in IMAGE_SUFFIXES]
      if not found:
        raise InputError(f'no images ({", ".join(IMAGE_SUFFIXES)}) under {item}')
      paths.extend(found)
    elif storage.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f'no image or folder at {item}')
  return paths


def auto_dtype() -> str:
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'


class ZeroShotClassifier:
  """A model with its label embeddings: `probabilities(images)` -> [N, len(labels)]."""

  def __init__(self, model, labels: Sequence[str], templates: Sequence[str] = ('{}',), batch_size: int = 32):
    from eva_clip_jax.tokenizer import get_tokenizer  # pylint: disable=g-import-not-at-top
    from eva_clip_jax.transforms import image_transform  # pylint: disable=g-import-not-at-top
    if not labels:
      raise InputError('no labels to classify against')
    self.labels, self.batch_size = list(labels), batch_size
    self.preprocess = image_transform(model.spec.vision.image_size, is_train=False)
    graphdef, state = nnx.split(model)
    # Compiled once per shape; images always arrive in batches of `batch_size` (the last one padded).
    self._embed_images = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x, normalize=True))
    embed_text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t, normalize=True))
    self._state = state
    tokenizer = get_tokenizer(context_length=model.spec.text.context_length)
    rows = []
    for label in self.labels:
      per_template = embed_text(state, jnp.asarray(tokenizer([t.format(label) for t in templates])))
      mean = jnp.mean(per_template.astype(jnp.float32), axis=0)
      rows.append(mean / jnp.linalg.norm(mean))
    self.text_features = jnp.stack(rows)  # [labels, embed_dim], float32, unit norm
    self.logit_scale = jnp.exp(model.logit_scale[...])

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Preprocessed images [N, H, W, 3] -> label probabilities [N, len(labels)]."""
    out = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      padded = np.concatenate([batch, np.zeros((self.batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
      features = self._embed_images(self._state, jnp.asarray(padded))[:len(batch)].astype(jnp.float32)
      out.append(np.asarray(jax.nn.softmax(self.logit_scale * features @ self.text_features.T, axis=-1)))
    return np.concatenate(out)

  def classify(self, pil_images: Sequence, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """PIL images -> each image's top-k (label, probability), best first."""
    probs = self.probabilities(np.stack([self.preprocess(image) for image in pil_images]))
    return [top_labels(p, self.labels, top_k) for p in probs]


def top_labels(probs: np.ndarray, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
  order = np.argsort(-probs, kind='stable')[:k]
  return [(labels[i], float(probs[i])) for i in order]


def read_image(path: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    return Image.open(io.BytesIO(storage.read_bytes(path))).convert('RGB')
  except OSError as e:
    raise InputError(f'cannot read {path} as an image: {e}') from None


def write_csv(path: str, results: Sequence[tuple[str, list[tuple[str, float]]]]) -> None:
  with storage.atomic_write(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'rank', 'label', 'probability'])
    for image, top in results:
      for rank, (label, prob) in enumerate(top, 1):
        writer.writerow([image, rank, label, f'{prob:.6f}'])


# --- the command ---------------------------------------------------------------------------------------------------

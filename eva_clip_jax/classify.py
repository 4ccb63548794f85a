r"""Zero-shot classification of your own images against labels you type.

  python -m eva_clip_jax.classify --model=EVA02-CLIP-L-14 --pretrained=merged2b_s4b_b131k \
      --labels="cat,dog,a red car" photos/ cat.jpg gs://bucket/more/ [--top_k=5] [--output=results.csv]

Each label becomes one text embedding: the label in every prompt template (`--templates`: ImageNet's 80 by
default, `none` for the label as typed, a file with one template per line, or templates separated by '|', each
with `{}` where the label goes), embedded, normalised, averaged and normalised again, as CLIP's zero-shot
classifier is built. An image's probabilities are the softmax of the model's own logit scale times the cosine
similarities. Folders are searched recursively for images; paths may be gs:// (read through `storage`). Images run
in fixed-size batches (one compiled shape) on the default device; `--dtype=auto` computes in bfloat16 on GPU and TPU
and in float32 on CPU. Prints each image's top-k; `--output` also writes them as CSV (image, rank, label,
probability).
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
from absl import app, flags
from flax import nnx

from eva_clip_jax import cli, storage

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
    raise ValueError(f'every template needs {{}} where the label goes: {bad or value!r}')
  return templates


def image_paths(inputs: Iterable[str]) -> list[str]:
  """Files as given, folders expanded to the images under them (recursively, sorted)."""
  paths = []
  for item in inputs:
    if storage.isdir(item):
      found = [p for p in storage.walk_files(item) if storage.splitext(p)[1].lower() in IMAGE_SUFFIXES]
      if not found:
        raise ValueError(f'no images ({", ".join(IMAGE_SUFFIXES)}) under {item}')
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
      raise ValueError('no labels to classify against')
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
    raise ValueError(f'cannot read {path} as an image: {e}') from None


def write_csv(path: str, results: Sequence[tuple[str, list[tuple[str, float]]]]) -> None:
  with storage.atomic_write(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'rank', 'label', 'probability'])
    for image, top in results:
      for rank, (label, prob) in enumerate(top, 1):
        writer.writerow([image, rank, label, f'{prob:.6f}'])


# --- the command ---------------------------------------------------------------------------------------------------

_MODEL = flags.DEFINE_string('model', None, 'model name (eva_clip_jax.list_models())', required=True)
_PRETRAINED = flags.DEFINE_string('pretrained', None, 'a tag (eva_clip_jax.list_pretrained()), a PyTorch file or a '
                                  'converted directory; none: random weights')
_LABELS = flags.DEFINE_string('labels', None, 'comma-separated labels, or a file with one label per line',
                              required=True)
_TEMPLATES = flags.DEFINE_string('templates', 'imagenet', "'imagenet' (80), 'none', a file, or 'a {}.|a photo of {}.'")
_TOP_K = flags.DEFINE_integer('top_k', 5, 'labels printed per image')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'images per batch (0: 8 on CPU, 64 on an accelerator)')
_DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16'], 'compute dtype')
_OUTPUT = flags.DEFINE_string('output', None, 'also write the top-k as CSV here (local or gs://)')


def parse_labels(value: str) -> list[str]:
  if ',' not in value and storage.isfile(value):
    lines = storage.read_text(value).splitlines()
  else:
    lines = value.split(',')
  labels = [label.strip() for label in lines if label.strip()]
  if not labels:
    raise ValueError(f'no labels in --labels={value!r}')
  return labels


def main(argv):
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.pretrained import resolve  # pylint: disable=g-import-not-at-top
  if len(argv) < 2:
    raise app.UsageError('name at least one image or folder after the flags')
  paths = image_paths(argv[1:])
  labels, templates = parse_labels(_LABELS.value), parse_templates(_TEMPLATES.value)
  name = ec.get_model_spec(_MODEL.value).name
  weights = resolve(_PRETRAINED.value, name) if _PRETRAINED.value else None  # fail fast, before building the model
  dtype = auto_dtype() if _DTYPE.value == 'auto' else _DTYPE.value
  model = ec.create_model(name, pretrained=weights, dtype=dtype)
  batch = _BATCH.value or (8 if jax.default_backend() == 'cpu' else 64)
  classifier = ZeroShotClassifier(model, labels, templates, batch_size=batch)
  results = []
  for start in range(0, len(paths), batch):
    chunk = paths[start:start + batch]
    for path, top in zip(chunk, classifier.classify([read_image(p) for p in chunk], _TOP_K.value)):
      results.append((path, top))
      print(f'{path}: ' + ' | '.join(f'{label} {prob:.4f}' for label, prob in top), flush=True)
  if _OUTPUT.value:
    write_csv(_OUTPUT.value, results)
    print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  cli.run(main)

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

import jax
from absl import app, flags

from eva_clip_jax import cli, storage
from eva_clip_jax.errors import InputError
from eva_clip_jax.evaluation.classifier import (ZeroShotClassifier, auto_dtype, image_paths, parse_templates,
                                                read_image, write_csv)

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
    raise InputError(f'no labels in --labels={value!r}')
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

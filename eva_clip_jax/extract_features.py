r"""Image and text embeddings of a webdataset, written as .npy with the sample keys (the reference's
--extract-features).

  python -m eva_clip_jax.extract_features --config=configs/b16.py --config.pretrained=EVA02_CLIP_B_psz16_s8B.pt \
      --data='/data/laion/{00000..00099}.tar' --output_dir=features/b16

Writes `image_features.npy` and `text_features.npy` (float32 [N, embed_dim], L2-normalised, row i of both from the
same sample) and `keys.txt` (sample i's webdataset key on line i). The model is built as training and evaluation
build it (the config's mesh, parameter shardings and jitted towers); every device of every process encodes. With
several processes each reads its share of the shards and writes its own files, `*.process-00001-of-00004.*`.
Samples that cannot be read are skipped (as in training) and so are absent from the files.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from eva_clip_jax import cli, storage

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file', lock_config=False)
_DATA = flags.DEFINE_string('data', None, 'webdataset shard pattern, glob or directory to embed')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'where to write the .npy files and keys.txt')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'samples per process per step')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 0, 'grain processes decoding the shards')


def output_paths(output_dir: str, process_index: int = 0, process_count: int = 1) -> dict[str, str]:
  """The files one process writes: plain names for one process, a per-process suffix for several."""
  part = '' if process_count == 1 else f'.process-{process_index:05d}-of-{process_count:05d}'
  return {name: storage.join(output_dir, f'{name}{part}.{ext}')
          for name, ext in (('image_features', 'npy'), ('text_features', 'npy'), ('keys', 'txt'))}


def extract_features(config, data: str, output_dir: str, *, batch_size: int = 256,
                     num_workers: int = 0) -> dict[str, str]:
  """Embeds every readable sample of `data` with config's model (config.pretrained's weights, or the seeded random
  initialisation); returns the paths this process wrote."""
  from eva_clip_jax.evaluation import datasets  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.evaluation.features import in_lockstep  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.training.eval_model import build_eval_model  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.models import get_model_spec  # pylint: disable=g-import-not-at-top
  bound = build_eval_model(config).extractor(batch_size)  # the towers as training and evaluation build them
  spec = get_model_spec(config.model.name)
  batches = datasets.shard_batches(data, spec.vision.image_size, batch_size, spec.text.context_length,
                                   num_workers=num_workers, shard_by_process=True)
  images, texts, keys = [], [], []
  for batch, features in in_lockstep(batches, {'image': bound.images, 'text': bound.texts}):
    keep = np.asarray(batch['valid'], bool)  # a pass that ends in unreadable samples ends in a placeholder
    images.append(features['image'][keep])
    texts.append(features['text'][keep])
    keys.extend(str(k) for k in np.asarray(batch['key'])[keep])
  dim = spec.embed_dim
  paths = output_paths(output_dir, jax.process_index(), jax.process_count())
  storage.makedirs(output_dir)
  for name, parts in (('image_features', images), ('text_features', texts)):
    with storage.atomic_write(paths[name], 'wb') as f:
      np.save(f, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32))
  storage.write_text(paths['keys'], ''.join(f'{k}\n' for k in keys))
  return paths


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required (a configs/*.py file)')
  if not _DATA.value or not _OUTPUT_DIR.value:
    raise app.UsageError('--data (the shards to embed) and --output_dir are required')
  paths = extract_features(config, _DATA.value, _OUTPUT_DIR.value, batch_size=_BATCH_SIZE.value,
                           num_workers=_NUM_WORKERS.value)
  print('wrote ' + ', '.join(paths.values()))


if __name__ == '__main__':
  cli.run(main)

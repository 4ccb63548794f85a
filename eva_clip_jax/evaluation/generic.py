"""The datasets a user names in a config rather than the paper's suite: an image folder, a labelled CSV, webdataset
shards, any prepared tensorflow-datasets split, and caption CSVs or shards for retrieval. They are entries of
`suite.DATASETS` like the paper's own (their `data` is the folder, file or pattern itself), so the in-training
evaluators and the suite share one registry and one scoring route.

Class names: 'imagenet' (the 1000 of assets/imagenet_zeroshot.json), 'folder' (the class directories, '_' -> ' '),
a file with one name per line, or a list. Templates: 'openai' (the 80 of CLIP), a file, or a list.
"""

from __future__ import annotations

from typing import Sequence

from eva_clip_jax.errors import InputError
from eva_clip_jax.evaluation import datasets
from eva_clip_jax.evaluation.tasks import Classification, PairedRetrieval, Retrieval
from eva_clip_jax.evaluation.zero_shot import imagenet_metadata, read_lines

CLASSIFICATION_OPTIONS = ('classnames', 'templates')


def class_names(classnames: str | Sequence[str], folder_classes: Sequence[str] | None = None) -> list[str]:
  if classnames == 'imagenet':
    return list(imagenet_metadata()[0])
  if classnames == 'folder':
    if folder_classes is None:
      raise InputError("classnames='folder' names the classes by their directories: only for an image folder")
    return [c.replace('_', ' ') for c in folder_classes]
  return read_lines(classnames) if isinstance(classnames, str) else list(classnames)


def prompt_templates(templates: str | Sequence[str]) -> list[str]:
  if templates == 'openai':
    return list(imagenet_metadata()[1])
  return read_lines(templates) if isinstance(templates, str) else list(templates)


def folder(spec, data, image_size, batch_size, num_workers, classnames='imagenet', templates='openai'):
  del spec
  items, classes = datasets.image_folder(data)
  return Classification(datasets.labelled_batches(items, image_size, batch_size, num_workers),
                        class_names(classnames, classes), prompt_templates(templates), size=len(items))


def labels_csv(spec, data, image_size, batch_size, num_workers, classnames='imagenet', templates='openai'):
  del spec
  names = class_names(classnames)
  items = datasets.labelled_csv(data, names)
  return Classification(datasets.labelled_batches(items, image_size, batch_size, num_workers), names,
                        prompt_templates(templates), size=len(items))


def shards(spec, data, image_size, batch_size, num_workers, classnames='imagenet', templates='openai',
           context_length=77):
  del spec
  batches = datasets.shard_batches(data, image_size, batch_size, context_length, num_workers)
  return Classification(batches, class_names(classnames), prompt_templates(templates))


def tfds(spec, data, image_size, batch_size, num_workers, name=None, split='validation', classnames='imagenet',
         templates='openai'):
  """`name`: the tfds builder ('imagenet2012'); `data`: tfds' data_dir (local or gs://, read by tfds itself)."""
  del spec, num_workers
  if not name:
    raise InputError("dataset='tfds' needs name=<the tensorflow-datasets builder>, e.g. name='imagenet2012'")
  return Classification(datasets.tfds_batches(name, image_size, batch_size, split, data or None),
                        class_names(classnames), prompt_templates(templates))


def captions_csv(spec, data, image_size, batch_size, num_workers):
  """path,caption rows; several captions may share an image."""
  del spec, image_size, batch_size, num_workers
  return Retrieval(*datasets.caption_pairs(data))


def caption_shards(spec, data, image_size, batch_size, num_workers, context_length=77):
  """One caption per image; every process reads all of it."""
  del spec
  return PairedRetrieval(datasets.shard_batches(data, image_size, batch_size, context_length, num_workers,
                                                shard_by_process=False))

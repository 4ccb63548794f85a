"""What a dataset loader hands the scoring code: a classification task, a retrieval task (captions as text), or
paired batches (image and tokenised caption in one record, as webdataset shards hold them); and the registry entry
(`DatasetSpec`) that names a loader, the metric and the layout it expects."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np


@dataclasses.dataclass
class Classification:
  """What score_zero_shot needs: batches (this process's share), class names, templates, optional subset."""
  batches: Iterator[dict]
  classnames: list[str]
  templates: list[str]
  subset: list[int] | None = None
  size: int | None = None  # examples in the whole split, when known (the progress display)


@dataclasses.dataclass
class Retrieval:
  images: list  # paths or encoded bytes, in order
  captions: list[str]
  text_to_image: np.ndarray


@dataclasses.dataclass
class PairedRetrieval:
  """Batches of {'image', 'text' (tokens), 'valid'}, one caption per image; every process reads all of them."""
  batches: Iterator[dict]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One entry of `suite.DATASETS`.

  load(spec, data, image_size, batch_size, num_workers, **options) -> Classification | Retrieval | PairedRetrieval,
  where `data` is the suite's prepared data_dir for the paper's datasets and the user's folder, CSV, shards or tfds
  data_dir for the generic ones, and `options` are the keys of `options` that the evaluator's config (or the
  model: context_length) supplies.
  """
  key: str            # the column name in assets/paper_tables.json (or the generic reader's name)
  title: str          # as the paper's tables print it
  task: str           # 'classification' or 'retrieval'
  metric: str         # the number the table shows: top1, mean_top1_top5, or retrieval's recall keys
  load: Callable[..., Any]
  layout: str         # what the loader expects, for the missing-dataset message and the README
  options: tuple[str, ...] = ()

"""This library's own checkpoint of model parameters: an orbax PyTree checkpoint plus a small model.json.

  DIR/model.json   {"model": "EVA02-CLIP-B-16", "format": "eva_clip_jax.params/1", "source": ...}
  DIR/params/      orbax checkpoint of the nested parameter dict

The directory is assembled under a temporary name beside DIR and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import orbax.checkpoint as ocp

FORMAT = 'eva_clip_jax.params/1'


def is_params_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'model.json')) and os.path.isdir(os.path.join(path, 'params'))


def save_params(params: Any, directory: str, *, model_name: str, source: str = '', overwrite: bool = False) -> None:
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f'{directory} exists; pass overwrite=True (--overwrite) to replace it')
  tmp = f'{directory}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, 'params'), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    with open(os.path.join(tmp, 'model.json'), 'w') as f:
      json.dump({'model': model_name, 'format': FORMAT, 'source': source}, f, indent=1)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def load_params(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(nested params as numpy arrays, metadata from model.json)."""
  directory = os.path.abspath(directory)
  if not is_params_dir(directory):
    raise FileNotFoundError(f'{directory} is not an eva_clip_jax parameter checkpoint (no model.json + params/)')
  with open(os.path.join(directory, 'model.json')) as f:
    meta = json.load(f)
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(os.path.join(directory, 'params'))
  checkpointer.close()
  return params, meta

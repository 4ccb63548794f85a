"""This library's own checkpoint of model parameters: an orbax PyTree checkpoint plus a small model.json.

  DIR/model.json   {"model": "EVA02-CLIP-B-16", "format": "eva_clip_jax.params/1", "source": ...}
  DIR/params/      orbax checkpoint of the nested parameter dict

DIR may be local or in a bucket. model.json is written last and marks a complete directory: on a local disk the
directory is assembled under a temporary name beside DIR and renamed into place; an object store has no rename, so
there orbax writes the arrays in place and a failed save removes what it wrote.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

from eva_clip_jax import storage

FORMAT = 'eva_clip_jax.params/1'


def is_params_dir(path: str) -> bool:
  return storage.isfile(storage.join(path, 'model.json')) and storage.isdir(storage.join(path, 'params'))


def save_params(params: Any, directory: str, *, model_name: str, source: str = '', overwrite: bool = False) -> None:
  directory = storage.absolute(directory)
  if storage.exists(directory) and not overwrite:
    raise FileExistsError(f'{directory} exists; pass overwrite=True (--overwrite) to replace it')
  in_place = storage.is_url(directory)
  if in_place:
    storage.remove(directory, recursive=True)
  target = directory if in_place else f'{directory}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.join(target, 'params'), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    storage.write_text(storage.join(target, 'model.json'),
                       json.dumps({'model': model_name, 'format': FORMAT, 'source': source}, indent=1))
    if not in_place:
      storage.remove(directory, recursive=True)
      storage.move(target, directory)
  except BaseException:
    storage.remove(target, recursive=True)
    raise
  finally:
    if not in_place:
      storage.remove(target, recursive=True)


def load_params(directory: str, target: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(nested params, metadata from model.json): numpy arrays, or with `target` (a tree of jax.ShapeDtypeStruct with
  shardings) global jax.Arrays restored straight into those shardings, each process reading its own shards."""
  directory = storage.absolute(directory)
  if not is_params_dir(directory):
    raise FileNotFoundError(f'{directory} is not an eva_clip_jax parameter checkpoint (no model.json + params/)')
  meta = json.loads(storage.read_text(storage.join(directory, 'model.json')))
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(storage.join(directory, 'params'), target)
  checkpointer.close()
  return params, meta


def param_shapes(directory: str) -> Any:
  """The stored parameters' shapes (a nested dict of tuples), read from orbax's metadata, not from the arrays."""
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(storage.join(storage.absolute(directory), 'params')).item_metadata.tree
  checkpointer.close()
  return jax.tree.map(lambda m: tuple(m.shape), tree)

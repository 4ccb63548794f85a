"""Reading and writing a model's parameters as a nested dict of arrays, with checked names and shapes."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_clip_jax.errors import InputError
from eva_clip_jax.models.paths import flatten, path_name


def model_params(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters as a nested dict of arrays (the layout the mappings produce)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assign_params(model: nnx.Module, params: Mapping[str, Any], *, allow_missing: bool = False) -> None:
  """Writes `params` into `model` in place, cast to each parameter's dtype.

  Raises a ValueError listing every missing, unexpected or mis-shaped parameter, so a wrong checkpoint or a
  wrong model name is diagnosed in one go. With `allow_missing`, parameters absent from `params` keep their
  current (freshly initialised) values.
  """
  state = nnx.state(model, nnx.Param)
  current = flatten(nnx.to_pure_dict(state))
  given = flatten(params)
  missing = sorted(set(current) - set(given))
  unexpected = sorted(set(given) - set(current))
  mis_shaped = [f'{k}: expected {tuple(current[k].shape)}, got {tuple(np.shape(given[k]))}'
                for k in sorted(set(current) & set(given)) if tuple(current[k].shape) != tuple(np.shape(given[k]))]
  problems = []
  if missing and not allow_missing:
    problems.append(f'missing ({len(missing)}): {", ".join(missing)}')
  if unexpected:
    problems.append(f'unexpected ({len(unexpected)}): {", ".join(unexpected)}')
  if mis_shaped:
    problems.append(f'wrong shape ({len(mis_shaped)}): {"; ".join(mis_shaped)}')
  if problems:
    raise InputError('parameters do not fit the model:\n  ' + '\n  '.join(problems))

  def pick(path, old):
    key = path_name(path)
    return jnp.asarray(given[key], dtype=old.dtype) if key in given else old

  pure = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)

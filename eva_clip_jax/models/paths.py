"""Parameter paths: the '/'-joined names ('visual/blocks/mlp/w1/kernel') every table of the library is keyed by."""

from __future__ import annotations

from typing import Any, Mapping

import jax


def path_name(key_path: tuple) -> str:
  """A jax key path (from `tree_leaves_with_path`) or a tuple of names -> 'a/b/c'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in key_path)


def flat_paths(tree: Any) -> list[str]:
  """The path of every leaf of `tree`, in `jax.tree.leaves` order."""
  return [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + '/'))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree

"""The device mesh, logical parameter axes and the three sharding strategies (dp, zero1, fsdp).

One jitted step over a `jax.sharding.Mesh` replaces DeepSpeed: the strategy only decides the shardings of the
parameters and of the optimizer state, and XLA inserts the collectives.
  dp     parameters and optimizer state replicated; gradients all-reduced.
  zero1  parameters replicated; optimizer state sharded over every data-parallel device (the paper's ZeRO-1):
         each device updates its slice of the parameters and XLA all-gathers the result.
  fsdp   parameters and optimizer state sharded by the logical-axis rules (`embed` -> `fsdp` by default);
         XLA all-gathers each weight where it is used.
The batch is always sharded over the data-parallel axes ('data', 'fsdp'). A 'tensor' axis shards the `mlp`
and `vocab` logical axes under every strategy (tensor parallelism, off at size 1).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
STRATEGIES = ('dp', 'zero1', 'fsdp')

# Kernels whose input is the wide (mlp / heads) side: their logical axes are ('mlp', 'embed').
_OUTPUT_PROJECTIONS = ('proj', 'out_proj', 'w3', 'fc2', 'c_proj')
# Leaves matched by name, logical names of their trailing dimensions (the last one is the model width).
_NAMED_AXES = (
    (r'token_embedding/embedding$', ('vocab', 'embed')),
    (r'(pos_embed|positional_embedding|cls_token)$', ('embed',)),
    (r'patch_embed/kernel$', ('embed',)),
    (r'text_projection$', ('embed', 'mlp')),
)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}')
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'this run has {len(devices)}')
  # create_device_mesh orders devices so that the inner axes stay within a host / an ICI ring.
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Logical names of a parameter's dimensions from its path ('visual/blocks/mlp/w1/kernel')."""
  names: list[str | None] = []
  if '/blocks/' in f'/{path}':
    names.append('layers')  # stacked blocks carry a leading depth axis
  rest = ndim - len(names)
  for pattern, trailing in _NAMED_AXES:
    if re.search(pattern, path):
      trailing = trailing[-rest:] if rest else ()
      return tuple(names + [None] * (rest - len(trailing)) + list(trailing))
  parts = path.split('/')
  module, leaf = (parts[-2] if len(parts) > 1 else ''), parts[-1]
  if leaf == 'kernel' and rest == 2:
    names += ['mlp', 'embed'] if module in _OUTPUT_PROJECTIONS else ['embed', 'mlp']
  else:
    names += [None] * rest  # biases, norms, scalars: small, replicated
  return tuple(names)


def _spec_from_rules(axes: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, Any],
                     mesh: Mesh) -> P:
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axes = rules.get(name) if name else None
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    mesh_axes = tuple(a for a in (mesh_axes or ()) if mesh.shape[a] > 1 and a not in used)
    size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or dim % size:  # indivisible dimensions stay whole rather than padded
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def _add_axes(spec: P, shape: Sequence[int], mesh_axes: tuple[str, ...], mesh: Mesh) -> P:
  """Shards `spec` further over `mesh_axes`: all of them on the largest free dimension they divide, else as many
  as divide one free dimension, the rest on others (E/14's widths on data:9 x fsdp:16: 144 divides none of them,
  16 divides the width). Axes that divide nothing stay unused: that part of the state is replicated over them."""
  taken = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
  remaining = [a for a in mesh_axes if a not in taken and mesh.shape[a] > 1]
  entries = list(spec) + [None] * (len(shape) - len(spec))
  while remaining:
    best = None  # (shard count, dimension size, -dimension, axes)
    for n in range(len(remaining), 0, -1):
      for axes in itertools.combinations(remaining, n):
        size = math.prod(mesh.shape[a] for a in axes)
        for i, entry in enumerate(entries):
          if entry is None and shape[i] % size == 0:
            best = max(best or (0,), (size, shape[i], -i, axes))
    if best is None:
      break
    _, _, negative_index, axes = best
    entries[-negative_index] = axes[0] if len(axes) == 1 else axes
    remaining = [a for a in remaining if a not in axes]
  return P(*entries)


def flat_paths(tree: Any) -> list[str]:
  return ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def param_shardings(params: Any, mesh: Mesh, strategy: str, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for the parameters (arrays or ShapeDtypeStructs) under a strategy."""
  if strategy not in STRATEGIES:
    raise ValueError(f'unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}')
  rules = dict(rules)
  if strategy != 'fsdp':  # only fsdp shards parameters over the data-parallel devices
    rules = {name: tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a not in BATCH_AXES)
             for name, axes in rules.items()}
  leaves, treedef = jax.tree_util.tree_flatten(params)
  specs = [_spec_from_rules(logical_axes(path, len(leaf.shape)), leaf.shape, rules, mesh)
           for path, leaf in zip(flat_paths(params), leaves)]
  return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, spec) for spec in specs])


def optimizer_state_shardings(param_sharding_tree: Any, params: Any, mesh: Mesh, strategy: str) -> Any:
  """Shardings for tensors shaped like the parameters (Adam/LAMB moments). zero1 and fsdp shard them over every
  data-parallel device; dp keeps the parameters' (replicated) layout."""
  if strategy == 'dp':
    return param_sharding_tree

  def shard(sharding: NamedSharding, leaf) -> NamedSharding:
    return NamedSharding(mesh, _add_axes(sharding.spec, leaf.shape, BATCH_AXES, mesh))

  return jax.tree.map(shard, param_sharding_tree, params)


def describe(shardings: Any, params: Any) -> str:
  """One line per parameter: path, shape and partition spec (for logs)."""
  lines = []
  for path, sharding, leaf in zip(flat_paths(params), jax.tree.leaves(shardings), jax.tree.leaves(params)):
    lines.append(f'{path:60s} {str(tuple(leaf.shape)):22s} {sharding.spec}')
  return '\n'.join(lines)

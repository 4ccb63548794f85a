"""The device mesh, logical parameter axes and the three sharding strategies (dp, zero1, fsdp).

One jitted step over a `jax.sharding.Mesh` replaces DeepSpeed: the strategy only decides the shardings of the
parameters and of the optimizer state, and XLA inserts the collectives.
  dp     parameters and optimizer state replicated; gradients all-reduced.
  zero1  parameters replicated; optimizer state sharded over every data-parallel device (the paper's ZeRO-1):
         each device updates its slice of the parameters and XLA all-gathers the result.
  fsdp   parameters and optimizer state sharded by the logical-axis rules (`embed` -> `fsdp` by default);
         XLA all-gathers each weight where it is used.
The logical axes are declared by the models on each parameter (`models/common.py`, LOGICAL_AXES);
`config.sharding.axis_rules` maps them to mesh axes.
The batch is always sharded over the data-parallel axes ('data', 'fsdp'), and so are the activations between blocks
(the models' `activation_batch` logical axis, resolved under `activation_sharding`). A 'tensor' axis shards the
`mlp`, `heads` and `vocab` logical axes under every strategy (tensor parallelism, off at size 1); a fused q|k|v
kernel is used with whole heads on each 'tensor' device (`models.common.fused_qkv`), so the tensor size must divide
the heads of both towers for the attention to stay local (EVA-CLIP-8B: 32 and 20 heads, 18B: 40 and 20: 2 or 4;
`tensor_heads_problem`: the training setup warns otherwise).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_clip_jax.errors import InputError
from eva_clip_jax.models.common import ACTIVATION_BATCH, ACTIVATION_HEADS, AXES_METADATA, LOGICAL_AXES
from eva_clip_jax.models.paths import flat_paths, path_name

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
STRATEGIES = ('dp', 'zero1', 'fsdp')


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise InputError(f'config.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}')
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise InputError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise InputError(f'config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise InputError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'this run has {len(devices)}')
  # create_device_mesh orders devices so that the inner axes stay within a host / an ICI ring.
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
  """'data:8,fsdp:8' (the planner's --mesh) -> {'data': 8, 'fsdp': 8, 'tensor': 1}, for `make_mesh`."""
  mesh = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, text.replace(' ', '').split(',')):
    axis, _, size = part.partition(':')
    if axis not in mesh or not size.isdigit() or int(size) < 1:
      raise InputError(f'bad mesh entry {part!r}: expected axis:size with an axis in {MESH_AXES}')
    mesh[axis] = int(size)
  return mesh


def format_mesh(mesh: Mapping[str, int]) -> str:
  return ','.join(f'{axis}:{size}' for axis, size in mesh.items() if size > 1) or 'data:1'


def strategy_mesh(mesh: Mapping[str, int], strategy: str) -> dict[str, int]:
  """fsdp shards parameters over the 'fsdp' axis only; a mesh without one gets its data devices moved there."""
  mesh = dict(mesh)
  if strategy == 'fsdp' and mesh.get('fsdp', 1) == 1:
    mesh['fsdp'], mesh['data'] = mesh.get('data', 1), 1
  return mesh


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """Where a model is traced under this, its activations' batch dimension is pinned to the data-parallel axes of
  `mesh` (`models.common.constrain_batch`), and a fused q|k|v kernel's heads to 'tensor' (`models.common.fused_qkv`).
  It sets the abstract mesh, which works inside jit (`jax.set_mesh` does not; outside jit, `jax.set_mesh(mesh)` with
  these rules does the same). One data-parallel device and no tensor parallelism: nothing to pin."""
  rules = (((ACTIVATION_BATCH, BATCH_AXES),) if data_parallel_size(mesh) > 1 else ()) + (
      ((ACTIVATION_HEADS, 'tensor'),) if mesh.shape['tensor'] > 1 else ())
  if not rules:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), spmd.logical_axis_rules(rules):
    yield


def logical_axes(param_state: nnx.State) -> dict[str, tuple[str | None, ...]]:
  """{parameter path: logical axis names} from the `logical_axes` metadata the models put on each nnx.Param.

  A parameter without them, with a name outside `LOGICAL_AXES`, or with one name too few or many is an error:
  sharding never guesses.
  """
  axes, problems = {}, []
  for path, variable in nnx.to_flat_state(param_state):
    name = path_name(path)
    names = variable.get_metadata().get(AXES_METADATA)
    if names is None:
      problems.append(f'{name}: no logical axes (create it with models.common.param/linear/layer_norm)')
    elif len(names) != len(variable.shape):
      problems.append(f'{name}: logical axes {names} for shape {tuple(variable.shape)}')
    elif set(names) - set(LOGICAL_AXES) - {None}:
      problems.append(f'{name}: unknown logical axes {sorted(set(names) - set(LOGICAL_AXES) - {None})}; '
                      f'the names are {LOGICAL_AXES}')
    else:
      axes[name] = tuple(names)
  if problems:
    raise ValueError('parameters with unusable logical axes:\n  ' + '\n  '.join(problems))
  return axes


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


def param_shardings(params: Any, axes: Mapping[str, tuple[str | None, ...]], mesh: Mesh, strategy: str,
                    rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for the parameters (arrays or ShapeDtypeStructs) under a strategy.

  axes: {path: logical axis names}, from `logical_axes`. rules: (logical name, mesh axis or axes or None) pairs;
  every logical name needs a rule.
  """
  if strategy not in STRATEGIES:
    raise InputError(f'unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}')
  rules = dict(rules)
  missing, unknown = set(LOGICAL_AXES) - set(rules), set(rules) - set(LOGICAL_AXES)
  if missing or unknown:
    raise InputError(f'config.sharding.axis_rules must map each logical axis {LOGICAL_AXES} to mesh axes (or None); '
                     f'missing {sorted(missing)}, unknown {sorted(unknown)}')
  bad_mesh_axes = {a for v in rules.values() for a in ((v,) if isinstance(v, str) else (v or ()))} - set(mesh.shape)
  if bad_mesh_axes:
    raise InputError(f'config.sharding.axis_rules name mesh axes {sorted(bad_mesh_axes)}; the mesh has {MESH_AXES}')
  if strategy != 'fsdp':  # only fsdp shards parameters over the data-parallel devices
    rules = {name: tuple(a for a in ((v,) if isinstance(v, str) else (v or ())) if a not in BATCH_AXES)
             for name, v in rules.items()}
  paths = flat_paths(params)
  absent = [p for p in paths if p not in axes]
  if absent:
    raise ValueError(f'no logical axes for parameters {absent[:5]}')
  leaves, treedef = jax.tree_util.tree_flatten(params)
  specs = [_spec_from_rules(axes[path], leaf.shape, rules, mesh) for path, leaf in zip(paths, leaves)]
  return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, spec) for spec in specs])


def check_fsdp_sharding(shardings: Any, params: Any, mesh: Mesh, *, max_replicated_fraction: float) -> None:
  """Fails loudly when fsdp leaves too much of the model whole on every device (as MaxText's
  assert_params_sufficiently_sharded does): a rule or a divisibility problem silently replicating the weights would
  otherwise show up only as an out-of-memory error at scale."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1:
    return
  total, replicated = 0, []
  for path, sharding, leaf in zip(flat_paths(params), jax.tree.leaves(shardings), jax.tree.leaves(params)):
    size = math.prod(leaf.shape)
    total += size
    if 'fsdp' not in {a for entry in sharding.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}:
      replicated.append((size, path))
  fraction = sum(size for size, _ in replicated) / max(total, 1)
  if fraction > max_replicated_fraction:
    largest = ', '.join(f'{path} ({size:,})' for size, path in sorted(replicated, reverse=True)[:5])
    raise InputError(f'fsdp: {fraction:.1%} of the parameters are not sharded over the {fsdp} fsdp devices (limit '
                     f'{max_replicated_fraction:.0%}, config.sharding.max_replicated_fraction); the largest: {largest}. '
                     f'Check config.sharding.axis_rules and that the fsdp size divides the model width.')


def tensor_heads_problem(mesh: Mesh, heads: Mapping[str, int]) -> str | None:
  """Why attention will not stay local under tensor parallelism, or None: the 'tensor' size must divide every
  tower's heads for `models.common.fused_qkv` to keep whole heads on each device; otherwise the fused q|k|v output
  is split in contiguous blocks and resharded between devices every layer (correct, but slow)."""
  tensor = mesh.shape['tensor']
  odd = {tower: n for tower, n in heads.items() if n % tensor}
  if not odd:
    return None
  towers = ', '.join(f'{tower} {n}' for tower, n in odd.items())
  return (f"the 'tensor' mesh size {tensor} does not divide the heads ({towers}): those towers' q, k and v are "
          'resharded between devices every layer; choose a tensor size that divides every tower\'s heads')


def optimizer_state_shardings(param_sharding_tree: Any, params: Any, mesh: Mesh, strategy: str) -> Any:
  """Shardings for tensors shaped like the parameters (Adam/LAMB moments). zero1 and fsdp shard them over every
  data-parallel device; dp keeps the parameters' (replicated) layout."""
  if strategy == 'dp':
    return param_sharding_tree

  def shard(sharding: NamedSharding, leaf) -> NamedSharding:
    return NamedSharding(mesh, _add_axes(sharding.spec, leaf.shape, BATCH_AXES, mesh))

  return jax.tree.map(shard, param_sharding_tree, params)



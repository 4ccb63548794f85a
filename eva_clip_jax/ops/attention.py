"""The attention seam: one function, `dot_product_attention`, and the registry of backends behind it.

q, k, v are [batch, seq, heads, head_dim] (the layout of `jax.nn.dot_product_attention`); the output has q's shape.
`rope=(cos, sin)` rotates q and k (`ops.rope`, EVA-02's interleaved pairs): tables of n rows, [n, head_dim] or
per-sample [batch, n, head_dim], rotate the last n tokens; the tokens before them (the CLS token) stay unrotated.
A backend that fuses the rotation gets the tables; for any other the seam rotates q and k first. Models call only
this function, naming the backend the user chose, never a kernel.

A backend is registered once, explicitly (`eva_clip_jax/ops/__init__.py` lists them), as a `Backend`: its function
`fn(q, k, v, *, causal, scale)` (plus `rope` when it fuses RoPE), a `supports(shape, dtype, platform)` predicate
(an explicit choice it does not support is an error naming `needs`), whether it is a kernel that must run per device
(XLA cannot partition a kernel's custom call: Mosaic TPU refuses, a Triton or Mosaic GPU call would be replicated; the
seam then runs it in a shard_map over the inputs' mesh, the batch over the axes that divide it, the heads over
'tensor', and `supports` sees the per-device shape), and the platforms on which `auto` considers it.

`auto`: the first registered backend that lists the compile target's platform and supports the inputs, else 'xla'
(GPU: 'cudnn'; TPU: 'pallas_tpu', the whole-sequence kernel, where it fits: the TPU compiler's estimates in
BENCHMARKS.md). "The platform" is the compile target's (`ops.common.compile_target`), so an ahead-of-time compile for
a TPU slice or a deviceless GPU on a CPU host gets the backend of that target.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax

from eva_clip_jax.errors import InputError
from eva_clip_jax.ops.common import compile_platform
from eva_clip_jax.ops.rope import apply_rope_after_prefix

Rope = tuple[jax.Array, jax.Array]


def _everywhere(shape, dtype, platform) -> bool:
  del shape, dtype, platform
  return True


@dataclasses.dataclass(frozen=True)
class Backend:
  """One registered backend (`register_backend`)."""
  name: str
  fn: Callable[..., jax.Array]  # fn(q, k, v, *, causal, scale[, rope]) -> out
  supports: Callable[[tuple[int, ...], jax.typing.DTypeLike, str], bool] = _everywhere
  fuses_rope: bool = False  # fn takes rope=(cos, sin) (or None) and rotates q and k itself
  per_device: bool = False  # a kernel's custom call: run in a shard_map on a mesh of several devices
  auto_on: tuple[str, ...] = ()  # platforms on which 'auto' picks it where it is supported
  needs: str = ''  # what `supports` asks for, in words, for the error of an explicit choice


_BACKENDS: dict[str, Backend] = {}

# Names that no longer select a backend, and what replaced them.
_RENAMED = {
    'pallas': "'pallas' was two kernels and is now two backends: 'pallas_tpu' (the TPU whole-sequence kernel, which "
              "'auto' picks on TPU where it fits) and 'pallas_flash' (the experimental flash kernels: Triton on GPU, "
              'Mosaic on TPU).',
}


def register_backend(name: str, fn: Callable[..., jax.Array], *, supports=_everywhere, fuses_rope: bool = False,
                     per_device: bool = False, auto_on: tuple[str, ...] = (), needs: str = '') -> Backend:
  """Adds a backend under `name` (see the module docstring for the fields)."""
  if name == 'auto' or name in _RENAMED:
    raise ValueError(f'{name!r} is reserved; choose another backend name')
  backend = Backend(name, fn, supports, fuses_rope, per_device, tuple(auto_on), needs)
  _BACKENDS[name] = backend
  return backend


def available_backends() -> list[str]:
  return sorted(_BACKENDS)


def _mesh_axes(q: jax.Array):
  """(mesh, batch axes, head axis) for running a kernel per device over q's mesh; None when it has one device."""
  mesh = getattr(getattr(getattr(q, 'aval', None), 'sharding', None), 'mesh', None)
  if mesh is None or getattr(mesh, 'empty', True) or mesh.size == 1:
    return None
  batch, heads = q.shape[0], q.shape[2]
  batch_axes, size = [], 1
  for axis, n in mesh.shape.items():
    if axis != 'tensor' and n > 1 and batch % (size * n) == 0:
      batch_axes.append(axis)
      size *= n
  tensor = mesh.shape.get('tensor', 1)
  return mesh, tuple(batch_axes) or None, 'tensor' if tensor > 1 and heads % tensor == 0 else None


def local_shape(q: jax.Array) -> tuple[int, ...]:
  """q's shape as one device sees it when a kernel runs per device (`_mesh_axes`)."""
  axes = _mesh_axes(q)
  if axes is None:
    return tuple(q.shape)
  mesh, batch_axes, head_axis = axes
  batch = q.shape[0] // math.prod(mesh.shape[a] for a in batch_axes or ())
  heads = q.shape[2] // (mesh.shape[head_axis] if head_axis else 1)
  return (batch, q.shape[1], heads, q.shape[3])


def _per_device(fn, q: jax.Array, rope: Rope | None):
  """fn(q, k, v, rope) run per device in a shard_map when q lives on a mesh of several devices."""
  axes = _mesh_axes(q)
  if axes is None:
    return fn
  mesh, batch_axes, head_axis = axes
  spec = jax.sharding.PartitionSpec(batch_axes, None, head_axis)
  per_sample = rope is not None and rope[0].ndim == 3
  table = jax.sharding.PartitionSpec(batch_axes) if per_sample else jax.sharding.PartitionSpec()
  tables = None if rope is None else (table, table)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, tables), out_specs=spec, check_vma=False)


def _lookup(name: str) -> Backend:
  if name in _RENAMED:
    raise InputError(f'Unknown attention backend {name!r}: {_RENAMED[name]}')
  if name not in _BACKENDS:
    raise InputError(f'Unknown attention backend {name!r}; available: {available_backends()} and auto.')
  return _BACKENDS[name]


def _supported(backend: Backend, q: jax.Array, platform: str) -> bool:
  shape = local_shape(q) if backend.per_device else tuple(q.shape)
  return backend.supports(shape, q.dtype, platform)


def resolve(backend: str, q: jax.Array) -> Backend:
  """The backend that runs for `backend` ('auto' resolved for q's compile target, see the module docstring)."""
  if backend != 'auto':
    return _lookup(backend)
  platform = compile_platform(q)
  for candidate in _BACKENDS.values():
    if platform in candidate.auto_on and _supported(candidate, q, platform):
      return candidate
  return _lookup('xla')


def validate_backend(backend: str) -> str:
  """Fails early (at model construction) for a backend name that does not exist."""
  if backend != 'auto':
    _lookup(backend)
  return backend


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                          scale: float | None = None, rope: Rope | None = None, backend: str = 'xla') -> jax.Array:
  """softmax(q k^T * scale [+ causal mask]) v over [batch, seq, heads, head_dim] inputs, q and k rotated by `rope`."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f'expected q, k, v as [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}')
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  chosen = resolve(backend, q)
  platform = compile_platform(q)
  if not _supported(chosen, q, platform):
    raise InputError(f'attention backend {chosen.name!r} needs {chosen.needs or "other inputs"}; got q '
                     f'{local_shape(q) if chosen.per_device else q.shape} {q.dtype} (per device), compiled for '
                     f"{platform!r}. attention='auto' picks a backend that fits, 'xla' runs everywhere.")
  if rope is not None and not chosen.fuses_rope:
    q, k = (apply_rope_after_prefix(t, *rope) for t in (q, k))
    rope = None

  def call(q, k, v, rope):
    extra = {'rope': rope} if chosen.fuses_rope else {}
    return chosen.fn(q, k, v, causal=causal, scale=scale, **extra)

  if chosen.per_device:
    call = _per_device(call, q, rope)
  return call(q, k, v, rope)

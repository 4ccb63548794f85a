"""Multi-head attention with a switchable backend.

All backends take q, k, v shaped [batch, seq, heads, head_dim] (the layout of `jax.nn.dot_product_attention`)
and return the same shape. Backends:
  xla    plain einsum + float32 softmax; runs everywhere and is the numerical reference.
  cudnn  cuDNN's fused attention through `jax.nn.dot_product_attention`; NVIDIA GPUs, 16-bit inputs only.
  pallas the project's Pallas kernels: on TPU the whole-sequence kernel (`ops.tpu_attention`) where head_dim
         divides 128, else the flash kernels (`ops.flash_attention`: Mosaic on TPU, Triton on GPU); on CPU the
         Pallas interpreters, correct but slow. `ops.flash_attention` registers the backend through
         `register_backend` when `eva_clip_jax.ops` imports it.
  mosaic Mosaic GPU flash attention on Hopper, tokamax's kernel (`eva_clip_jax.ops.mosaic_attention`: why not
         jax's own, and tokamax being optional); 16-bit inputs. Not chosen by `auto`: unmeasured.
  auto   GPU: 'cudnn' where its constraints hold (16-bit inputs, head_dim a multiple of 8 up to 128; no mask
         but the causal one, which cuDNN takes as `is_causal`), else 'xla'. TPU: 'pallas' where its
         whole-sequence kernel fits (`ops.tpu_attention.supports`: B/16 and L/14's head dim 64, the text tower),
         else 'xla' (the TPU compiler's estimate in BENCHMARKS.md: the kernel saves the score matrices' HBM
         traffic, XLA's attention beats the flash kernel). CPU: 'xla'.

"The platform" is the compile target's, not the default backend's: `compile_platform` reads it from the inputs'
sharding (the mesh's devices, also in an ahead-of-time compile for devices this host does not have, as the
planner does with `jax.experimental.topologies`), and only falls back to `jax.devices()`.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp


class AttentionFn(Protocol):

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float) -> jax.Array:
    ...


def _xla_attention(q, k, v, *, causal: bool, scale: float):
  # Heads-major matmuls with explicit transposes: XLA:CPU runs 'bhqk,bkhd->bqhd' about 3x slower than this.
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    q_len, k_len = q.shape[2], k.shape[2]
    mask = jnp.tril(jnp.ones((q_len, k_len), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  # Softmax in float32 whatever the compute dtype, as the fused kernels of the reference do.
  weights = _softmax_to(logits, v.dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_to(logits: jax.Array, dtype) -> jax.Array:
  """softmax(logits) in float32, returned in `dtype`; its gradient is computed from that `dtype` output.

  jax.nn.softmax's gradient keeps its float32 output for the backward pass, and the matmul with v keeps the 16-bit
  cast: with 16-bit compute each [batch, heads, q, k] score matrix was stored twice, 6 bytes per element (the
  compiled HLO of a deviceless GPU and a TPU compile shows both). Reusing the 16-bit probabilities, which the
  matmul keeps anyway, stores 2 bytes, and rounds the backward's probabilities as FlashAttention's matmuls do.
  """
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _softmax_to_fwd(logits, dtype):
  out = _softmax_to(logits, dtype)
  return out, out


def _softmax_to_bwd(dtype, probs, g):
  del dtype
  probs, g = probs.astype(jnp.float32), g.astype(jnp.float32)
  return (probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)),)


_softmax_to.defvjp(_softmax_to_fwd, _softmax_to_bwd)


_PLATFORM_ALIASES = {'cuda': 'gpu', 'rocm': 'gpu'}


def compile_platform(*arrays) -> str:
  """'tpu', 'gpu' or 'cpu': what the computation consuming `arrays` is compiled for.

  Under jit an input's abstract sharding names its mesh's device kind and platform (`AbstractMesh.abstract_device`),
  through scans, remat and custom_vjp; that is the only place a trace sees the target of an ahead-of-time compile
  for a TPU topology or a deviceless GPU. Concrete arrays name their devices. Otherwise: the default backend.
  """
  for x in arrays:
    mesh = getattr(getattr(getattr(x, 'aval', None), 'sharding', None), 'mesh', None)
    device = getattr(mesh, 'abstract_device', None)
    if device is not None:
      return _PLATFORM_ALIASES.get(device.platform, device.platform)
    try:  # a concrete array; a tracer has no devices
      platform = next(iter(x.devices())).platform
    except Exception:  # pylint: disable=broad-except
      continue
    return _PLATFORM_ALIASES.get(platform, platform)
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  platform = device.platform if device is not None else jax.devices()[0].platform
  return _PLATFORM_ALIASES.get(platform, platform)


def cudnn_supports(q: jax.Array) -> bool:
  """cuDNN fused attention's constraints that `auto` checks: 16-bit inputs, head_dim a multiple of 8 up to 128 (256
  on Hopper). No mask but the causal one (`is_causal`) is ever passed; odd lengths are padded (`_cudnn_attention`)."""
  return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def _cudnn_attention(q, k, v, *, causal: bool, scale: float):
  platform = compile_platform(q, k, v)
  if platform != 'gpu':
    raise ValueError(f"attention backend 'cudnn' needs an NVIDIA GPU, but this computation is compiled for "
                     f"{platform!r}; use attention='xla' (or 'auto').")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention backend 'cudnn' supports bfloat16 and float16 only, got {q.dtype}; "
                     "set dtype='bfloat16' or use attention='xla'.")
  seq = q.shape[1]
  if seq % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation='cudnn')
  # Odd lengths (ViT's 1 + grid^2, the text tower's 77): jax 0.10.2 replaces an absent bias by a placeholder before
  # checking "biased training needs even lengths", so cuDNN's backward refuses 197 tokens even without a mask.
  # One padded token, masked out through the sequence lengths (cuDNN's padding mask), satisfies the check.
  q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
  lengths = jnp.full((q.shape[0],), seq, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation='cudnn')
  return out[:, :seq]


def kernel_mesh_axes(x: jax.Array, batch: int, heads: int):
  """(mesh, batch axes, head axis) for running a kernel per device over `x`'s mesh; None when it has one device.

  XLA cannot partition a kernel's custom call (Mosaic TPU refuses: "Mosaic kernels cannot be automatically
  partitioned"; a Triton or Mosaic GPU call would be replicated), so under jit on a mesh kernels run in a shard_map:
  the batch split over the mesh axes that divide it ('tensor' aside), the heads over 'tensor' where it divides them.
  """
  mesh = getattr(getattr(getattr(x, 'aval', None), 'sharding', None), 'mesh', None)
  if mesh is None or getattr(mesh, 'empty', True) or mesh.size == 1:
    return None
  batch_axes, size = [], 1
  for axis, n in mesh.shape.items():
    if axis != 'tensor' and n > 1 and batch % (size * n) == 0:
      batch_axes.append(axis)
      size *= n
  tensor = mesh.shape.get('tensor', 1)
  return mesh, tuple(batch_axes) or None, 'tensor' if tensor > 1 and heads % tensor == 0 else None


def local_shape(q: jax.Array) -> jax.ShapeDtypeStruct:
  """q [batch, seq, heads, head_dim] as one device sees it when a kernel runs per device (`kernel_mesh_axes`)."""
  axes = kernel_mesh_axes(q, q.shape[0], q.shape[2])
  if axes is None:
    return jax.ShapeDtypeStruct(q.shape, q.dtype)
  mesh, batch_axes, head_axis = axes
  batch = q.shape[0] // math.prod(mesh.shape[a] for a in batch_axes or ())
  heads = q.shape[2] // (mesh.shape[head_axis] if head_axis else 1)
  return jax.ShapeDtypeStruct((batch, q.shape[1], heads, q.shape[3]), q.dtype)


def shard_kernel(x: jax.Array, fn):
  """fn(q, k, v) over [batch, seq, heads, head_dim] arrays, per device when `x` lives on a mesh of several."""
  axes = kernel_mesh_axes(x, x.shape[0], x.shape[2])
  if axes is None:
    return fn
  mesh, batch_axes, head_axis = axes
  spec = jax.sharding.PartitionSpec(batch_axes, None, head_axis)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)


_BACKENDS: dict[str, AttentionFn] = {'xla': _xla_attention, 'cudnn': _cudnn_attention}


def register_backend(name: str, fn: AttentionFn) -> None:
  """The seam for kernels that live elsewhere (the Pallas flash attention registers itself here)."""
  _BACKENDS[name] = fn


def available_backends() -> list[str]:
  return sorted(_BACKENDS)


def resolve_auto(q: jax.Array) -> str:
  """The backend 'auto' means for these inputs on their compile target (see the module docstring)."""
  platform = compile_platform(q)
  if platform == 'gpu' and cudnn_supports(q):
    return 'cudnn'
  if platform == 'tpu' and 'pallas' in _BACKENDS:
    from eva_clip_jax.ops import tpu_attention  # Pallas is imported with the 'pallas' backend anyway
    if tpu_attention.supports(local_shape(q)):
      return 'pallas'
  return 'xla'


def backend_name(backend: str, q: jax.Array) -> str:
  """The backend that runs for `backend` ('auto' resolved for q's compile target)."""
  return resolve_auto(q) if backend == 'auto' else backend


def _resolve(backend: str, q: jax.Array | None = None) -> AttentionFn:
  if backend == 'auto':
    backend = 'xla' if q is None else resolve_auto(q)
  if backend not in _BACKENDS:
    raise ValueError(f'Unknown attention backend {backend!r}; available: {available_backends()}.')
  return _BACKENDS[backend]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                          scale: float | None = None, backend: str = 'xla') -> jax.Array:
  """softmax(q k^T * scale [+ causal mask]) v over [batch, seq, heads, head_dim] inputs."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f'expected q, k, v as [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}')
  if scale is None:
    scale = q.shape[-1] ** -0.5
  return _resolve(backend, q)(q, k, v, causal=causal, scale=scale)


def validate_backend(backend: str) -> str:
  """Fails early (at model construction) for a backend name that does not exist."""
  _resolve(backend)
  return backend



"""Multi-head attention with a switchable backend.

All backends take q, k, v shaped [batch, seq, heads, head_dim] (the layout of `jax.nn.dot_product_attention`)
and return the same shape. Backends:
  xla    plain einsum + float32 softmax; runs everywhere and is the numerical reference.
  cudnn  cuDNN's fused attention through `jax.nn.dot_product_attention`; NVIDIA GPUs only.
  pallas the project's flash-attention kernel (`eva_clip_jax.ops.flash_attention`: Triton on GPU, Mosaic on
         TPU, the Pallas interpreter on CPU, where it is correct but slow). That module registers itself
         through `register_backend` when `eva_clip_jax.ops` imports it.
  auto   'xla' for now, on every platform. Whether GPUs and TPUs should default to 'pallas' (or 'cudnn') awaits
         benchmarks of the kernels on that hardware; on CPU it stays 'xla' (the kernels only interpret there).
"""

from __future__ import annotations

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
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v).transpose(0, 2, 1, 3)


def _cudnn_attention(q, k, v, *, causal: bool, scale: float):
  platform = jax.devices()[0].platform
  if platform != 'gpu':
    raise ValueError(f"attention backend 'cudnn' needs an NVIDIA GPU, but JAX runs on {platform!r}; "
                     "use attention='xla' (or 'auto').")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention backend 'cudnn' supports bfloat16 and float16 only, got {q.dtype}; "
                     "set dtype='bfloat16' or use attention='xla'.")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation='cudnn')


_BACKENDS: dict[str, AttentionFn] = {'xla': _xla_attention, 'cudnn': _cudnn_attention}


def register_backend(name: str, fn: AttentionFn) -> None:
  """The seam for kernels that live elsewhere (the Pallas flash attention registers itself here)."""
  _BACKENDS[name] = fn


def available_backends() -> list[str]:
  return sorted(_BACKENDS)


def _resolve(backend: str) -> AttentionFn:
  if backend == 'auto':
    # Until the kernel benchmarks decide otherwise, XLA is the safe fastest-available choice everywhere.
    backend = 'xla'
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
  return _resolve(backend)(q, k, v, causal=causal, scale=scale)


def validate_backend(backend: str) -> str:
  """Fails early (at model construction) for a backend name that does not exist."""
  _resolve(backend)
  return backend



"""The 'xla' attention backend: plain einsums and a float32 softmax. Runs everywhere; the numerical reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eva_clip_jax.ops.common import MASK_VALUE


def attention(q, k, v, *, causal: bool, scale: float):
  # Heads-major matmuls with explicit transposes: XLA:CPU runs 'bhqk,bkhd->bqhd' about 3x slower than this.
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    q_len, k_len = q.shape[2], k.shape[2]
    mask = jnp.tril(jnp.ones((q_len, k_len), dtype=bool))
    logits = jnp.where(mask, logits, MASK_VALUE)
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

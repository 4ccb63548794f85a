"""The 'cudnn' attention backend: cuDNN's fused attention through `jax.nn.dot_product_attention` (NVIDIA GPUs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEEDS = 'an NVIDIA GPU, bfloat16 or float16 inputs and a head_dim that is a multiple of 8 up to 128'


def supports(shape, dtype, platform: str) -> bool:
  """cuDNN's constraints: 16-bit inputs, head_dim a multiple of 8 up to 128 (256 on Hopper, not used). No mask but the
  causal one (`is_causal`) is ever passed; odd lengths are padded (`attention`)."""
  return platform == 'gpu' and dtype in (jnp.bfloat16, jnp.float16) and shape[-1] % 8 == 0 and shape[-1] <= 128


def attention(q, k, v, *, causal: bool, scale: float):
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

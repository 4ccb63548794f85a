"""Applying rotary position embeddings (EVA-02's convention) to [batch, seq, heads, head_dim] inputs.

`rotate_half` rotates interleaved pairs (x0, x1) -> (-x1, x0); a table row gives each pair's angle twice. The seam
(`ops.attention`) rotates q and k with these for backends that do not fuse the rotation; the tables themselves are
the model's (`models.rope`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate_half(x: jax.Array) -> jax.Array:
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [batch, seq, heads, head_dim] by tables [seq, head_dim] or per-sample [batch, seq, head_dim]."""
  cos = cos[..., None, :].astype(x.dtype)
  sin = sin[..., None, :].astype(x.dtype)
  return x * cos + rotate_half(x) * sin


def apply_rope_after_prefix(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the last n tokens of x by tables of n rows; the seq - n tokens before them (EVA's CLS) stay as they are."""
  prefix = x.shape[1] - cos.shape[-2]
  if prefix < 0:
    raise ValueError(f'rope tables of {cos.shape[-2]} rows for a sequence of {x.shape[1]} tokens')
  if not prefix:
    return apply_rope(x, cos, sin)
  return jnp.concatenate([x[:, :prefix], apply_rope(x[:, prefix:], cos, sin)], axis=1)

"""2D rotary position embedding of the EVA-02 vision tower.

Semantics of the reference (`VisionRotaryEmbeddingFast`): with d = head_dim / 2, frequencies
1 / theta^(2i/d) for i < d/2; grid positions t = arange(grid) / grid * pt_seq_len (so a 336 model interpolates
the 224 model's 16x16 positions); each angle repeated for an interleaved pair; the table for token (r, c) is
[row angles of r | column angles of c], flattened row-major over the grid. `rotate_half` rotates interleaved
pairs (x0, x1) -> (-x1, x0). The CLS token is not rotated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_2d_tables(head_dim: int, grid_size: int, pt_seq_len: int = 16,
                   theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """Returns (cos, sin), each [grid_size**2, head_dim], float32, for patch tokens in row-major order."""
  if head_dim % 4:
    raise ValueError(f'2D RoPE needs head_dim divisible by 4, got {head_dim}')
  dim = head_dim // 2
  freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32)[:dim // 2] / dim))
  t = np.arange(grid_size, dtype=np.float32) / grid_size * pt_seq_len
  angles = np.repeat(np.outer(t, freqs), 2, axis=-1)  # [grid, dim], each angle twice (interleaved pairs)
  rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, dim))
  cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, dim))
  table = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, head_dim)
  return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [batch, seq, heads, head_dim] by tables [seq, head_dim] or per-sample [batch, seq, head_dim]."""
  cos = cos[..., None, :].astype(x.dtype)
  sin = sin[..., None, :].astype(x.dtype)
  return x * cos + rotate_half(x) * sin


def apply_rope_skip_cls(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Applies RoPE to every token but the first (the CLS token)."""
  return jnp.concatenate([x[:, :1], apply_rope(x[:, 1:], cos, sin)], axis=1)

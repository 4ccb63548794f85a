"""2D rotary position embedding of the EVA-02 vision tower.

Semantics of the reference (`VisionRotaryEmbeddingFast`): with d = head_dim / 2, frequencies
1 / theta^(2i/d) for i < d/2; grid positions t = arange(grid) / grid * pt_seq_len (so a 336 model interpolates
the 224 model's 16x16 positions); each angle repeated for an interleaved pair; the table for token (r, c) is
[row angles of r | column angles of c], flattened row-major over the grid. The tables go to the attention seam,
which rotates q and k with them (`ops.rope`: interleaved pairs, (x0, x1) -> (-x1, x0); the CLS token is not rotated).
"""

from __future__ import annotations

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


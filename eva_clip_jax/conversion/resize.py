"""Resizing position embeddings and patch-embedding kernels, with PyTorch's bicubic semantics.

The reference resizes both with `F.interpolate(..., mode='bicubic', align_corners=False)`: Keys' cubic
convolution with a = -0.75, half-pixel centres, edge samples repeated, no antialiasing. `bicubic_resize`
reproduces it exactly as two small matrix products, in numpy, so no torch is needed.
"""

from __future__ import annotations

import math

import numpy as np

from eva_clip_jax.errors import InputError

_A = -0.75


def _cubic(x: np.ndarray) -> np.ndarray:
  x = np.abs(x)
  near = ((_A + 2) * x - (_A + 3)) * x * x + 1
  far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of a 1D bicubic resize (align_corners=False)."""
  scale = in_size / out_size
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    base = math.floor(src)
    t = src - base
    for tap in range(-1, 3):
      matrix[i, min(max(base + tap, 0), in_size - 1)] += _cubic(np.float64(tap - t))
  return matrix


def bicubic_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes the last two axes of `x` to (height, width)."""
  rows = bicubic_matrix(x.shape[-2], height)
  cols = bicubic_matrix(x.shape[-1], width)
  out = np.einsum('hi,...ij,wj->...hw', rows, np.asarray(x, np.float64), cols)
  return out.astype(np.float32)


def resize_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
  """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]; the CLS row is kept as it is."""
  cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
  old = int(round(math.sqrt(patches.shape[1])))
  if old * old != patches.shape[1]:
    raise InputError(f'position embedding has {patches.shape[1]} patch rows, not a square grid')
  if old == grid:
    return pos_embed
  dim = patches.shape[-1]
  image = patches.reshape(1, old, old, dim).transpose(0, 3, 1, 2)
  resized = bicubic_resize(image, grid, grid).transpose(0, 2, 3, 1).reshape(1, grid * grid, dim)
  return np.concatenate([cls, resized.astype(pos_embed.dtype)], axis=1)


def resize_patch_kernel(kernel_hwio: np.ndarray, patch: int) -> np.ndarray:
  """A [p, p, 3, D] patch-embedding kernel resized to [patch, patch, 3, D] (EVA's 14 -> 16)."""
  if kernel_hwio.shape[0] == patch:
    return kernel_hwio
  oihw = kernel_hwio.transpose(3, 2, 0, 1)
  return bicubic_resize(oihw, patch, patch).transpose(2, 3, 1, 0).astype(kernel_hwio.dtype)

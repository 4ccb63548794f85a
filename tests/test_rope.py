"""2D RoPE tables (models.rope) and rotation (ops.rope), against a loop-by-loop restatement of the reference's
definition."""

import jax.numpy as jnp
import numpy as np
import pytest

from eva_clip_jax.models import rope
from eva_clip_jax.ops import rope as rotation


def _reference_angles(head_dim, grid, pt_seq_len, theta=10000.0):
  """Token (r, c), channel j: row angle for j < head_dim/2, column angle after; pairs share an angle."""
  dim = head_dim // 2
  freqs = [1.0 / theta ** (2 * i / dim) for i in range(dim // 2)]
  pos = [p / grid * pt_seq_len for p in range(grid)]
  table = np.zeros((grid * grid, head_dim))
  for r in range(grid):
    for c in range(grid):
      for j in range(head_dim):
        if j < dim:
          table[r * grid + c, j] = pos[r] * freqs[j // 2]
        else:
          table[r * grid + c, j] = pos[c] * freqs[(j - dim) // 2]
  return table


@pytest.mark.parametrize('head_dim,grid', [(64, 16), (64, 14), (64, 24), (32, 4)])
def test_tables_follow_the_reference_definition(head_dim, grid):
  cos, sin = rope.rope_2d_tables(head_dim, grid, pt_seq_len=16)
  angles = _reference_angles(head_dim, grid, 16)
  assert cos.shape == sin.shape == (grid * grid, head_dim)
  np.testing.assert_allclose(cos, np.cos(angles), atol=2e-5)
  np.testing.assert_allclose(sin, np.sin(angles), atol=2e-5)


def test_336_grid_interpolates_the_224_positions():
  # 24x24 grid positions are arange(24) / 24 * 16: the last row sits where the 16-grid's 15.33 would.
  cos24, _ = rope.rope_2d_tables(64, 24)
  angles = _reference_angles(64, 24, 16)
  np.testing.assert_allclose(cos24[23 * 24], np.cos(angles[23 * 24]), atol=2e-5)
  assert np.isclose(angles[23 * 24, 0], 23 / 24 * 16)


def test_rotate_half_rotates_interleaved_pairs():
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  np.testing.assert_array_equal(np.asarray(rotation.rotate_half(x))[0, 0, 0], [-1, 0, -3, 2, -5, 4, -7, 6])


def test_rotation_is_relative_and_norm_preserving():
  """<R(p) q, R(p') k> depends only on p - p' along each axis; |R(p) q| = |q|."""
  cos, sin = (jnp.asarray(t) for t in rope.rope_2d_tables(16, 8, pt_seq_len=8))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(16,)), jnp.float32)

  def rot(v, index):
    return rotation.apply_rope(v[None, None, None, :], cos[index][None], sin[index][None])[0, 0, 0]

  def score(pq, pk):
    return float(jnp.dot(rot(q, pq[0] * 8 + pq[1]), rot(k, pk[0] * 8 + pk[1])))

  assert np.isclose(score((1, 2), (3, 5)), score((4, 1), (6, 4)), atol=1e-4)
  assert not np.isclose(score((1, 2), (3, 5)), score((1, 2), (3, 6)), atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(rot(q, 27)), np.linalg.norm(q), rtol=1e-5)


def test_cls_token_is_not_rotated():
  cos, sin = (jnp.asarray(t) for t in rope.rope_2d_tables(16, 2))
  x = jnp.ones((1, 5, 2, 16))
  out = rotation.apply_rope_after_prefix(x, cos, sin)
  np.testing.assert_array_equal(np.asarray(out[:, 0]), np.ones((1, 2, 16)))
  assert not np.allclose(np.asarray(out[:, 2]), 1.0)


def test_rejects_head_dims_that_cannot_split_into_2d_pairs():
  with pytest.raises(ValueError, match='divisible by 4'):
    rope.rope_2d_tables(66, 4)

"""The contrastive loss: equal to open_clip's ClipLoss, and the sharded form equal to the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from eva_clip_jax.training.loss import clip_loss, sharded_clip_loss
from eva_clip_jax.sharding import BATCH_AXES, make_mesh


def _features(batch=16, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  image, text = rng.normal(size=(2, batch, dim)).astype(np.float32)
  image /= np.linalg.norm(image, axis=-1, keepdims=True)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  return image, text, np.float32(14.3)


def test_matches_open_clip():
  image, text, scale = _features()
  expected = ClipLoss()(torch.from_numpy(image), torch.from_numpy(text), torch.tensor(scale)).item()
  np.testing.assert_allclose(float(clip_loss(image, text, scale)), expected, rtol=1e-6)


def test_label_smoothing_matches_torch_cross_entropy():
  image, text, scale = _features()
  logits = torch.from_numpy(scale * image @ text.T)
  labels = torch.arange(image.shape[0])
  expected = (F.cross_entropy(logits, labels, label_smoothing=0.1)
              + F.cross_entropy(logits.T, labels, label_smoothing=0.1)).item() / 2
  np.testing.assert_allclose(float(clip_loss(image, text, scale, label_smoothing=0.1)), expected, rtol=1e-6)


@pytest.mark.parametrize('mesh_shape', [dict(data=8), dict(data=2, fsdp=4), dict(data=4, tensor=2)])
def test_sharded_loss_and_gradients_equal_single_device(mesh_shape):
  image, text, scale = _features(batch=16)
  mesh = make_mesh(mesh_shape)

  def single(image, text, scale):
    return clip_loss(image, text, scale, label_smoothing=0.05)

  def sharded(image, text, scale):
    return sharded_clip_loss(image, text, scale, mesh=mesh, batch_axes=BATCH_AXES, label_smoothing=0.05)

  expected, expected_grads = jax.value_and_grad(single, argnums=(0, 1, 2))(image, text, scale)
  loss, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(image, text, scale)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-7)


def test_each_device_computes_local_rows_only():
  """Per-device logits are [local, global]: the compiled loss has no [global, global] intermediate."""
  image, text, scale = _features(batch=64, dim=8)
  mesh = make_mesh(dict(data=8))
  fn = jax.jit(lambda i, t, s: sharded_clip_loss(i, t, s, mesh=mesh, batch_axes=BATCH_AXES))
  hlo = fn.lower(image, text, scale).compile().as_text()
  assert 'f32[8,64]' in hlo
  assert 'f32[64,64]' not in hlo
  assert jnp.isfinite(fn(image, text, scale))

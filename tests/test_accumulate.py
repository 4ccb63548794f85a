"""Contrastive gradient accumulation: K micro-batches give the loss and the update of the whole batch, on one
device and on eight; each micro-batch draws the same patch-dropout masks in both passes; float16 loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_clip_jax.training import accumulate
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from eva_clip_jax.training.loss import clip_loss
from helpers import single_device_mesh, train_batch, train_config


def _one_step(config, mesh, params):
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, params)
  state, metrics = step_lib.make_train_step(setup)(state, step_lib.device_batch(train_batch(config), mesh))
  return jax.device_get(state), jax.device_get(metrics)


def test_split_and_join_are_inverse_and_keep_rows_on_their_device():
  x = np.arange(64)
  micro = accumulate.split_micro_batches(x, 4, num_shards=8)
  assert micro.shape == (4, 16)
  np.testing.assert_array_equal(accumulate.join_micro_batches(micro, num_shards=8), x)
  # Device d holds rows 8d .. 8d+7 of the batch; its two rows of every micro-batch are among them.
  for k in range(4):
    for d in range(8):
      assert set(micro[k, 2 * d:2 * d + 2]) <= set(range(8 * d, 8 * d + 8))


@pytest.fixture(scope='module')
def full_batch_step(initial_params):
  # No patch dropout: the full batch's masks could not equal the micro-batches' (they are drawn per call).
  config = train_config(batch_size=64, **{'model.patch_dropout': 0.0})
  return _one_step(config, single_device_mesh(), initial_params)


@pytest.mark.parametrize('strategy,mesh_shape', [('zero1', None), ('zero1', dict(data=8)),
                                                 ('fsdp', dict(data=2, fsdp=4))])
def test_four_micro_batches_of_16_equal_one_batch_of_64(full_batch_step, initial_params, strategy,
                                                        mesh_shape):
  want_state, want = full_batch_step
  config = train_config(batch_size=64, accum_steps=4, **{'model.patch_dropout': 0.0, 'sharding.strategy': strategy})
  mesh = single_device_mesh() if mesh_shape is None else sharding_lib.make_mesh(mesh_shape)
  state, got = _one_step(config, mesh, initial_params)
  # float32; the sums run in a different order, hence not bit-exact.
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)
  np.testing.assert_allclose(got['grad_norm'], want['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.opt_state.mu), jax.tree.leaves(want_state.opt_state.mu)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)  # (1 - b1) x the clipped gradient
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_micro_batches_draw_the_same_masks_in_both_passes(initial_params):
  """With 50% patch dropout the accumulated gradient equals the direct gradient of the loss of the micro-batches'
  features, each computed with its own key: had the re-run drawn other masks, it would not."""
  config = train_config(batch_size=32)
  assert config.model.patch_dropout == 0.5
  mesh = single_device_mesh()
  setup = step_lib.make_setup(config, mesh)
  params = jax.device_put(initial_params, setup.shardings.params)
  batch = step_lib.device_batch(train_batch(config), mesh)
  rng = jax.random.key(7)

  def encode(params, images, text, key):
    return setup.model(params)(images, text, train=True, rng=key)

  def loss_fn(image_features, text_features, logit_scale):
    return clip_loss(image_features, text_features, logit_scale)

  @jax.jit
  def accumulated(params, batch):
    return accumulate.accumulated_value_and_grad(encode, loss_fn, params, batch, rng, accum_steps=4, mesh=mesh,
                                                 batch_axes=sharding_lib.BATCH_AXES)

  @jax.jit
  def direct(params, batch):
    def loss(params):
      images, text = (accumulate.split_micro_batches(batch[k], 4, 1) for k in ('image', 'text'))
      outs = [encode(params, images[k], text[k], key) for k, key in enumerate(jax.random.split(rng, 4))]
      return loss_fn(jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs]), outs[0][2])
    return jax.value_and_grad(loss)(params)

  loss, _, grads = accumulated(params, batch)
  want_loss, want_grads = direct(params, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):  # float32 sums in another order
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


def test_float16_loss_scale_under_accumulation(initial_params):
  """The loss scale multiplies the cached features' gradients and is divided out of the summed gradient: the
  float16 accumulated step matches the float16 full-batch step to float16 precision and is not skipped."""
  changes = {'model.dtype': 'float16', 'loss_scale.initial_power': 4, 'model.patch_dropout': 0.0}
  mesh = single_device_mesh()
  _, want = _one_step(train_config(batch_size=32, **changes), mesh, initial_params)
  _, got = _one_step(train_config(batch_size=32, accum_steps=4, **changes), mesh, initial_params)
  assert int(got['skipped_steps']) == 0 and float(got['loss_scale']) == 16.0
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=2e-3)
  np.testing.assert_allclose(got['grad_norm'], want['grad_norm'], rtol=2e-2)


def test_batch_that_does_not_split_is_refused():
  mesh = sharding_lib.make_mesh(dict(data=8))
  setup = step_lib.make_setup(train_config(batch_size=16, accum_steps=4), mesh)
  with pytest.raises(ValueError, match='accum_steps=4'):
    step_lib.make_train_step(setup)
  with pytest.raises(ValueError, match='accum_steps must be at least 1, got -2'):
    step_lib.make_train_step(step_lib.make_setup(train_config(batch_size=16, accum_steps=-2), mesh))

"""The train step takes the input pipeline's uint8 images and normalises them itself: the same step as on images
normalised on the host."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import tiny
from eva_clip_jax import transforms
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib


def test_uint8_batch_trains_as_the_host_normalised_batch():
  config = tiny.get_config()
  config.batch_size, config.total_steps, config.schedule.warmup_steps = 4, 4, 1
  mesh = sharding_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup)
  states = (state, jax.tree.map(jnp.copy, state))  # the step donates its state: one each
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
  text = rng.integers(1, 49407, (4, 32)).astype(np.int32)  # the tiny model's context length
  host_normalised = np.stack([transforms.normalize(Image.fromarray(x)) for x in images])
  train_step = step_lib.make_train_step(setup)
  results = []
  for state, image in zip(states, (images, host_normalised)):
    state, metrics = train_step(state, step_lib.device_batch({'image': image, 'text': text}, mesh))
    results.append((jax.device_get(metrics['loss']), jax.device_get(state.params)))
  (loss_u8, params_u8), (loss_f32, params_f32) = results
  np.testing.assert_allclose(loss_u8, loss_f32, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_u8, params_f32)

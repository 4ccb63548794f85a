"""One train step under dp, zero1 and fsdp on 8 fake devices equals the single-device step; zero1 shards the
optimizer state 8 ways; float16 loss scaling skips non-finite steps."""

import jax
import numpy as np
import pytest

from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from helpers import single_device_mesh, train_batch, train_config


def _run(config, mesh, params, steps=1):
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, params)
  train_step = step_lib.make_train_step(setup)
  history = []
  for i in range(steps):
    state, metrics = train_step(state, step_lib.device_batch(train_batch(config, seed=i), mesh))
    history.append(jax.device_get(metrics))
  return setup, state, history


@pytest.fixture(scope='module')
def reference(initial_params):
  config = train_config()
  _, state, history = _run(config, single_device_mesh(), initial_params)
  return jax.device_get(state), history


@pytest.mark.parametrize('strategy,mesh_shape', [('dp', dict(data=8)), ('zero1', dict(data=8)),
                                                 ('fsdp', dict(data=2, fsdp=4))])
def test_sharded_step_equals_single_device(reference, initial_params, strategy, mesh_shape):
  expected_state, expected_history = reference
  config = train_config(**{'sharding.strategy': strategy})
  _, state, history = _run(config, sharding_lib.make_mesh(mesh_shape), initial_params)
  np.testing.assert_allclose(history[0]['loss'], expected_history[0]['loss'], rtol=1e-6)
  np.testing.assert_allclose(history[0]['grad_norm'], expected_history[0]['grad_norm'], rtol=1e-5)
  got = jax.device_get(state)
  # After one step the first moment is (1 - b1) * clipped gradient: comparing it compares the gradients.
  for got_leaf, want_leaf in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(expected_state.opt_state)):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-5, atol=1e-7)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected_state.params)):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-5, atol=1e-6)
  if strategy == 'fsdp':  # the parameters themselves are sharded over the fsdp axis
    kernel = state.params['visual']['blocks']['mlp']['w1']['kernel']
    assert kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // 4


def test_zero1_shards_the_optimizer_state_eight_ways(initial_params):
  config = train_config(**{'sharding.strategy': 'zero1'})
  mesh = sharding_lib.make_mesh(dict(data=8))
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, initial_params)
  total = per_device = 0
  for leaf in jax.tree.leaves(state.opt_state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += leaf.nbytes
    per_device += int(np.prod(shard)) * leaf.dtype.itemsize
    if any(dim % 8 == 0 for dim in leaf.shape):  # every leaf that can be split 8 ways is
      assert int(np.prod(shard)) * 8 == leaf.size, (leaf.shape, leaf.sharding)
  # What stays replicated (the step count, 170-wide biases of the tiny model) is under 1% of the state.
  assert per_device < total / 8 * 1.01
  for leaf in jax.tree.leaves(state.params):  # the parameters stay replicated
    assert leaf.sharding.is_fully_replicated


def test_float16_skips_non_finite_steps_and_backs_off_the_scale(initial_params):
  """DeepSpeed's scaler with the reference's hysteresis 2: the first overflow is tolerated (scale kept), the second
  halves the scale; both steps are skipped and leave parameters and moments untouched. The overflows come from the
  data: steps 1 and 2 get a batch with an inf pixel."""
  # The tiny model's own float16 gradients overflow at the reference's 2^16 (its random-init head gradient is ~1.6e3),
  # which the scaler would work down from; 2^4 keeps them finite so that only the poisoned steps overflow.
  config = train_config(**{'model.dtype': 'float16', 'loss_scale.initial_power': 4})
  mesh = single_device_mesh()
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, initial_params)
  train_step = step_lib.make_train_step(setup)
  states, history = [], []
  for i in range(4):
    batch = train_batch(config, seed=i, poisoned=i in (1, 2))
    state, metrics = train_step(state, step_lib.device_batch(batch, mesh))
    states.append(jax.device_get(state))
    history.append(jax.device_get(metrics))
  assert [float(h['loss_scale']) for h in history] == [16.0, 16.0, 16.0, 8.0]
  assert [int(h['skipped_steps']) for h in history] == [0, 1, 2, 2]
  assert [int(s.loss_scale.cur_hysteresis) for s in states[:3]] == [2, 1, 1]
  after_first, after_skips = states[0], states[2]
  for a, b in zip(jax.tree.leaves((after_skips.params, after_skips.opt_state)),
                  jax.tree.leaves((after_first.params, after_first.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.isfinite(history[3]['loss']) and history[3]['grad_norm'] > 0
  assert int(states[3].step) == 4 and int(states[3].opt_state.count) == 2  # two updates applied

"""Locked towers (open_clip's --lock-image / --lock-text): locked parameters stay bit-identical, hold no optimizer
moments and are not updated; the unlocked last groups and the other tower train."""

import jax
import numpy as np

from eva_clip_jax.models.paths import flatten
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from helpers import train_batch, train_config


def test_locked_image_tower_and_partly_locked_text_tower(initial_params):
  # LiT-style: the image tower locked whole; the text tower locked but for its last two groups (the final norm and
  # projection, and the last block). On 8 devices under zero1, so the moments' shardings are exercised too.
  # With two accumulation micro-batches: the re-run differentiates the trainable view only.
  config = train_config(accum_steps=2, **{'lock_towers.visual': True, 'lock_towers.text': True,
                                     'lock_towers.text_unlocked_groups': 2, 'sharding.strategy': 'zero1'})
  mesh = sharding_lib.make_mesh(dict(data=8))
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, initial_params)
  train_step = step_lib.make_train_step(setup)
  for i in range(3):
    state, metrics = train_step(state, step_lib.device_batch(train_batch(config, seed=i), mesh))
  assert np.isfinite(float(metrics['loss'])) and int(metrics['skipped_steps']) == 0
  start, end = flatten(jax.device_get(initial_params)), flatten(jax.device_get(state.params))
  mu, nu = flatten(jax.device_get(state.opt_state.mu)), flatten(jax.device_get(state.opt_state.nu))
  text_depth = start['text/blocks/ln_1/scale'].shape[0]
  for path in start:
    if path.startswith('visual/') or path.startswith('text/token_embedding') or path.startswith(
        'text/positional_embedding'):
      np.testing.assert_array_equal(end[path], start[path], err_msg=path)
      assert mu[path].size == nu[path].size == 0, path  # no moments allocated
    elif path.startswith('text/blocks/'):  # stacked: layers but the last locked, the last trained
      np.testing.assert_array_equal(end[path][:-1], start[path][:-1], err_msg=path)
      assert mu[path].shape == (1, *start[path].shape[1:]), (path, mu[path].shape)
    else:  # text final norm and projection, logit scale
      assert mu[path].shape == start[path].shape, path
  trained = ['text/blocks/attn/in_proj/kernel', 'text/blocks/mlp/c_fc/kernel', 'text/text_projection']
  trained = [p for p in start if any(p.startswith(t) for t in trained)]
  assert trained
  for path in trained:
    assert not np.array_equal(end[path][-1] if path.startswith('text/blocks') else end[path],
                              start[path][-1] if path.startswith('text/blocks') else start[path]), path
  assert text_depth >= 2
  table = setup.parameter_table()
  assert 'locked' in table and f'layers < {text_depth - 1} locked' in table


def test_locking_frees_the_optimizer_state(initial_params):
  """The abstract state (what the memory planner and the checkpointer see) has no moments for a locked tower."""
  mesh = sharding_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  full = step_lib.make_setup(train_config(), mesh).abstract_state.opt_state
  lit = step_lib.make_setup(train_config(**{'lock_towers.visual': True}), mesh).abstract_state.opt_state
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  visual = sum(x.size for x in jax.tree.leaves(initial_params['visual']))
  assert size(full.mu) - size(lit.mu) == visual

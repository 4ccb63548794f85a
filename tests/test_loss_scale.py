"""Dynamic loss scaling against a transcription of DeepSpeed's DynamicLossScaler.update_scale, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from eva_clip_jax.training.loss_scale import all_finite, init_loss_scale, select_tree, update_loss_scale

RECIPE = dict(tiny.get_config().loss_scale)  # the reference's settings: 2^16, window 1000, hysteresis 2, min 1


class DeepSpeedScaler:
  """deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler, consecutive_hysteresis=False, without the error
  DeepSpeed raises when the scale is already at its minimum."""

  def __init__(self, init_scale=2.0 ** 16, scale_window=1000, delayed_shift=2, min_scale=1.0, scale_factor=2.0):
    self.cur_scale, self.scale_window, self.delayed_shift = init_scale, scale_window, delayed_shift
    self.min_scale, self.scale_factor = min_scale, scale_factor
    self.cur_iter, self.last_overflow_iter, self.cur_hysteresis = 0, -1, delayed_shift

  def update_scale(self, overflow):
    if overflow:
      if self.delayed_shift == 1 or self.cur_hysteresis == 1:
        self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
      else:
        self.cur_hysteresis -= 1
      self.last_overflow_iter = self.cur_iter
    else:
      if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
        self.cur_hysteresis = self.delayed_shift
        self.cur_scale *= self.scale_factor
    self.cur_iter += 1

  def snapshot(self):
    return self.cur_scale, self.cur_hysteresis, self.last_overflow_iter, self.cur_iter


@jax.jit
def _run(state, finite_flags):
  """The state after each step of a sequence of finite/non-finite flags (lax.scan, so one compile)."""
  def body(state, finite):
    state = update_loss_scale(state, finite)
    return state, (state.scale, state.cur_hysteresis, state.last_overflow_iter, state.cur_iter)
  return jax.lax.scan(body, state, finite_flags)


def _compare(overflows, *, initial_power=16, window=1000, hysteresis=2, min_scale=1.0):
  """Runs both scalers on the same overflow sequence; returns the JAX per-step scales."""
  state = init_loss_scale(True, initial_power=initial_power, window=window, hysteresis=hysteresis,
                          min_scale=min_scale)
  final, history = _run(state, jnp.asarray(~np.asarray(overflows, bool)))
  scales, hysts, lasts, iters = (np.asarray(h) for h in history)
  ref = DeepSpeedScaler(2.0 ** initial_power, window, hysteresis, min_scale)
  for i, overflow in enumerate(overflows):
    ref.update_scale(bool(overflow))
    got = (float(scales[i]), int(hysts[i]), int(lasts[i]), int(iters[i]))
    assert got == ref.snapshot(), (i, got, ref.snapshot())
  assert int(final.skipped) == int(np.sum(overflows))
  return np.asarray(scales)


def test_finite_run_doubles_at_the_window():
  scales = _compare(np.zeros(2001, bool))
  # The update at iteration 999 (the 1000th finite step) doubles it, and again at 1999.
  assert scales[998] == 2.0 ** 16 and scales[999] == 2.0 ** 17
  assert scales[1998] == 2.0 ** 17 and scales[1999] == 2.0 ** 18


def test_hysteresis_delays_the_halving():
  one = np.zeros(10, bool)
  one[3] = True
  scales = _compare(one)
  assert (scales == 2.0 ** 16).all()  # one overflow only uses up the hysteresis
  two = np.zeros(10, bool)
  two[3:5] = True
  scales = _compare(two)
  assert scales[3] == 2.0 ** 16 and (scales[4:] == 2.0 ** 15).all()  # the second one halves, once
  three = np.zeros(10, bool)
  three[3:6] = True
  assert _compare(three)[5] == 2.0 ** 14  # hysteresis stays spent: every further overflow halves


def test_hysteresis_one_halves_at_once():
  overflows = np.zeros(6, bool)
  overflows[2] = True
  scales = _compare(overflows, hysteresis=1)
  assert scales[1] == 2.0 ** 16 and scales[2] == 2.0 ** 15


def test_min_scale_floor():
  scales = _compare(np.ones(5, bool), initial_power=2, hysteresis=1, min_scale=1.0)
  np.testing.assert_array_equal(scales, [2.0, 1.0, 1.0, 1.0, 1.0])


def test_growth_counts_from_the_last_overflow_and_resets_hysteresis():
  rng = np.random.default_rng(0)
  overflows = rng.random(400) < 0.08
  overflows[100:103] = True
  _compare(overflows, window=7)
  _compare(overflows, window=7, hysteresis=3)


def test_disabled_keeps_scale_one_but_counts_skips():
  state = init_loss_scale(False, **RECIPE)
  assert float(state.scale) == 1.0
  final, (scales, *_) = _run(state, jnp.asarray([True, False, False, True]))
  assert (np.asarray(scales) == 1.0).all()
  assert int(final.skipped) == 2 and int(final.cur_iter) == 4 and int(final.last_overflow_iter) == 2


def test_all_finite_and_select():
  good = {'a': jnp.ones(3), 'b': {'c': jnp.zeros((2, 2), jnp.float16)}}
  assert bool(jax.jit(all_finite)(good))
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    assert not bool(jax.jit(all_finite)({**good, 'a': jnp.array([1.0, bad, 2.0])}))
  new, old = {'w': jnp.full(3, 2.0)}, {'w': jnp.full(3, 1.0)}
  np.testing.assert_array_equal(jax.jit(select_tree)(jnp.asarray(False), new, old)['w'], old['w'])
  np.testing.assert_array_equal(jax.jit(select_tree)(jnp.asarray(True), new, old)['w'], new['w'])


@pytest.mark.parametrize('enabled', [True, False])
def test_state_is_a_pytree_that_survives_jit(enabled):
  state = init_loss_scale(enabled, **RECIPE)
  out = jax.jit(update_loss_scale)(state, jnp.asarray(True))
  assert out.enabled == enabled and out.window == 1000 and out.hysteresis == 2
  assert len(jax.tree.leaves(out)) == 5

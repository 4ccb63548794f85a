"""The vision tower with attention='pallas_flash' (fused RoPE, interpreted on CPU) equals attention='xla'.

Training mode with patch dropout exercises the per-sample tables the tower gathers for the kept patches. Parameters
are randomised first: at initialisation EVA's head is scaled by 1e-3, which would make any tolerance vacuous.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_clip_jax.models import create_model
from eva_clip_jax.ops import attention as attention_lib

pytestmark = pytest.mark.usefixtures('float32_matmuls')  # float32 tolerances: no TF32 on GPUs


def randomize(params, seed=0):
  """Random parameters of a useful scale: LayerNorm scales near 1, everything else ~0.05 (NumPy: no compiles)."""
  gen = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = gen.standard_normal(leaf.shape).astype(np.float32)
    is_scale = any(getattr(p, 'key', None) == 'scale' for p in path)
    return jnp.asarray(1.0 + 0.1 * noise if is_scale else 0.05 * noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, params)


def encode_and_grads(model, images, cotangent, rng):
  """encode_image(train=True) and the gradient of sum(cotangent * output) w.r.t. all parameters."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = randomize(params)

  @jax.jit
  def run(params):
    def loss(params):
      out = nnx.merge(graphdef, params, rest).encode_image(images, train=True, rng=rng)
      return jnp.sum(out * cotangent), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  return jax.device_get(run(params))


@pytest.mark.parametrize('patch_dropout', [0.0, 0.5])
def test_fused_rope_pallas_equals_xla(patch_dropout, monkeypatch):
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  cotangent = jax.random.normal(jax.random.key(1), (2, 64))
  rng = jax.random.key(2)  # the same patch-dropout draw for both backends
  results = {}
  for backend in ('xla', 'pallas_flash'):
    model = create_model('tiny', attention=backend, patch_dropout=patch_dropout)
    if backend == 'pallas_flash':  # the fused path must not rotate q and k outside the kernel
      monkeypatch.setattr(attention_lib, 'apply_rope_after_prefix', _fail)
    results[backend] = encode_and_grads(model, images, cotangent, rng)
  (out_p, grads_p), (out_x, grads_x) = results['pallas_flash'], results['xla']
  assert np.abs(out_x).max() > 0.1  # a non-trivial function of the inputs
  # float32 rounding, relative to each array's largest magnitude (gradients reach ~25 here). Measured: output
  # <= 8e-7, gradients <= 1.4e-6 of their array's largest magnitude.
  assert_close_to_scale(out_p, out_x, 1e-5)
  flat_p, flat_x = (jax.tree_util.tree_flatten_with_path(g)[0] for g in (grads_p, grads_x))
  for (path, a), (_, b) in zip(flat_p, flat_x):
    assert_close_to_scale(a, b, 1e-5, err_msg=jax.tree_util.keystr(path))


def assert_close_to_scale(got, want, rel, err_msg=''):
  np.testing.assert_allclose(got, want, atol=rel * max(np.abs(want).max(), 1e-30), rtol=0, err_msg=err_msg)


def _fail(*args, **kwargs):
  raise AssertionError("attention='pallas_flash' should pass the RoPE tables to the kernel, not rotate q/k itself")

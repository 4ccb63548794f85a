"""`mlp_pad_multiple`: the vision MLP computed at a padded hidden size equals the unpadded MLP, forward and
gradients, and parameters keep their true shapes. The sub-LN's statistics must ignore the padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_clip_jax.models import create_model, get_model_spec
from eva_clip_jax.models import rope as rope_lib
from eva_clip_jax.models.common import ModelOptions
from eva_clip_jax.models.vision import EvaBlock, hidden_padding
from conftest import small_bige_spec
from test_model_pallas import randomize


def _value_and_grads(module, fn, *args):
  """fn(module, *args) and the gradient of sum(cotangent * output) w.r.t. the module's (randomised) params."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params = randomize(params)

  @jax.jit
  def run(params, args):
    def loss(params):
      out = fn(nnx.merge(graphdef, params, rest), *args)
      cotangent = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
      return jnp.sum(out * cotangent), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  return jax.device_get(run(params, args))


def _assert_same(got, want, rtol):
  """Equal up to float32 rounding: errors relative to each array's largest magnitude."""
  (out_a, grads_a), (out_b, grads_b) = got, want
  assert jax.tree.map(np.shape, grads_a) == jax.tree.map(np.shape, grads_b)  # true shapes, padded or not
  np.testing.assert_allclose(out_a, out_b, atol=rtol * np.abs(out_b).max(), rtol=0)
  for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(g)[0] for g in (grads_a, grads_b))):
    np.testing.assert_allclose(a, b, atol=rtol * max(np.abs(b).max(), 1e-30), rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_hidden_padding():
  assert hidden_padding(2730, 128) == 86 and hidden_padding(170, 128) == 86
  assert hidden_padding(2048, 128) == 0 and hidden_padding(2730, 0) == 0 and hidden_padding(2730, 1) == 0
  with pytest.raises(ValueError, match='mlp_pad_multiple'):
    ModelOptions(mlp_pad_multiple=-1)


def test_tiny_model_padded_equals_unpadded():
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  results = {}
  for multiple in (0, 128):  # 170 -> 256
    model = create_model('tiny', mlp_pad_multiple=multiple, patch_dropout=0.5)
    results[multiple] = _value_and_grads(
        model, lambda m, x: m.encode_image(x, train=True, rng=jax.random.key(1)), images)
  _assert_same(results[128], results[0], rtol=5e-6)  # measured: 3e-7 (output), 5e-7 (grads)
  # The padding really is in the computation: the w1 matmul produces 256 hidden features.
  model = create_model('tiny', mlp_pad_multiple=128)
  jaxpr = str(jax.make_jaxpr(lambda x: model.encode_image(x))(images))
  assert 'f32[2,65,256]' in jaxpr and 'f32[2,65,170]' not in jaxpr


@pytest.mark.parametrize('name,multiple', [('EVA02-CLIP-L-14', 128), ('bige-small', 128)])
def test_single_block_padded_equals_unpadded(name, multiple):
  # L/14: SwiGLU with sub-LN, 2730 -> 2816. bige-small: GELU without sub-LN, 960 -> 1024.
  spec = small_bige_spec().vision if name == 'bige-small' else get_model_spec(name).vision
  x = jax.random.normal(jax.random.key(0), (1, spec.num_patches + 1, spec.width))
  rope = tuple(jnp.asarray(t) for t in rope_lib.rope_2d_tables(spec.head_dim, spec.grid_size)) if spec.rope else None
  results = {}
  for m in (0, multiple):
    block = EvaBlock(spec, ModelOptions(mlp_pad_multiple=m), rngs=nnx.Rngs(0))
    results[m] = _value_and_grads(block, lambda b, x: b(x, rope=rope), x)
  _assert_same(results[multiple], results[0], rtol=1e-5)  # measured: <= 3e-7 (output), 1.1e-6 (grads)


def test_parameters_and_init_are_unchanged():
  plain = nnx.state(create_model('tiny'), nnx.Param).to_pure_dict()
  padded = nnx.state(create_model('tiny', mlp_pad_multiple=128), nnx.Param).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, padded, plain)

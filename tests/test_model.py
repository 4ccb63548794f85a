"""Model behaviour on the tiny model: options that must not change results, training-only randomness, API."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eva_clip_jax as ec
from eva_clip_jax.conversion import assign_params, model_params
from eva_clip_jax.models import vision
from eva_clip_jax.models.common import drop_path


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  text = jnp.asarray(ec.tokenize(['a photo of a cat', 'a dog'], 32))
  return images, text


def _loss(model, images, text):
  image, txt, scale = model(images, text)
  logits = scale * image @ txt.T
  labels = jnp.arange(logits.shape[0])
  return -(jax.nn.log_softmax(logits)[labels, labels].mean() + jax.nn.log_softmax(logits.T)[labels, labels].mean())


@nnx.jit
def _grads(model, images, text):
  return nnx.to_pure_dict(nnx.grad(_loss)(model, images, text))


@nnx.jit
def _forward(model, images, text):
  return model(images, text)


def _assert_trees_close(a, b, atol, rtol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def test_call_returns_normalised_features_and_scale(batch):
  model = ec.create_model('tiny')
  image, text, scale = model(*batch)
  assert image.shape == text.shape == (2, 64)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(image), axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
  assert float(model.logit_scale[...]) == pytest.approx(math.log(1 / 0.07))
  raw = model.encode_text(batch[1])
  assert not np.allclose(np.linalg.norm(np.asarray(raw), axis=-1), 1.0)


@pytest.mark.parametrize('options', [dict(scan_layers=False), dict(remat='full'), dict(remat='dots'),
                                     dict(remat='dots_no_batch', scan_layers=False)])
def test_scan_and_remat_change_nothing_numerically(batch, options):
  base, other = ec.create_model('tiny'), ec.create_model('tiny', **options)
  _assert_trees_close(nnx.to_pure_dict(nnx.state(base, nnx.Param)), nnx.to_pure_dict(nnx.state(other, nnx.Param)),
                      atol=0)
  _assert_trees_close(_forward(base, *batch), _forward(other, *batch), atol=1e-6)
  _assert_trees_close(_grads(base, *batch), _grads(other, *batch), atol=1e-5, rtol=1e-5)


def test_jit_matches_eager(batch):
  model = ec.create_model('tiny')
  jitted = nnx.jit(lambda m, i, t: m(i, t))(model, *batch)
  _assert_trees_close(jitted, model(*batch), atol=1e-5)


@pytest.mark.parametrize('dtype,param_dtype', [('bfloat16', 'float32'), ('float16', 'float32'),
                                               ('bfloat16', 'bfloat16')])
def test_16_bit_compute_and_storage(batch, dtype, param_dtype):
  model = ec.create_model('tiny', dtype=dtype, param_dtype=param_dtype)
  ref = ec.create_model('tiny')
  assign_params(ref, model_params(model))  # the same (possibly bf16-rounded) weights, in float32
  kernel = model.visual.blocks.attn.q_proj.kernel[...]
  assert kernel.dtype == jnp.dtype(param_dtype)
  assert model.logit_scale[...].dtype == jnp.float32
  image, text, _ = model(*batch)
  ref_image, ref_text, _ = ref(*batch)
  assert image.dtype == jnp.float32  # normalised features come back in float32
  # 16-bit results are the float32 results on the same weights to within 16-bit rounding.
  np.testing.assert_allclose(np.asarray(image), np.asarray(ref_image), atol=5e-2)
  np.testing.assert_allclose(np.asarray(text), np.asarray(ref_text), atol=5e-2)


def test_num_kept_patches_is_the_references():
  assert vision.num_kept_patches(196, 0.5) == 98
  assert vision.num_kept_patches(256, 0.5) == 128
  assert vision.num_kept_patches(257 - 1, 0.75) == 64
  assert vision.num_kept_patches(10, 0.99) == 1  # never fewer than one patch
  assert vision.num_kept_patches(7, 0.5) == 3  # int() truncates


def test_sampled_keep_indices_are_distinct_patches():
  idx = np.asarray(vision.sample_patch_keep_indices(jax.random.key(0), 4, 64, 0.5))
  assert idx.shape == (4, 32)
  for row in idx:
    assert len(set(row.tolist())) == 32 and row.min() >= 0 and row.max() < 64
  assert len({tuple(sorted(r)) for r in idx.tolist()}) == 4  # per-sample subsets


def test_patch_dropout_only_in_training(batch):
  images, _ = batch
  plain = ec.create_model('tiny')
  masked = ec.create_model('tiny', patch_dropout=0.5)
  eval_out = masked.encode_image(images, normalize=True)
  np.testing.assert_allclose(np.asarray(eval_out), np.asarray(plain.encode_image(images, normalize=True)),
                             atol=1e-6)
  a = masked.encode_image(images, normalize=True, train=True, rng=jax.random.key(1))
  b = masked.encode_image(images, normalize=True, train=True, rng=jax.random.key(2))
  a_again = masked.encode_image(images, normalize=True, train=True, rng=jax.random.key(1))
  assert np.abs(np.asarray(a) - np.asarray(eval_out)).max() > 1e-3
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a_again))
  with pytest.raises(ValueError, match='needs an rng'):
    masked.encode_image(images, train=True)


def test_patch_dropout_equals_explicit_indices(batch):
  """The random mask is exactly 'keep these tokens': same result as passing the sampled indices."""
  images, _ = batch
  model = ec.create_model('tiny', patch_dropout=0.5)
  key = jax.random.key(3)
  _, mask_key = jax.random.split(key)
  idx = vision.sample_patch_keep_indices(mask_key, 2, 64, 0.5)
  np.testing.assert_allclose(np.asarray(model.encode_image(images, normalize=True, train=True, rng=key)),
                             np.asarray(model.encode_image(images, normalize=True, patch_keep_indices=idx)),
                             atol=1e-6)


def test_drop_path_statistics():
  x = jnp.ones((20000, 4))
  out = np.asarray(drop_path(x, 0.3, jax.random.key(0)))
  kept = out[:, 0] > 0
  assert abs(kept.mean() - 0.7) < 0.02
  np.testing.assert_allclose(out[kept], 1 / 0.7, rtol=1e-6)  # survivors rescaled: expectation preserved
  assert np.all(out == out[:, :1])  # whole samples are dropped, not elements
  np.testing.assert_array_equal(np.asarray(drop_path(x, 0.3, None)), np.asarray(x))


def test_drop_path_is_random_in_training_and_off_in_eval(batch):
  images, _ = batch
  model = ec.create_model('tiny', drop_path_rate=0.5)
  plain = ec.create_model('tiny')
  np.testing.assert_allclose(np.asarray(model.encode_image(images, normalize=True)),
                             np.asarray(plain.encode_image(images, normalize=True)), atol=1e-6)
  outs = [np.asarray(model.encode_image(images, normalize=True, train=True, rng=jax.random.key(s)))
          for s in range(3)]
  assert np.abs(outs[0] - outs[1]).max() > 1e-3 or np.abs(outs[0] - outs[2]).max() > 1e-3


def test_layer_scale_parameters(tiny_spec, batch):
  spec = ec.models.replace_spec(tiny_spec, vision__layer_scale_init=0.1)
  model = ec.create_model(spec)
  gamma = np.asarray(model.visual.blocks.gamma_1[...])
  assert gamma.shape == (2, 64) and np.all(gamma == np.float32(0.1))
  assert ec.param_counts(model)['visual'] == ec.param_counts(ec.create_model(tiny_spec))['visual'] + 4 * 64
  assert np.isfinite(np.asarray(model.encode_image(batch[0]))).all()


def test_residual_output_init_is_scaled_per_layer():
  model = ec.create_model('tiny')
  w3 = np.asarray(model.visual.blocks.mlp.w3.kernel[...])
  ratio = w3[1].std() / w3[0].std()
  assert ratio == pytest.approx(1 / math.sqrt(2), rel=0.15)  # 1/sqrt(2*2) over 1/sqrt(2*1)


def test_bad_inputs_name_the_problem(batch):
  model = ec.create_model('tiny')
  with pytest.raises(ValueError, match='NHWC'):
    model.encode_image(jnp.ones((1, 3, 64, 64)))
  with pytest.raises(ValueError, match='integer token ids'):
    model.encode_text(jnp.ones((1, 32), jnp.float32))
  with pytest.raises(ValueError, match='<= 32'):
    model.encode_text(jnp.ones((1, 77), jnp.int32))

"""Numerical parity with open_clip/timm's PyTorch EVA models on the same random weights, float32."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import small_bige_spec, small_eva01_spec
from eva_clip_jax.conversion.torch_reference import open_clip_model, state_dict_numpy, torch_features

import eva_clip_jax as ec
from eva_clip_jax.conversion import assign_params, state_dict_to_params

TOLERANCE = 1e-4  # max abs error, float32 (measured: ~2e-5 for B-16 image embeddings of magnitude ~4)

CAPTIONS = ['a photo of a cat', 'a diagram of EVA-CLIP, drawn by hand!', 'x']


def _specs():
  return [pytest.param(ec.get_model_spec('EVA02-CLIP-B-16'), id='EVA02-CLIP-B-16'),
          pytest.param(small_eva01_spec(), id='eva01-style'), pytest.param(small_bige_spec(), id='bigE-style'),
          pytest.param(ec.get_model_spec('tiny'), id='tiny')]


def _converted(spec, ref):
  model = ec.create_model(spec)
  assign_params(model, state_dict_to_params(state_dict_numpy(ref), spec))
  return model


def _inputs(spec, batch=3):
  rng = np.random.default_rng(1)
  size = spec.vision.image_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  text = ec.get_tokenizer(context_length=spec.text.context_length)(CAPTIONS[:batch])
  return images, text


@pytest.mark.parametrize('spec', _specs())
def test_embeddings_and_logits_match_open_clip(spec):
  torch.manual_seed(0)
  ref = open_clip_model(spec)
  model = _converted(spec, ref)
  images, text = _inputs(spec)
  ref_image, ref_text, ref_logits = torch_features(ref, images, text)
  image = np.asarray(model.encode_image(jnp.asarray(images)))
  text_features = np.asarray(model.encode_text(jnp.asarray(text)))
  logits, logits_t = model.get_logits(jnp.asarray(images), jnp.asarray(text))
  np.testing.assert_allclose(image, ref_image, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(text_features, ref_text, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=TOLERANCE, rtol=0)
  np.testing.assert_array_equal(np.asarray(logits_t), np.asarray(logits).T)
  # The comparison is meaningful: features are far from zero and differ between samples.
  assert np.abs(ref_image).max() > 0.5 and np.abs(ref_image[0] - ref_image[1]).max() > 0.1


class _FixedPatchDrop(torch.nn.Module):
  """Stands in for timm's PatchDropout with chosen indices (timm's own draws from torch's RNG)."""

  def __init__(self, keep):
    super().__init__()
    self.keep = torch.from_numpy(np.asarray(keep, np.int64))

  def forward(self, x):
    batch = torch.arange(x.shape[0])[:, None]
    return torch.cat([x[:, :1], x[:, 1:][batch, self.keep]], dim=1), self.keep


def test_patch_dropout_matches_timm_with_the_same_kept_tokens(tiny_spec):
  """Kept tokens carry their own position embedding and RoPE rows; CLS always kept."""
  ref = open_clip_model(tiny_spec)
  model = _converted(tiny_spec, ref)
  images, _ = _inputs(tiny_spec, batch=2)
  n = tiny_spec.vision.num_patches
  keep = np.stack([np.random.default_rng(s).permutation(n)[:n // 2] for s in range(2)])
  ref.visual.trunk.patch_drop = _FixedPatchDrop(keep)
  with torch.no_grad():
    expected = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  got = model.encode_image(jnp.asarray(images), patch_keep_indices=jnp.asarray(keep))
  np.testing.assert_allclose(np.asarray(got), expected, atol=TOLERANCE, rtol=0)
  # And it is not the unmasked result.
  assert np.abs(np.asarray(model.encode_image(jnp.asarray(images))) - expected).max() > 1e-2

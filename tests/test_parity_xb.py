"""EVA-CLIP-8B/18B against EVA-CLIP-18B/shinji's PyTorch model, without the reference code.

tests/data/eva_clip_xb_reference.* (written by tests/data/make_eva_clip_xb_reference.py) hold the reference's key
tables and its outputs on numpy-made weights (tests/xb_reference.py) at full width, head dim and MLP but one or two
blocks. Here the same weights go through our loader's conversion of an EVA-layout state dict, and our model's
outputs, key tables and export are compared with the reference's. Cost, measured on 2 shared CPU cores: ~50 s of CPU
time for the file (most of it drawing and copying 18B's one 1.5 GB block), ~4.7 GB peak resident memory.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xb_reference as xb
from flax import nnx

import eva_clip_jax as ec
from eva_clip_jax.conversion import api, assign_params, layouts, model_params

DATA = pathlib.Path(__file__).parent / 'data'

# Max abs error relative to the output's largest magnitude, float32. Both sides accumulate 5120- and 25600-long
# float32 dot products in different orders (XLA's and MKL's blocking), so they differ by a few ulp per matmul, which
# the blocks carry on: measured <= 2e-6 relative on the features (8e-6 abs on image features of magnitude ~5) and
# 2e-7 on the logits. A wrong weight mapping, norm, bias or activation gives errors of order one.
TOLERANCE = 2e-5
# logits_per_image = exp(logit_scale) * cosine: its error is measured against exp(logit_scale), its largest possible
# magnitude (the random features are nearly orthogonal, so the logits themselves are small).
LOGIT_BOUND = float(np.exp(xb.LOGIT_SCALE))
# The export is checked on the smaller model only (its transposes take seconds per GB); the tables of both are the
# same code, and 18B's keys and shapes are checked against the reference's at full size below.
EXPORTED = 'EVA-CLIP-8B'


@nnx.jit
def _outputs(model, images, text):
  # One program: the towers get_logits runs again are the same computations as encode_image's and encode_text's.
  return {'image_features': model.encode_image(images), 'text_features': model.encode_text(text),
          'logits_per_image': model.get_logits(images, text)[0]}


@pytest.fixture(scope='module')
def reference():
  with open(DATA / f'{xb.DATA_NAME}.json') as f:
    tables = json.load(f)
  with np.load(DATA / f'{xb.DATA_NAME}.npz') as npz:
    arrays = dict(npz)
  return tables, arrays


def _their_shape(shape: tuple[int, ...], entry: layouts.Entry) -> tuple[int, ...]:
  """Our parameter's shape -> the PyTorch key's, through the table's own axis mapping (no memory: a broadcast)."""
  shape = shape[1:] if entry.depth else shape
  return layouts._to_theirs(np.broadcast_to(np.float32(0), shape), entry.kind).shape  # pylint: disable=protected-access


def _our_keys(spec) -> dict[str, tuple[int, ...]]:
  """The EVA-layout state dict our table makes for `spec`, keys and shapes, from an abstract model."""
  params = model_params(ec.create_model(spec, abstract=True))
  out = {}
  for entry in layouts.entries(spec, 'eva'):
    node = params
    for part in entry.ours:
      node = node[part]
    keys = [entry.theirs.format(i=i) for i in range(entry.depth)] if entry.depth else [entry.theirs]
    out.update({key: _their_shape(tuple(node.shape), entry) for key in keys})
  return out


@pytest.mark.parametrize('name', xb.FULL_MODELS)
def test_eva_layout_is_the_references_state_dict(name, reference):
  """Every key of the reference's full-size state dict, with its shape, and no other: loading and export agree."""
  tables, _ = reference
  spec = ec.get_model_spec(name)
  expected = xb.expand_keys(tables['full'][name])
  ours = _our_keys(spec)
  assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
  assert {k: v for k, v in ours.items() if v != expected[k]} == {}
  assert layouts.rope_buffer_keys(spec) == []  # no RoPE, so the export adds no buffers to the table's keys


@pytest.mark.parametrize('name', sorted(xb.REDUCED))
def test_reduced_model_matches_reference(name, reference):
  tables, arrays = reference
  spec = xb.reduced_spec(name)
  shapes = xb.expand_keys(tables['reduced'][name]['keys'])
  state = xb.random_state_dict(shapes)
  sums = {k: float(v.sum(dtype=np.float64)) for k, v in state.items()}
  # The weights are the reference's only if numpy still draws the same numbers.
  np.testing.assert_allclose([sums[k] for k in shapes], [tables['weight_sums'][name][k] for k in shapes],
                             rtol=1e-6, atol=1e-6)
  images = xb.images()
  assert float(images.sum(dtype=np.float64)) == pytest.approx(tables['meta']['image_sum'], rel=1e-6)

  # The loader's path for a released EVA-layout file, after reading it (torch_io; tested in test_conversion): the
  # key table, transposes and block stacking. Into an abstract model: random initialisation of one 18B block takes
  # minutes on a CPU, and is overwritten anyway. Each copy of the weights is dropped as soon as the next exists.
  params = api.state_dict_to_params(state, spec)
  del state
  model = ec.create_model(spec, abstract=True)
  assign_params(model, params)
  del params
  with jax.default_matmul_precision('highest'):
    got = _outputs(model, jnp.asarray(images), jnp.asarray(arrays['text']))
  for key, value in got.items():
    expected = arrays[f'{name}/{key}']
    scale = LOGIT_BOUND if key == 'logits_per_image' else float(np.abs(expected).max())
    err = float(np.abs(np.asarray(value) - expected).max())
    print(f'{name} {key}: max abs err {err:.3g}, relative to {scale:.3g}: {err / scale:.3g}')
    np.testing.assert_allclose(np.asarray(value), expected, atol=TOLERANCE * scale, rtol=0, err_msg=key)
  # The comparison is meaningful: features are far from zero and differ between inputs.
  image_ref = arrays[f'{name}/image_features']
  assert np.abs(image_ref).max() > 1 and np.abs(image_ref[0] - image_ref[1]).max() > 0.5

  if name != EXPORTED:
    return
  # Exported back (what export_file writes), the state dict has the reference's keys, shapes and values.
  exported = api.params_to_state_dict(model_params(model), spec, 'eva')
  del model
  assert sorted(exported) == sorted(shapes)
  assert {k: v.shape for k, v in exported.items() if v.shape != shapes[k]} == {}
  np.testing.assert_allclose([float(exported[k].sum(dtype=np.float64)) for k in shapes],
                             [sums[k] for k in shapes], rtol=1e-6, atol=1e-6)

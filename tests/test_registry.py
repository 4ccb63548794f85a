"""Architecture facts: parameter counts from eval_shape (no memory) against the reference models."""

import jax
from flax import nnx
import pytest

import eva_clip_jax as ec

# Totals from the issue / EVA repository; per-tower splits measured from open_clip 3.3 (timm 1.0) on the
# meta device (`sum(p.numel())` over `model.visual` and the rest, less logit_scale).
REFERENCE_COUNTS = {
    'EVA01-CLIP-g-14': (1136.44, 1012_588_928, 123_846_912),
    'EVA01-CLIP-g-14-plus': (1366.62, 1012_588_928, 354_032_640),
    'EVA02-CLIP-B-16': (149.69, 86_263_040, 63_428_096),
    'EVA02-CLIP-L-14': (427.76, 304_105_152, 123_650_304),
    'EVA02-CLIP-L-14-336': (428.08, 304_432_832, 123_650_304),
    'EVA02-CLIP-bigE-14': (4704.59, 4350_556_928, 354_032_640),
    'EVA02-CLIP-bigE-14-plus': (5044.89, 4350_556_928, 694_332_160),
    # EVA-CLIP-18B/shinji's CLIP on the meta device (xattn off: xformers only changes the kernel).
    'EVA-CLIP-8B': (8220.75, 7526_088_704, 694_659_840),
    'EVA-CLIP-8B-plus': (8223.89, 7529_234_432, 694_659_840),
    'EVA-CLIP-18B': (18325.48, 17630_494_720, 694_987_520),
}


def test_all_reference_models_and_tiny_are_registered():
  assert set(REFERENCE_COUNTS) | {'tiny'} == set(ec.list_models())


@pytest.mark.parametrize('name', sorted(REFERENCE_COUNTS))
def test_param_counts_match_reference(name):
  model = ec.create_model(name, abstract=True)  # nnx.eval_shape: shapes only
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  counts = ec.param_counts(model)
  total_m, visual, text = REFERENCE_COUNTS[name]
  assert round(counts['total'] / 1e6, 2) == total_m
  assert counts['visual'] == visual
  assert counts['text'] == text
  assert counts['total'] == visual + text + 1  # + logit_scale


def test_open_clip_counts_agree_live():
  """The table above, re-measured from open_clip for the B-16 model."""
  open_clip = pytest.importorskip('open_clip')
  ref = open_clip.create_model('EVA02-B-16', pretrained=None, device='meta')
  visual = sum(p.numel() for p in ref.visual.parameters())
  total = sum(p.numel() for p in ref.parameters())
  assert (visual, total - visual - 1) == REFERENCE_COUNTS['EVA02-CLIP-B-16'][1:]


def test_hidden_sizes_are_the_references():
  assert ec.get_model_spec('EVA02-CLIP-B-16').vision.mlp_dim == 2048
  assert ec.get_model_spec('EVA02-CLIP-L-14').vision.mlp_dim == 2730
  assert ec.get_model_spec('EVA02-CLIP-L-14-336').vision.grid_size == 24


def test_paper_aliases_and_unknown_names():
  assert ec.get_model_spec('EVA02-CLIP-E/14+').name == 'EVA02-CLIP-bigE-14-plus'
  with pytest.raises(ValueError, match='Unknown model'):
    ec.create_model('EVA03-CLIP-Z-99')


def test_invalid_specs_are_rejected(tiny_spec):
  bad = ec.models.replace_spec(tiny_spec, vision__image_size=60)
  with pytest.raises(ValueError, match='not a multiple of patch_size'):
    ec.create_model(bad)
  with pytest.raises(ValueError, match='Unknown remat'):
    ec.create_model('tiny', remat='sometimes')
  with pytest.raises(ValueError, match='Unknown dtype'):
    ec.create_model('tiny', dtype='float8')

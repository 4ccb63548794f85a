"""Image transforms against open_clip's (torchvision) preprocessing."""

import numpy as np
import pytest
from PIL import Image

import eva_clip_jax as ec
from eva_clip_jax import transforms


def _image(width, height, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize('size', [(320, 240), (240, 320), (224, 224), (500, 123), (100, 150)])
def test_eval_transform_matches_open_clip(size):
  open_clip = pytest.importorskip('open_clip')
  ref = open_clip.image_transform(224, is_train=False)
  image = _image(*size)
  expected = ref(image).numpy().transpose(1, 2, 0)
  got = ec.image_transform(224)(image)
  assert got.shape == (224, 224, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_eval_transform_handles_grey_and_alpha_images():
  grey = Image.fromarray(np.full((50, 60), 128, np.uint8), mode='L')
  rgba = Image.fromarray(np.zeros((50, 60, 4), np.uint8), mode='RGBA')
  for image in (grey, rgba):
    assert ec.image_transform(32)(image).shape == (32, 32, 3)


def test_train_crop_box_follows_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, w, h = transforms.random_resized_crop_box(400, 300, rng)
    assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
    assert 0.9 * 120000 * 0.98 <= w * h <= 120000
    assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_train_transform_is_random_but_seeded():
  image = _image(256, 240)
  a = ec.image_transform(64, is_train=True, seed=1)
  b = ec.image_transform(64, is_train=True, seed=1)
  first = a(image)
  assert first.shape == (64, 64, 3)
  np.testing.assert_array_equal(first, b(image))
  assert not np.array_equal(a(image), first)  # the next draw differs


def test_train_crop_falls_back_to_a_centre_crop_when_no_box_fits():
  # 300x200 at ratio <= 4/3 covers at most 89% of the area: below scale 0.9, so torchvision's fallback.
  left, top, w, h = transforms.random_resized_crop_box(300, 200, np.random.default_rng(0))
  assert (left, top, w, h) == (16, 0, 267, 200)  # torchvision get_params gives (top 0, left 16, 200, 267)


def test_normalisation_constants_are_openai_clip():
  white = Image.fromarray(np.full((8, 8, 3), 255, np.uint8))
  out = ec.image_transform(8)(white)
  np.testing.assert_allclose(out[0, 0], (1 - np.array(ec.OPENAI_MEAN)) / np.array(ec.OPENAI_STD), rtol=1e-6)


def test_uint8_normalised_on_device_equals_host_normalisation():
  import jax  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
  images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
  host = np.stack([transforms.normalize(Image.fromarray(x)) for x in images])  # the pipeline's old float path
  device = jax.jit(transforms.normalize_images)(images)
  assert device.dtype == np.float32 and device.shape == host.shape
  np.testing.assert_allclose(np.asarray(device), host, rtol=0, atol=1e-6)
  assert transforms.normalize_images(host) is host  # float batches were normalised on the host already


def test_crop_boxes_are_distributed_as_torchvisions():
  T = pytest.importorskip('torchvision.transforms')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  width, height, n = 500, 375, 4000
  ours = np.array([transforms.random_resized_crop_box(width, height, rng) for _ in range(n)], np.float64)
  theirs = []
  for _ in range(n):
    top, left, h, w = T.RandomResizedCrop.get_params(torch.zeros(1, height, width), (0.9, 1.0), (3 / 4, 4 / 3))
    theirs.append((left, top, w, h))
  theirs = np.array(theirs, np.float64)

  def stats(boxes):  # area fraction, log aspect ratio, centre x, centre y
    left, top, w, h = boxes.T
    return np.stack([w * h / (width * height), np.log(w / h), (left + w / 2) / width, (top + h / 2) / height], 1)

  a, b = stats(ours), stats(theirs)
  stderr = np.sqrt(a.var(0) / n + b.var(0) / n)
  assert (np.abs(a.mean(0) - b.mean(0)) < 4 * stderr + 1e-9).all(), (a.mean(0), b.mean(0), stderr)
  for q in (0.1, 0.5, 0.9):  # and the shapes of the distributions, not only their means
    np.testing.assert_allclose(np.quantile(a, q, axis=0), np.quantile(b, q, axis=0), atol=0.01)

"""Image bytes -> pixels: the exact full-resolution decode, and the training crop decoded at reduced scale.

A random-resized crop of a large photo throws most of its pixels away: a 1024x768 JPEG cropped to 224 px is
downsampled ~3.4x. libjpeg can decode at 1/2, 1/4 or 1/8 scale inside the inverse DCT (Pillow's `draft`), which
skips most of the IDCT, colour conversion and resize work. The crop box is drawn on the full-resolution size (read
from the header, before decoding), so the crops are the same boxes as the exact path's, only scaled; the pixels
differ from a full decode + bicubic resize by a bounded error (tests/test_data.py states the PSNR bound).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from eva_clip_jax import transforms

_DRAFT_FACTORS = (8, 4, 2)  # libjpeg's DCT scalings that Pillow's draft() offers


def open_image(data: bytes) -> Image.Image:
  """The image's header (size, mode): nothing decoded yet. Decompression bombs raise."""
  with warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    return Image.open(io.BytesIO(data))


def decode_image(data: bytes) -> Image.Image:
  """The full-resolution RGB image (evaluation, and training with reduced_decode off)."""
  image = open_image(data)
  image.load()  # decodes now, so truncated or corrupt files fail here
  return _rgb(image)


def _rgb(image: Image.Image) -> Image.Image:
  return image if image.mode == 'RGB' else image.convert('RGB')  # convert() would copy an RGB image


def draft_factor(crop_width: int, crop_height: int, size: int) -> int:
  """The DCT reduction (1, 2, 4 or 8) for a crop that will be resized to size x size: the largest that still
  leaves the crop at least `size` pixels on each side, so the bicubic resize only ever shrinks. (Measured on the
  benchmark's photo-like JPEGs: >= 45 dB PSNR against the full decode, at about half its time.)"""
  for factor in _DRAFT_FACTORS:
    if min(crop_width, crop_height) >= factor * size:
      return factor
  return 1


def decode_for_crop(data: bytes, size: int, rng: np.random.Generator, scale=(0.9, 1.0),
                    reduced: bool = True) -> tuple[Image.Image, tuple[float, float, float, float]]:
  """The RGB image, decoded at the scale a random-resized crop to size x size needs, and the crop box (torchvision's
  RandomResizedCrop, drawn on the full-resolution size) in the decoded image's coordinates.

  reduced: decode JPEGs at the smallest DCT scale that keeps the crop above the output size (`draft_factor`);
  other formats, and reduced=False, decode at full resolution.
  """
  image = open_image(data)
  width, height = image.size
  left, top, w, h = transforms.random_resized_crop_box(width, height, rng, scale=scale)
  factor = draft_factor(w, h, size) if reduced and image.format == 'JPEG' else 1
  if factor > 1:
    # draft() picks the largest power-of-two reduction whose result is at least the requested size, so asking
    # for (width // factor, height // factor) gets exactly `factor`; it returns the reduced image's extent in
    # reduced pixels (None if it declines, e.g. a multi-tile file).
    drafted = image.draft('RGB', (width // factor, height // factor))
    factor = width / drafted[1][2] if drafted else 1
  image.load()  # truncated or corrupt files fail here, on either path
  # Each 8x8 DCT block becomes 8/k x 8/k pixels, so full-resolution coordinates scale by exactly 1/k.
  return _rgb(image), (left / factor, top / factor, (left + w) / factor, (top + h) / factor)


def crop_and_resize(image: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
  """The box of the image, bicubic-resized to uint8 [size, size, 3]."""
  return np.asarray(image.resize((size, size), Image.BICUBIC, box=box))


def decode_train_crop(data: bytes, size: int, rng: np.random.Generator, scale=(0.9, 1.0),
                      reduced: bool = True) -> np.ndarray:
  """A random-resized crop (torchvision's box, bicubic) of the encoded image, as uint8 [size, size, 3]."""
  return crop_and_resize(*decode_for_crop(data, size, rng, scale, reduced), size)

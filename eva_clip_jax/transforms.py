"""Image preprocessing for evaluation and training, as open_clip/EVA-CLIP do it (on PIL images, HWC output).

Evaluation: bicubic resize of the short side to `image_size`, centre crop, RGB, [0, 1], OpenAI mean/std.
Training: random resized crop with scale (0.9, 1.0) and aspect ratio (3/4, 4/3), bicubic, then the same
normalisation. Both return float32 arrays [image_size, image_size, 3] — the models take NHWC. The training
input pipeline stops before the normalisation (uint8 crops, `eva_clip_jax.data.decode`) and the train step applies
`normalize_images` on the accelerator.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _affine(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """(scale, shift) in float32 with (x / 255 - mean) / std == x * scale - shift: one multiply, one subtract."""
  std64 = np.asarray(std, np.float64)
  return (1.0 / (255.0 * std64)).astype(np.float32), (np.asarray(mean, np.float64) / std64).astype(np.float32)


def normalize(image: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
  """RGB, [0, 1], then (x - mean) / std per channel, as a float32 [H, W, 3] array."""
  array = np.asarray(image.convert('RGB')).astype(np.float32)  # via uint8: PIL -> float directly is slow
  scale, shift = _affine(mean, std)
  array *= scale  # in place
  array -= shift
  return array


def normalize_images(images, mean=OPENAI_MEAN, std=OPENAI_STD):
  """uint8 [..., 3] images -> float32, normalised exactly as `normalize` does; float input is returned as it is.

  Written with array methods only, so it runs on numpy arrays and, inside a jitted step, on jax arrays: training
  batches cross to the accelerator as uint8 (4x fewer bytes than float32) and are normalised there. Float
  batches (evaluation, tests) were normalised on the host already.
  """
  if images.dtype != np.uint8:
    return images
  scale, shift = _affine(mean, std)
  return images.astype(np.float32) * scale - shift


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  new_size = (new_short, new_long) if width <= height else (new_long, new_short)
  return image if new_size == image.size else image.resize(new_size, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  if width < size or height < size:
    raise ValueError(f'cannot centre-crop {size}x{size} from a {width}x{height} image; resize first')
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.9, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(left, top, crop_width, crop_height) chosen as torchvision's RandomResizedCrop chooses it."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  # Fallback: the largest centred crop with a ratio inside the allowed range.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def image_transform(image_size: int, is_train: bool = False, mean=OPENAI_MEAN, std=OPENAI_STD,
                    scale=(0.9, 1.0), seed: int | None = None) -> Callable[[Image.Image], np.ndarray]:
  """A PIL image -> float32 [image_size, image_size, 3] function (open_clip's `image_transform`)."""
  if is_train:
    rng = np.random.default_rng(seed)

    def train_transform(image: Image.Image) -> np.ndarray:
      left, top, w, h = random_resized_crop_box(image.size[0], image.size[1], rng, scale=scale)
      out = image.convert('RGB').resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + w, top + h))
      return normalize(out, mean, std)

    return train_transform

  def eval_transform(image: Image.Image) -> np.ndarray:
    image = center_crop(resize_short_side(image.convert('RGB'), image_size), image_size)
    return normalize(image, mean, std)

  return eval_transform

"""The bundled demo set: coloured shapes with captions, drawn deterministically (no download, no files shipped).

  python -m eva_clip_jax.data.demo --dst=demo_data

Each image is one of 8 shapes in one of 10 colours on a textured grey background, at a random position, size
and rotation, with a caption from several phrasings ("a large red star"). Zero-shot classification asks for the
colour (10 classes, chance 10%): a two-layer model learns colour from captions in minutes on a CPU, while
shape at 64 px takes it far longer. Written as webdataset shards through `ShardWriter`:

  DST/train/{00000..00003}.tar   2,048 samples
  DST/val/00000.tar              512 held-out samples, labelled with the colour's index
  DST/val.csv                    the held-out images' captions (retrieval), DST/images/ their files
  DST/classnames.txt, DST/templates.txt   zero-shot classification of the colour

The images are synthetic: drawn here with Pillow from a fixed seed, so every machine makes the same files.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from eva_clip_jax import storage
from eva_clip_jax.data.writer import ShardWriter

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'cross', 'ring', 'hexagon')
COLORS = {'red': (220, 30, 30), 'green': (30, 160, 50), 'blue': (40, 70, 220), 'yellow': (240, 220, 30),
          'purple': (130, 40, 170), 'orange': (250, 140, 20), 'pink': (250, 120, 190), 'brown': (120, 70, 30),
          'black': (20, 20, 20), 'cyan': (40, 210, 220)}
TEMPLATES = ('a photo of a {} shape.', 'a drawing of something {}.', 'a {} object.', 'a picture of a {} thing.')
CAPTIONS = ('a {color} {shape}', 'a {color} {shape} on a grey background', 'a picture of a {color} {shape}',
            '{color} {shape}, {size}', 'a {size} {color} {shape}')
IMAGE_SIZE = 80


def _polygon(cx, cy, radius, sides, rotation, inner=None):
  points = []
  count = sides * (2 if inner else 1)
  for i in range(count):
    r = radius if not inner or i % 2 == 0 else radius * inner
    angle = rotation + 2 * math.pi * i / count
    points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
  return points


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
  """A synthetic stand-in for a photo (input-pipeline benchmarks and decoder tests): smooth colour fields at two
  scales, a few hard-edged shapes, a slight blur, then fine grain. Saved as JPEG at quality 90 it takes ~2.5
  bits per pixel, about what real photos of that quality take, so decoding costs what a photo's would."""

  def field(cells: int, amplitude: float) -> np.ndarray:  # cells x cells random values, bicubic to full size
    small = rng.normal(0, amplitude, (cells, cells, 3)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(small[..., c], mode='F').resize((width, height), Image.BICUBIC))
                     for c in range(3)], axis=-1)

  pixels = rng.uniform(40, 215, 3).astype(np.float32) + field(int(rng.integers(3, 8)), 45)
  pixels += field(int(rng.integers(24, 64)), 14)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(2, 7))):
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    box = (x0, y0, x0 + rng.uniform(0.05, 0.4) * width, y0 + rng.uniform(0.05, 0.4) * height)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8))).astype(np.float32)
  pixels += rng.normal(0, 6, (height, width, 1)).astype(np.float32)  # luminance grain
  pixels += rng.normal(0, 2, (height, width, 3)).astype(np.float32)  # and a little colour noise
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_sample(rng: np.random.Generator) -> tuple[Image.Image, dict]:
  shape = SHAPES[rng.integers(len(SHAPES))]
  names = list(COLORS)
  color = names[rng.integers(len(names))]
  base = rng.uniform(120, 200) + rng.normal(0, 6, 3)  # a grey, slightly tinted
  pixels = base + rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  radius = float(rng.uniform(14, 30))
  cx, cy = (float(rng.uniform(radius + 2, IMAGE_SIZE - radius - 2)) for _ in range(2))
  rotation = float(rng.uniform(0, 2 * math.pi))
  fill = COLORS[color]
  if shape == 'circle':
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
  elif shape == 'ring':
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=fill, width=max(3, int(radius / 3)))
  elif shape == 'cross':
    w = radius / 3
    draw.rectangle((cx - radius, cy - w, cx + radius, cy + w), fill=fill)
    draw.rectangle((cx - w, cy - radius, cx + w, cy + radius), fill=fill)
  else:
    sides, inner, rot = {'square': (4, None, math.pi / 4), 'triangle': (3, None, -math.pi / 2),
                         'diamond': (4, None, 0.0), 'star': (5, 0.45, -math.pi / 2),
                         'hexagon': (6, None, 0.0)}[shape]
    if shape in ('star', 'hexagon', 'triangle'):
      rot += rotation
    draw.polygon(_polygon(cx, cy, radius, sides, rot, inner), fill=fill)
  size = 'large' if radius > 24 else 'small' if radius < 18 else 'medium-sized'
  meta = {'shape': shape, 'color': color, 'size': size, 'label': names.index(color)}
  return image, meta


def _jpeg(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def write_demo_set(dst: str, *, num_train: int = 2048, num_val: int = 512, samples_per_shard: int = 512,
                   seed: int = 0) -> dict[str, str]:
  """Draws the demo set into `dst` (see the module docstring). Returns the paths of its parts."""
  rng = np.random.default_rng(seed)
  with ShardWriter(storage.join(dst, 'train'), samples_per_shard) as writer:
    for i in range(num_train):
      image, meta = draw_sample(rng)
      caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(**meta)
      writer.write(f'{i:06d}', _jpeg(image), 'jpg', caption, label=meta['label'], meta=meta)
  storage.makedirs(storage.join(dst, 'images'))
  rows = ['path,caption,label']
  with ShardWriter(storage.join(dst, 'val'), num_val) as writer:
    for i in range(num_val):
      image, meta = draw_sample(rng)
      caption = f"a {meta['color']} {meta['shape']}"
      data = _jpeg(image)
      writer.write(f'{i:06d}', data, 'jpg', caption, label=meta['label'], meta=meta)
      storage.write_bytes(storage.join(dst, 'images', f'{i:06d}.jpg'), data)
      rows.append(f'images/{i:06d}.jpg,{caption},{meta["label"]}')
  storage.write_text(storage.join(dst, 'val.csv'), '\n'.join(rows) + '\n')
  storage.write_text(storage.join(dst, 'classnames.txt'), '\n'.join(COLORS) + '\n')
  storage.write_text(storage.join(dst, 'templates.txt'), '\n'.join(TEMPLATES) + '\n')
  return {part: storage.join(dst, name) for part, name in (('train', 'train'), ('val', 'val'), ('val_csv', 'val.csv'),
                                                            ('classnames', 'classnames.txt'),
                                                            ('templates', 'templates.txt'))}


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top

  from eva_clip_jax import cli  # pylint: disable=g-import-not-at-top
  _DST = flags.DEFINE_string('dst', 'demo_data', 'output folder')

  def main(argv):
    del argv
    parts = write_demo_set(_DST.value)
    print('\n'.join(f'{k}: {v}' for k, v in parts.items()))

  cli.run(main)

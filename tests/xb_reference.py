"""The recipe behind tests/data/eva_clip_xb_reference.*: reduced EVA-CLIP-8B/18B shapes, numpy-made weights, inputs.

Shared by the generator (tests/data/make_eva_clip_xb_reference.py, which runs EVA-CLIP-18B/shinji's PyTorch model)
and the test (tests/test_parity_xb.py, which runs ours), so both see the same weights without storing them. Only
numpy, so the test needs neither the reference code nor torch to make them.
"""

import zlib

import numpy as np

DATA_NAME = 'eva_clip_xb_reference'  # tests/data/<DATA_NAME>.npz (outputs, inputs) and .json (key tables)
SEED = 20240214
IMAGE_SIZE = 56  # 4 x 4 patches of 14: the sequence is short, the widths and head dim are the full models'
NUM_IMAGES = 2

# Full width, head dim and MLP; one vision block (18B's is ~370M parameters, 1.5 GB in float32) and one or two text
# blocks (8B's two check that per-block keys ({i}) stack in order).
REDUCED = {
    'EVA-CLIP-8B': {'vision_depth': 1, 'text_depth': 2},
    'EVA-CLIP-18B': {'vision_depth': 1, 'text_depth': 1},
}
FULL_MODELS = ('EVA-CLIP-8B', 'EVA-CLIP-8B-plus', 'EVA-CLIP-18B')

CAPTIONS = ['a photo of a cat', 'EVA-CLIP at eighteen billion parameters, drawn by hand on a whiteboard!', 'x']

MATRIX_STD = 0.02
NORM_NOISE = 0.1
BIAS_STD = 0.02
LOGIT_SCALE = 2.5


def key_rng(seed: int, key: str) -> np.random.Generator:
  # One stream per state-dict key, so a tensor's values depend on its name only, not on the order of the dict.
  return np.random.default_rng([seed, zlib.crc32(key.encode())])


def random_tensor(key: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
  """The value of one reference state-dict entry, float32.

  Norm scales 1 + noise, biases small but nonzero (a zero bias or a unit scale would hide a mapping bug), every
  other tensor noise * 0.02, which keeps the activations of the full-width blocks at order one. The noise is
  uniform with unit variance: numpy draws uniform floats several times faster than normal ones, and a block of
  18B has 370M of them.
  """
  shape = tuple(shape)
  if key == 'logit_scale':
    return np.asarray(LOGIT_SCALE, np.float32)
  noise = key_rng(seed, key).random(shape, dtype=np.float32)
  noise -= np.float32(0.5)
  is_norm = len(shape) == 1 and any(part in key for part in ('norm', 'ln_'))
  if is_norm and key.endswith('.weight'):
    noise *= np.float32(NORM_NOISE * 12 ** 0.5)
    noise += np.float32(1.0)
  else:  # also text.*.attn.in_proj_bias
    noise *= np.float32((BIAS_STD if key.endswith('bias') else MATRIX_STD) * 12 ** 0.5)
  return noise


def random_state_dict(shapes: dict[str, list[int]], seed: int = SEED) -> dict[str, np.ndarray]:
  return {key: random_tensor(key, shape, seed) for key, shape in shapes.items()}


def images(seed: int = SEED) -> np.ndarray:
  """[NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3] float32, NHWC (the reference gets them as NCHW)."""
  return np.random.default_rng(seed + 1).standard_normal((NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)


def reduced_spec(name: str):
  """Our spec of the reduced model: the registry's `name` with fewer blocks and 56 px images."""
  from eva_clip_jax.models import get_model_spec, replace_spec  # pylint: disable=g-import-not-at-top
  depths = REDUCED[name]
  return replace_spec(get_model_spec(name), name=f'{name}-reduced', vision__image_size=IMAGE_SIZE,
                      vision__depth=depths['vision_depth'], text__depth=depths['text_depth'])


def collapse_keys(shapes: dict[str, list[int]]) -> list[list]:
  """A state dict's keys and shapes with the block index collapsed: [[pattern, depth, shape], ...], sorted.

  `visual.blocks.{i}.attn.qkv.weight` stands for depth keys of one shape (0 for a key outside the blocks).
  """
  groups: dict[str, list] = {}
  for key, shape in shapes.items():
    parts = key.split('.')
    for j, part in enumerate(parts[:-1]):
      if part.isdigit() and parts[j - 1] in ('blocks', 'resblocks'):
        parts[j] = '{i}'
        break
    pattern = '.'.join(parts)
    entry = groups.setdefault(pattern, [pattern, 0, list(shape)])
    if pattern != key:
      if entry[2] != list(shape):
        raise ValueError(f'{pattern}: blocks of different shapes {entry[2]} and {list(shape)}')
      entry[1] += 1
  return sorted(groups.values())


def expand_keys(table: list[list]) -> dict[str, tuple[int, ...]]:
  """The inverse of `collapse_keys`."""
  out = {}
  for pattern, depth, shape in table:
    for key in ([pattern.format(i=i) for i in range(depth)] if depth else [pattern]):
      out[key] = tuple(shape)
  return out

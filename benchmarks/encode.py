r"""Image-encoding throughput of a model in JAX, next to open_clip's PyTorch model measured in the same run.

  python benchmarks/encode.py --model=EVA02-CLIP-B-16 --batch_size=8 --iters=5

Both sides use float32, inference mode and the same random weights shape; the PyTorch side is open_clip's
EVA02 model (timm inside). Prints one line per framework and the ratio. Numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import eva_clip_jax as ec

_MODEL = flags.DEFINE_string('model', 'EVA02-CLIP-B-16', 'model name')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'images per forward pass')
_ITERS = flags.DEFINE_integer('iters', 5, 'timed forward passes (after one warm-up)')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'JAX compute dtype')
_ATTENTION = flags.DEFINE_string('attention', 'xla', 'JAX attention backend')
_TORCH = flags.DEFINE_bool('torch', True, 'also time open_clip (PyTorch) in the same run')
_COMPILE = flags.DEFINE_bool('compile_only', False, 'instead: time compiling the image tower, scanned vs unrolled, '
                             'from abstract parameters (nothing is allocated)')


def _time(fn, iters: int) -> list[float]:
  fn()  # warm-up: compilation (JAX) or first-call allocation (PyTorch)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def time_jax(spec, images: np.ndarray, iters: int, dtype: str, attention: str) -> list[float]:
  model = ec.create_model(spec, dtype=dtype, attention=attention)
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, images):
    return nnx.merge(graphdef, state).encode_image(images)

  x = jnp.asarray(images)
  return _time(lambda: encode(state, x).block_until_ready(), iters)


def time_torch(spec, images: np.ndarray, iters: int) -> list[float]:
  import torch  # pylint: disable=g-import-not-at-top

  from eva_clip_jax.conversion.torch_reference import open_clip_model  # pylint: disable=g-import-not-at-top

  model = open_clip_model(spec)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

  def run():
    with torch.inference_mode():
      model.encode_image(x)

  return _time(run, iters)


def compile_seconds(spec, batch: int, scan_layers: bool) -> float:
  """Lowering + compiling `encode_image` from shapes only (nnx.eval_shape), as a 64-layer tower needs."""
  model = ec.create_model(spec, scan_layers=scan_layers, abstract=True)
  graphdef, state = nnx.split(model)
  size = spec.vision.image_size
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  start = time.perf_counter()
  jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x)).lower(state, images).compile()
  return time.perf_counter() - start


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)  # open_clip logs every model build at INFO
  if _COMPILE.value:
    spec = ec.get_model_spec(_MODEL.value)
    print(f'# {spec.name}: compile encode_image (batch {_BATCH.value}), jax {jax.__version__} on '
          f'{jax.devices()[0].platform}')
    for scan in (True, False):
      print(f'scan_layers={scan!s:5s} {compile_seconds(spec, _BATCH.value, scan):7.1f} s')
    return
  spec = ec.get_model_spec(_MODEL.value)
  size = spec.vision.image_size
  images = np.random.default_rng(0).normal(size=(_BATCH.value, size, size, 3)).astype(np.float32)
  print(f'# {spec.name}, batch {_BATCH.value}, {_ITERS.value} timed iterations, {platform.processor() or "cpu"}, '
        f'jax {jax.__version__} on {jax.devices()[0].platform}')
  results = {'jax': time_jax(spec, images, _ITERS.value, _DTYPE.value, _ATTENTION.value)}
  if _TORCH.value:
    import torch  # pylint: disable=g-import-not-at-top
    print(f'# torch {torch.__version__}, {torch.get_num_threads()} threads')
    results['torch'] = time_torch(spec, images, _ITERS.value)
  for name, times in results.items():
    median = float(np.median(times))
    print(f'{name:6s} median {median * 1e3:9.1f} ms/batch  {_BATCH.value / median:8.2f} images/s  '
          f'(min {min(times) * 1e3:.1f} ms)')
  if 'torch' in results:
    print(f'jax/torch throughput ratio: {np.median(results["torch"]) / np.median(results["jax"]):.2f}')


if __name__ == '__main__':
  app.run(main)

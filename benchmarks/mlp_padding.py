r"""One vision block's MLP with and without `mlp_pad_multiple`: time, TFLOP/s and the largest output difference.

  python benchmarks/mlp_padding.py --model=EVA02-CLIP-L-14 --batch_size=64     # GPU, bf16: 2730 -> 2816
  python benchmarks/mlp_padding.py --batch_size=2 --dtype=float32              # CPU

The padding exists for GPUs and TPUs, whose matmul tiles want hidden sizes that are multiples of 64-128; on a CPU
it only adds work (3% more columns for L/14) and is expected to be no faster. FLOPs are the unpadded model's:
forward 3 matmuls of 2 T width hidden, forward+backward 3x that.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_clip_jax.models import get_model_spec
from eva_clip_jax.models.common import ModelOptions
from eva_clip_jax.models.vision import GeluMlp, SwiGLU, hidden_padding

_MODEL = flags.DEFINE_string('model', 'EVA02-CLIP-L-14', 'model whose vision MLP to time')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'images; each brings the full sequence (CLS + patches)')
_MULTIPLE = flags.DEFINE_integer('multiple', 128, 'the padded run rounds the hidden size up to this')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'compute dtype (parameters: float32)')
_ITERS = flags.DEFINE_integer('iters', 10, 'calls per timed repeat')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed repeats; the median is reported')


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_ITERS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / _ITERS.value)
  return statistics.median(times)


def main(argv):
  del argv
  spec = get_model_spec(_MODEL.value).vision
  tokens = _BATCH.value * (spec.num_patches + 1)
  x = jax.random.normal(jax.random.key(0), (_BATCH.value, spec.num_patches + 1, spec.width)).astype(_DTYPE.value)
  matmuls = 3 if spec.mlp == 'swiglu' else 2
  forward_flops = matmuls * 2.0 * tokens * spec.width * spec.mlp_dim
  device = jax.devices()[0]
  print(f'# {spec.mlp} MLP of {_MODEL.value} ({spec.width} -> {spec.mlp_dim}), {tokens} tokens, {_DTYPE.value}, '
        f'{device.device_kind} ({device.platform}), jax {jax.__version__}')
  print('| hidden | computed at | pass | ms | TFLOP/s | max abs diff vs unpadded |')
  print('|---|---|---|---|---|---|')
  reference = None
  for multiple in (0, _MULTIPLE.value):
    opts = ModelOptions(dtype=_DTYPE.value, mlp_pad_multiple=multiple)
    mlp = (SwiGLU if spec.mlp == 'swiglu' else GeluMlp)(spec, opts, rngs=nnx.Rngs(0))  # same seed: same weights
    graphdef, params = nnx.split(mlp)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32)), argnums=(0, 1)))
    out = np.asarray(forward(params, x).astype(jnp.float32))
    diff = '-' if reference is None else f'{np.abs(out - reference).max():.2e}'
    reference = out if reference is None else reference
    width = spec.mlp_dim + hidden_padding(spec.mlp_dim, multiple)
    for name, fn, flops in (('fwd', forward, forward_flops), ('fwd+bwd', grads, 3 * forward_flops)):
      seconds = _time(fn, params, x)
      print(f'| {spec.mlp_dim} | {width} | {name} | {seconds * 1e3:.3f} | {flops / seconds / 1e12:.3f} | {diff} |',
            flush=True)


if __name__ == '__main__':
  app.run(main)

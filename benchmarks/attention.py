r"""Attention alone at EVA-CLIP's shapes: time and achieved TFLOP/s per backend, forward and forward+backward.

  python benchmarks/attention.py                                  # GPU: all cases, xla / cudnn / pallas_flash
  python benchmarks/attention.py --batch_size=2 --iters=2         # CPU smoke test: xla only
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
    python benchmarks/attention.py --deviceless=h100                # CPU host: what compiles for one H100, and bytes

Cases are the vision towers' sequences (CLS + patches, and with 50% patch dropout) and the causal text tower.
EVA-02 cases (B, L) include their 2D RoPE, passed to the attention seam as the model passes it: it rotates q and k
first for 'xla' and 'cudnn', while the Pallas kernels rotate inside; masked cases use per-sample tables, as patch
dropout makes.
The 'err' column is the largest |difference| from the 'xla' backend at the same inputs: of the output in 'fwd'
rows, of dq, dk and dv in 'fwd+bwd' rows (a check that a kernel run on new hardware computes the right thing).

FLOPs are model FLOPs: forward 4 B H S^2 D (the two matmuls), halved when causal (the useful triangle);
forward+backward 3x forward (the backward's dq, dk, dv and dp matmuls), so a kernel's recomputation of the
scores in its backward is not counted, as remat is not counted in the training MFU.
On CPU only 'xla' runs by default: cuDNN needs an NVIDIA GPU and the Pallas kernels are interpreted there
(correct, but their time means nothing); --backends=pallas_flash forces one. 'xla' always runs: it is the reference.

--deviceless=GPU (h100, h200, a100; needs requirements-accel.txt) runs nothing: it compiles each case's forward and
forward+backward for one such GPU (XLA's GPU compiler without a GPU, `training.planning.target_devices`) and prints
whether it compiled, the kernels' custom calls, and `memory_analysis()`'s temporaries and outputs: compiler
accounting (no autotuning), not a measurement. Backends default to xla, cudnn, pallas_flash and mosaic there.
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from eva_clip_jax import ops
from eva_clip_jax.models import rope as rope_lib

_BACKENDS = flags.DEFINE_list('backends', None, 'attention backends besides xla, which always runs (the reference); '
                              'default: cudnn,pallas_flash on GPU, none on CPU')
_CASES = flags.DEFINE_list('cases', None, 'case names to run (default: all)')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'sequences per call')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'], 'q, k, v dtype')
_ITERS = flags.DEFINE_integer('iters', 20, 'calls per timed repeat (dispatched back to back)')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed repeats; the median is reported')
_DEVICELESS = flags.DEFINE_string('deviceless', None, 'compile for this GPU (h100, h200, a100) instead of running')


class Case(NamedTuple):
  name: str
  seq: int
  heads: int
  head_dim: int
  causal: bool = False
  rope_grid: int = 0  # EVA-02: 2D RoPE over a grid x grid patch layout (0: none)


CASES = (
    Case('B/16', 197, 12, 64, rope_grid=14),
    Case('B/16 50% masked', 99, 12, 64, rope_grid=14),
    Case('L/14', 257, 16, 64, rope_grid=16),
    Case('L/14 50% masked', 129, 16, 64, rope_grid=16),
    Case('g/14', 257, 16, 88),
    Case('g/14 50% masked', 129, 16, 88),
    Case('bigE/14', 257, 16, 112),
    Case('bigE/14 50% masked', 129, 16, 112),
    Case('text B (causal)', 77, 8, 64, causal=True),
    Case('text L (causal)', 77, 12, 64, causal=True),
)


def case_flops(case: Case, batch: int) -> float:
  forward = 4.0 * batch * case.heads * case.seq ** 2 * case.head_dim
  return forward / 2 if case.causal else forward


def rope_tables(case: Case, batch: int):
  """Shared tables for a full sequence, per-sample tables of random kept patches for a masked one."""
  if not case.rope_grid:
    return None
  cos, sin = (jnp.asarray(t) for t in rope_lib.rope_2d_tables(case.head_dim, case.rope_grid))
  if case.seq - 1 == case.rope_grid ** 2:
    return cos, sin
  scores = jax.random.normal(jax.random.key(7), (batch, case.rope_grid ** 2))
  keep = jax.lax.top_k(scores, case.seq - 1)[1]
  return cos[keep], sin[keep]


def attention_fn(case: Case, backend: str, rope):
  def attend(q, k, v):
    return ops.dot_product_attention(q, k, v, causal=case.causal, rope=rope, backend=backend)
  return attend


def time_call(fn, args, iters: int, repeats: int) -> float:
  """Median seconds per call; `iters` calls are dispatched back to back, then waited for."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times)


def run_case(case: Case, backend: str, batch: int, dtype, reference=None):
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (batch, case.seq, case.heads, case.head_dim)
  q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  attend = attention_fn(case, backend, rope_tables(case, batch))
  forward = jax.jit(attend)

  @jax.jit
  def forward_backward(q, k, v, cotangent):
    out, vjp = jax.vjp(attend, q, k, v)
    return vjp(cotangent)

  # Outputs and gradients, in float32 on the host, for the comparison with the 'xla' reference.
  outputs = [np.asarray(x.astype(jnp.float32)) for x in (forward(q, k, v), *forward_backward(q, k, v, cotangent))]
  errors = [None, None]
  if reference is not None:
    diffs = [float(np.abs(a - b).max()) for a, b in zip(outputs, reference)]
    errors = [diffs[0], max(diffs[1:])]
  rows = []
  for name, fn, args, flops, error in (
      ('fwd', forward, (q, k, v), case_flops(case, batch), errors[0]),
      ('fwd+bwd', forward_backward, (q, k, v, cotangent), 3 * case_flops(case, batch), errors[1])):
    seconds = time_call(fn, args, _ITERS.value, _REPEATS.value)
    rows.append((name, seconds, flops / seconds, error))
  return outputs, rows


def compile_case(case: Case, backend: str, batch: int, dtype, device) -> list[tuple[str, str, object]]:
  """(pass, custom calls, memory_analysis) of the forward and forward+backward compiled for `device`."""
  import re
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh([device], ('data',)), jax.sharding.PartitionSpec())
  spec = jax.ShapeDtypeStruct((batch, case.seq, case.heads, case.head_dim), dtype, sharding=sharding)
  rope = rope_tables(case, batch)
  attend = attention_fn(case, backend, rope)

  def forward_backward(q, k, v, cotangent):
    _, vjp = jax.vjp(attend, q, k, v)
    return vjp(cotangent)

  rows = []
  for name, fn, args in (('fwd', attend, (spec,) * 3), ('fwd+bwd', forward_backward, (spec,) * 4)):
    compiled = jax.jit(fn).lower(*args).compile()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))
    rows.append((name, ' '.join(calls) or '-', compiled.memory_analysis()))
  return rows


def deviceless(gpu: str) -> None:
  from eva_clip_jax.training import planning
  device = planning.target_devices('gpu', '1x1x1', gpu).devices[0]
  backends = _BACKENDS.value or ['xla', 'cudnn', 'pallas_flash', 'mosaic']
  cases = [c for c in CASES if _CASES.value is None or c.name in _CASES.value]
  print(f'# attention compiled for one {device.device_kind} without a GPU (compiler accounting, not a measurement): '
        f'jax {jax.__version__}, {_DTYPE.value}, batch {_BATCH.value}')
  print('| case | backend | pass | compiled | temp MiB | output MiB | kernels |')
  print('|---|---|---|---|---|---|---|')
  for case in cases:
    for backend in backends:
      try:
        rows = compile_case(case, backend, _BATCH.value, jnp.dtype(_DTYPE.value), device)
      except Exception as e:  # pylint: disable=broad-except
        print(f'| {case.name} | {backend} | - | no: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | | |',
              flush=True)
        continue
      for name, calls, stats in rows:
        print(f'| {case.name} | {backend} | {name} | yes | {stats.temp_size_in_bytes / 2**20:.1f} | '
              f'{stats.output_size_in_bytes / 2**20:.1f} | {calls} |', flush=True)


def main(argv):
  del argv
  if _DEVICELESS.value:
    deviceless(_DEVICELESS.value)
    return
  platform = jax.devices()[0].platform
  on_gpu = platform == 'gpu'
  backends = ['xla'] + [b for b in (_BACKENDS.value or (['cudnn', 'pallas_flash'] if on_gpu else [])) if b != 'xla']
  if not on_gpu and not _BACKENDS.value:
    print("# CPU: running 'xla' only ('cudnn' needs an NVIDIA GPU; the Pallas kernels only interpret on CPU, so "
          'their time means nothing; --backends=pallas_flash forces one)')
  cases = [c for c in CASES if _CASES.value is None or c.name in _CASES.value]
  dtype = jnp.dtype(_DTYPE.value)
  print(f'# attention: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}, {_DTYPE.value}, '
        f'batch {_BATCH.value}, median of {_REPEATS.value} x {_ITERS.value} calls')
  print('| case | batch | seq | heads | head dim | causal | rope | backend | pass | ms | TFLOP/s | err vs xla |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for case in cases:
    reference = None
    for backend in backends:
      prefix = (f'| {case.name} | {_BATCH.value} | {case.seq} | {case.heads} | {case.head_dim} | '
                f'{"yes" if case.causal else "no"} | {"yes" if case.rope_grid else "no"} | {backend} |')
      try:
        outputs, rows = run_case(case, backend, _BATCH.value, dtype, reference)
      except Exception as e:  # pylint: disable=broad-except
        # One backend failing on one shape (e.g. a kernel on new hardware) must not lose the other rows.
        print(f'{prefix} - | - | - | failed: {type(e).__name__}: {str(e).splitlines()[0][:100]} |', flush=True)
        continue
      if backend == 'xla':
        reference = outputs
      for name, seconds, flops_per_s, error in rows:
        err = '-' if error is None else f'{error:.2e}'
        print(f'{prefix} {name} | {seconds * 1e3:.4f} | {flops_per_s / 1e12:.3f} | {err} |', flush=True)


if __name__ == '__main__':
  app.run(main)

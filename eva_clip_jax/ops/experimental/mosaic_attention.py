"""The 'mosaic' attention backend: Mosaic GPU flash attention (FlashAttention-3 style, Hopper), tokamax's kernel.

Why tokamax's kernel and not jax's. jax 0.10.2 ships a Mosaic GPU flash attention
(`jax.experimental.pallas.ops.gpu.attention_mgpu`, unchanged in jax's main of 2026-08 but for API renames), but it
is a demonstration kernel that EVA cannot use: float16 only (its shared-memory buffers are declared float16, so
bfloat16 inputs fail at trace time: "Mixed input dtypes for matrix multiplication unsupported"), no softmax scale,
no mask and no sequence lengths (197 or 257 tokens need padded keys masked out; query lengths must be a multiple of
128, key lengths of 64), and no backward for causal attention. Its float16 forward and backward do compile for an
H100 here (BENCHMARKS.md). tokamax 0.0.12 (`tokamax.dot_product_attention(..., implementation='mosaic_gpu')`,
sm_90 and sm_100 kernels) takes bfloat16, a scale, key lengths and causal masks, forward and backward.

tokamax is not in the requirements (issue 12: only if it beats cuDNN, which takes a GPU to show): this backend is
always registered and says how to install tokamax when it is missing; experimental (unmeasured), selected by name
only; `benchmarks/gpu_check.py` measures it where
tokamax is importable.

Shapes. q, k, v are padded along the sequence to a multiple of 8 (the kernel's TMA copies need it: 197 -> 200), or
of 128 when causal (the causal kernel walks the queries in tiles of 2 x 64); the padded keys are masked through the
key lengths, the padded query rows dropped. tokamax pads the keys further to its key block (masked the same way)
and head dims to a multiple of 64 (g/14's 88 and E/14's 112 cost 128). The attention seam rotates q and k for RoPE before the
kernel, as for 'cudnn' and 'xla'.

Deviceless compiles. tokamax asks jax's default device whether it is a Hopper GPU; in an ahead-of-time compile for
GPU devices on a CPU host (the planner, tests/test_accelerator_compile.py) that is the CPU. The kernel's forward
and backward are therefore traced with tokamax's probes answering for the compile target (`_tokamax_for_target`).
This compiles the kernels' Mosaic GPU programs into the XLA executable (the `mosaic_gpu_v2` custom calls); their
PTX is generated when a GPU loads them, so a deviceless compile does not prove that ptxas accepts them.

No CPU execution: Pallas' Mosaic GPU interpreter (jax 0.10.2) does not implement `run_state`, which the kernels
use, so no test here checks numerics; `benchmarks/gpu_check.py` compares with 'xla' on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import jax
import jax.numpy as jnp

from eva_clip_jax.errors import InputError
from eva_clip_jax.ops.common import compile_target

TOKAMAX_VERSION = '0.0.12'  # the newest whose requirements accept jax 0.10.2
_INSTALL = f'pip install tokamax=={TOKAMAX_VERSION}'
_HOPPER_KINDS = ('H100', 'H200', 'H800', 'H20')  # device_kind names of sm_90 parts ('NVIDIA H100 80GB HBM3', GH200)


def tokamax_available() -> bool:
  return importlib.util.find_spec('tokamax') is not None


def _check(q) -> None:
  platform, kind = compile_target(q)
  if platform != 'gpu':
    raise InputError(f"attention backend 'mosaic' needs an NVIDIA Hopper GPU, but this computation is compiled for "
                     f"{platform!r}; use attention='xla' (or 'auto').")
  if jax.default_backend() == 'gpu':  # tokamax has sm_90 and sm_100 kernels and picks by the device's capability
    capability = str(getattr(jax.devices()[0], 'compute_capability', ''))
    if not capability.startswith(('9.', '10.')):
      raise InputError(f"attention backend 'mosaic' needs a Hopper or Blackwell GPU (sm_90, sm_100), got {kind!r} "
                       f"(sm {capability}); use attention='cudnn'.")
  elif not any(h in kind for h in _HOPPER_KINDS):  # deviceless: the probes answer sm_90 (_tokamax_for_target)
    raise InputError(f"attention backend 'mosaic' compiles ahead of time for Hopper GPUs only, got {kind!r}")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise InputError(f"attention backend 'mosaic' supports bfloat16 and float16 only, got {q.dtype}; "
                     "set dtype='bfloat16' or use attention='xla'.")
  if not tokamax_available():
    raise InputError(f"attention backend 'mosaic' runs tokamax's Mosaic GPU kernel (jax's own takes float16 without "
                     f"masks); tokamax is not installed: {_INSTALL}, or use attention='cudnn'.")


@contextlib.contextmanager
def _tokamax_for_target():
  """tokamax's hardware probes answer 'sm_90' while tracing, when jax's default device is not a GPU (deviceless)."""
  if jax.default_backend() == 'gpu':
    yield
    return
  import tokamax
  from tokamax._src import gpu_utils
  saved = gpu_utils.is_sm90, gpu_utils.is_sm100
  gpu_utils.is_sm90, gpu_utils.is_sm100 = (lambda device=None: True), (lambda device=None: False)
  try:
    with tokamax.config.cross_compile(True):
      yield
  finally:
    gpu_utils.is_sm90, gpu_utils.is_sm100 = saved


def _kernel(q, k, v, seq: int, causal: bool, scale: float):
  import tokamax
  lengths = jnp.full((q.shape[0],), seq, jnp.int32)
  return tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=lengths,
                                       implementation='mosaic_gpu')


# The probes must answer while the backward is traced too, which happens after the forward's trace has returned:
# hence a custom_vjp whose two halves each trace tokamax inside `_tokamax_for_target` (jax.vjp's function is a
# pytree of its residuals, so it travels as this vjp's residuals).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, seq: int, causal: bool, scale: float):
  with _tokamax_for_target():
    return _kernel(q, k, v, seq, causal, scale)


def _attention_fwd(q, k, v, seq, causal, scale):
  with _tokamax_for_target():
    return jax.vjp(lambda q, k, v: _kernel(q, k, v, seq, causal, scale), q, k, v)


def _attention_bwd(seq, causal, scale, vjp_fn, g):
  del seq, causal, scale
  with _tokamax_for_target():
    return vjp_fn(g)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal: bool, scale: float):
  """softmax(q k^T * scale [+ causal mask]) v over [batch, seq, heads, head_dim] 16-bit inputs, on Hopper GPUs.

  Call it per device: the attention seam (`ops.attention`) runs it in a shard_map on a mesh."""
  _check(q)
  seq = q.shape[1]
  padded = -(-seq // (128 if causal else 8)) * (128 if causal else 8)
  pad = lambda t: jnp.pad(t, ((0, 0), (0, padded - seq), (0, 0), (0, 0))) if padded != seq else t
  return _attention(pad(q), pad(k), pad(v), seq, causal, float(scale))[:, :seq]

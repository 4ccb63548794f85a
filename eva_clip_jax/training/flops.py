"""Analytic model FLOPs and accelerator peaks, for model FLOPs utilisation (MFU).

What is counted: 2 FLOPs per multiply-add of every matmul, einsum and convolution the model runs, over the
tokens it actually processes. That is:
  vision  patch embedding (the stride-`patch` convolution is a [num_patches, 3 p^2] x [3 p^2, width] matmul;
          it runs on every patch, patch dropout only drops tokens after it), per block the q/k/v projections
          (separate or fused, the same FLOPs), attention scores q k^T and weights v over `1 + kept patches`
          tokens, the output projection and the MLP (SwiGLU: w1, w2, w3; GELU: fc1, fc2), then the head on
          the CLS token only.
  text    per block the fused in-projection, attention over the full `context_length` square, out_proj and the
          MLP, then `text_projection` on the pooled token only. The causal mask halves the useful attention
          work, but MFU conventions (PaLM appendix B, MaxText) count the full square, and so do we.
Not counted: elementwise work (LayerNorms, softmax, RoPE, biases, activations, residual adds, layer scale), the
token-embedding gather, and the contrastive loss's similarity matrix. The last one is batch dependent
(2 * global_batch * embed_dim per sample, logits_per_text being its transpose: ~34 MFLOPs at batch 32k and
embed_dim 512, under 0.1% of B-16's 41 GFLOPs) and would make a per-sample figure depend on the mesh.

Training = 3 x forward (the backward pass does two matmuls per forward matmul), the MFU convention. Remat
recomputation is not model work and is not counted (counting it would give hardware FLOPs utilisation). One
small over-count follows from the convention: the patch embedding needs no input gradient, so its backward
really runs one matmul, not two (0.2% of B-16's training FLOPs).

Checked in tests/test_flops.py against XLA's own `cost_analysis()`, which also counts elementwise work (0.5-2.5%
more at B-16 widths, up to 15% more at the tiny model's width 64), and against open_clip's published profile
(`docs/model_profile.csv`, measured with `torch.utils.flop_counter.FlopCounterMode`, which counts matmuls,
convolutions and attention at 2 FLOPs per multiply-add, as here): EVA02-B-16 35.13 image / 5.96 text GFLOPs,
EVA02-L-14 162.00 / 13.30.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from eva_clip_jax.errors import InputError
from eva_clip_jax.models.registry import ModelSpec, TextSpec, VisionSpec, get_model_spec
from eva_clip_jax.models.vision import num_kept_patches


def _matmul(m: int, k: int, n: int) -> int:
  """FLOPs of an [m, k] x [k, n] matmul."""
  return 2 * m * k * n


def vision_tokens(spec: VisionSpec, patch_dropout: float = 0.0) -> int:
  """Tokens the vision blocks see: CLS plus the patches patch dropout keeps (the model's own rule)."""
  kept = num_kept_patches(spec.num_patches, patch_dropout) if patch_dropout > 0.0 else spec.num_patches
  return 1 + kept


def vision_forward_flops(spec: VisionSpec, embed_dim: int, *, patch_dropout: float = 0.0) -> dict[str, int]:
  """Per-sample forward matmul FLOPs of the vision tower, by kind of layer (all blocks summed)."""
  n, d, h = vision_tokens(spec, patch_dropout), spec.width, spec.mlp_dim
  mlp_matmuls = 3 if spec.mlp == 'swiglu' else 2
  per_block = {
      'qkv': 3 * _matmul(n, d, d),  # fused or separate, the same three [d, d] products
      # Scores and weighted values: num_heads x [n, head_dim] x [head_dim, n] and back = n^2 d each.
      'attention': _matmul(n, d, n) + _matmul(n, n, d),
      'proj': _matmul(n, d, d),
      'mlp': mlp_matmuls * _matmul(n, d, h),  # every MLP matmul is d x h or h x d
  }
  flops = {name: spec.depth * value for name, value in per_block.items()}
  flops['patch_embed'] = _matmul(spec.num_patches, 3 * spec.patch_size ** 2, d)
  flops['head'] = _matmul(1, d, embed_dim)  # on the CLS token only
  return flops


def text_forward_flops(spec: TextSpec, embed_dim: int) -> dict[str, int]:
  """Per-sample forward matmul FLOPs of the text tower at the full context length, by kind of layer."""
  n, d, h = spec.context_length, spec.width, spec.mlp_dim
  per_block = {
      'qkv': _matmul(n, d, 3 * d),
      'attention': _matmul(n, d, n) + _matmul(n, n, d),  # the full square, causal mask or not (see above)
      'proj': _matmul(n, d, d),
      'mlp': 2 * _matmul(n, d, h),
  }
  flops = {name: spec.depth * value for name, value in per_block.items()}
  flops['head'] = _matmul(1, d, embed_dim)  # text_projection, on the pooled token only
  return flops


def _resolve(spec: ModelSpec | str) -> ModelSpec:
  return get_model_spec(spec) if isinstance(spec, str) else spec


def forward_flops_per_sample(spec: ModelSpec | str, *, patch_dropout: float = 0.0) -> dict[str, Any]:
  """Forward-pass model FLOPs of one (image, text) pair.

  Returns {'visual', 'text', 'total'} as exact integers, plus 'vision_tokens' and 'breakdown' (per tower, per
  kind of layer). `patch_dropout` is the training-time fraction of patches dropped; evaluation runs at 0.
  """
  spec = _resolve(spec)
  if not 0.0 <= patch_dropout < 1.0:
    raise InputError(f'patch_dropout must be in [0, 1), got {patch_dropout}')
  visual = vision_forward_flops(spec.vision, spec.embed_dim, patch_dropout=patch_dropout)
  text = text_forward_flops(spec.text, spec.embed_dim)
  return {
      'visual': sum(visual.values()),
      'text': sum(text.values()),
      'total': sum(visual.values()) + sum(text.values()),
      'vision_tokens': vision_tokens(spec.vision, patch_dropout),
      'breakdown': {'visual': visual, 'text': text},
  }


def train_flops_per_sample(spec: ModelSpec | str, *, patch_dropout: float = 0.0,
                           remat: bool | str = False) -> dict[str, int]:
  """Model FLOPs of one training step per sample: 3 x forward ({'visual', 'text', 'total'}).

  `remat` is accepted so callers can pass their run config through, and deliberately ignored: MFU counts the
  model's FLOPs, not the recomputation a memory-saving policy adds (that would be hardware FLOPs).
  """
  del remat
  forward = forward_flops_per_sample(spec, patch_dropout=patch_dropout)
  return {key: 3 * forward[key] for key in ('visual', 'text', 'total')}


# Dense (no 2:4 sparsity) peak FLOP/s per JAX device, from the vendors' datasheets: 16-bit tensor-core/MXU
# rate, TF32 tensor-core rate and plain FP32 (CUDA-core) rate. Matched against `device.device_kind`, most
# specific first: substrings for NVIDIA (the same chip has several spellings: 'NVIDIA A100-SXM4-80GB',
# 'NVIDIA A100 80GB PCIe', ...), exact names for TPUs (where 'TPU v5' is v5p and 'TPU v5 lite' is v5e).
_GPU_PEAKS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (('h100', 'pcie'), {'bf16': 756e12, 'tf32': 378e12, 'fp32': 51.2e12}),
    (('h100', 'nvl'), {'bf16': 835e12, 'tf32': 417.5e12, 'fp32': 60e12}),
    (('h200', 'nvl'), {'bf16': 835e12, 'tf32': 417.5e12, 'fp32': 60e12}),
    (('gh200',), {'bf16': 989e12, 'tf32': 494.5e12, 'fp32': 67e12}),
    (('h200',), {'bf16': 989e12, 'tf32': 494.5e12, 'fp32': 67e12}),
    (('h100',), {'bf16': 989e12, 'tf32': 494.5e12, 'fp32': 67e12}),  # SXM: 'NVIDIA H100 80GB HBM3'
    (('a100',), {'bf16': 312e12, 'tf32': 156e12, 'fp32': 19.5e12}),
)
# TPU bf16 peaks per JAX device (one chip on v4 and later: megacore / single-core chips).
_TPU_PEAKS: dict[str, float] = {
    'tpu v4': 275e12,
    'tpu v5 lite': 197e12, 'tpu v5e': 197e12,
    'tpu v5': 459e12, 'tpu v5p': 459e12,
    'tpu v6 lite': 918e12, 'tpu v6e': 918e12,
}
_16_BIT = ('bfloat16', 'float16')


def _float32_mode() -> str:
  """How JAX computes float32 matmuls under the current `jax_default_matmul_precision`.

  JAX's default leans to speed: float32 dots run as TF32 on Ampere and later NVIDIA GPUs and as one bfloat16
  pass on TPU (docs.jax.dev/en/latest/201/precision.html). 'highest' asks for true float32 (CUDA cores on
  GPU, six bfloat16 passes on TPU); 'high' for TF32 on GPU and three bfloat16 passes on TPU.
  """
  precision = jax.config.jax_default_matmul_precision
  precision = str(precision).lower() if precision is not None else 'default'
  if precision in ('highest', 'float32', 'f32_f32_f32'):
    return 'highest'
  if precision in ('high', 'tensorfloat32', 'bfloat16_3x', 'tf32_tf32_f32', 'bf16_bf16_f32_x3'):
    return 'high'
  return 'default'


def peak_flops_per_device(device: jax.Device | None = None, dtype: Any = 'bfloat16') -> float | None:
  """Dense peak matmul FLOP/s of one device for `dtype` inputs, or None where the table has no entry (CPUs).

  float32 follows JAX's matmul precision (see `_float32_mode`): by default the TF32 rate on NVIDIA GPUs and
  the bfloat16 rate on TPUs, since that is what XLA runs. float16 on TPU is given the bfloat16 rate.
  """
  device = device if device is not None else jax.devices()[0]
  dtype = jnp.dtype(dtype).name
  if dtype not in _16_BIT + ('float32',):
    raise ValueError(f'No peak for dtype {dtype!r}; use bfloat16, float16 or float32')
  kind = device.device_kind.lower()
  mode = _float32_mode()
  if kind in _TPU_PEAKS:
    bf16 = _TPU_PEAKS[kind]
    if dtype in _16_BIT:
      return bf16
    return bf16 / {'default': 1, 'high': 3, 'highest': 6}[mode]
  for needles, peaks in _GPU_PEAKS:
    if all(needle in kind for needle in needles):
      if dtype in _16_BIT:
        return peaks['bf16']
      return peaks['fp32'] if mode == 'highest' else peaks['tf32']
  return None


def measure_peak_flops(dtype: Any = 'float32', n: int = 2048, iters: int = 8, *, repeats: int = 3,
                       device: jax.Device | None = None) -> float:
  """Empirical matmul FLOP/s of one device: the best of `repeats` timed runs of `iters` chained n x n matmuls.

  For devices the table does not know (the CPU benchmark's denominator). The matmuls are chained inside one
  jitted loop so that XLA can neither hoist them nor merge them, and one dispatch covers them all; on a GPU or
  TPU use n >= 8192 to get near the datasheet rate. A measurement, so never asserted on in tests.
  """
  device = device if device is not None else jax.devices()[0]
  dtype = jnp.dtype(dtype)
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype), device)
  # Scaled so a product keeps the magnitude of its input: no overflow to inf in 16-bit over the chain.
  b = jax.device_put((jax.random.normal(key_b, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype), device)

  @jax.jit
  def chain(x, w):
    return jax.lax.fori_loop(0, iters, lambda _, y: y @ w, x)

  chain(a, b).block_until_ready()  # compile and warm up
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    chain(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return iters * _matmul(n, n, n) / best

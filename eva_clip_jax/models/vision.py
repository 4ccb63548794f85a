"""The EVA vision transformer: EVA-01 (g), EVA-02 (B, L) and bigE blocks, patch dropout, CLS pooling.

Parameter names follow the EVA repository (`q_proj`, `q_bias`, `inner_attn_ln`, `mlp.w1/w2/ffn_ln/w3`,
`mlp.fc1/fc2`, `norm1/norm2`, `gamma_1/gamma_2`) so the checkpoint mappings stay one-to-one. Images are NHWC.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_clip_jax.models import rope as rope_lib
from eva_clip_jax.models.common import (AXES_METADATA, ModelOptions, create_stacked, drop_path, layer_norm, linear,
                                        param, run_stacked, trunc_normal)
from eva_clip_jax.models.registry import VisionSpec
from eva_clip_jax.ops import dot_product_attention, flash_attention
from eva_clip_jax.ops.attention import backend_name


class EvaAttention(nnx.Module):
  """Self-attention with q and v biases but no k bias; optional sub-LN and 2D RoPE (CLS excluded).

  With the 'pallas' backend the RoPE rotation is fused into the flash-attention kernels; other backends rotate
  q and k first.
  """

  def __init__(self, spec: VisionSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    width = spec.width
    self.num_heads = spec.num_heads
    self.backend = opts.attention
    self.dtype = opts.dtype
    if spec.qkv == 'separate':
      self.q_proj = linear(width, width, opts, rngs, axes=('embed', 'heads'), use_bias=False)
      self.k_proj = linear(width, width, opts, rngs, axes=('embed', 'heads'), use_bias=False)
      self.v_proj = linear(width, width, opts, rngs, axes=('embed', 'heads'), use_bias=False)
    else:
      self.qkv = linear(width, 3 * width, opts, rngs, axes=('embed', 'heads'), use_bias=False)
    self.q_bias = param(jnp.zeros((width,), opts.param_dtype), ('norm',))
    self.v_bias = param(jnp.zeros((width,), opts.param_dtype), ('norm',))
    self.inner_attn_ln = layer_norm(width, spec.norm_eps, opts, rngs) if spec.subln else None
    self.proj = linear(width, width, opts, rngs, axes=('heads', 'embed'))

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    batch, seq, width = x.shape
    if hasattr(self, 'qkv'):
      q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q + self.q_bias[...].astype(self.dtype)
    v = v + self.v_bias[...].astype(self.dtype)
    q, k, v = (t.reshape(batch, seq, self.num_heads, -1) for t in (q, k, v))
    backend = backend_name(self.backend, q)
    if rope is not None and backend == 'pallas':
      # Fused: the kernels rotate each q/k block as they load it, so the rotated q and k (and, in training,
      # their saved copies) never exist in memory. Tables are [seq - 1, D], or [B, kept, D] under patch dropout.
      out = flash_attention(q, k, v, rope=rope)
    else:
      if rope is not None:
        q = rope_lib.apply_rope_skip_cls(q, *rope)
        k = rope_lib.apply_rope_skip_cls(k, *rope)
      out = dot_product_attention(q, k, v, backend=backend)
    out = out.reshape(batch, seq, width)
    if self.inner_attn_ln is not None:
      out = self.inner_attn_ln(out)
    return self.proj(out)


def hidden_padding(mlp_dim: int, multiple: int) -> int:
  """Zero columns that round the MLP hidden size up to a multiple of `multiple` (0 or 1: none)."""
  return -mlp_dim % multiple if multiple > 1 else 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pad_kernel(kernel: jax.Array, pad_in: int, pad_out: int) -> jax.Array:
  return jnp.pad(kernel, ((0, pad_in), (0, pad_out)))


def _pad_kernel_fwd(kernel, pad_in, pad_out):
  return _pad_kernel(kernel, pad_in, pad_out), None


def _pad_kernel_bwd(pad_in, pad_out, _, g):
  # The gradient is a slice of the padded one. The barrier before the slice keeps it out of the data-parallel
  # gradient reduction: the TPU compiler (libtpu 0.0.42.1) otherwise merges it with zero1/fsdp's shard slice into
  # a reduce-scatter fusion and fails a RET_CHECK ("The shape doesn't match when replacing 'dynamic-slice ...'
  # with 'fusion ... all-reduce-scatter'"); tests/test_accelerator_compile.py compiles the padded MLP under both.
  return (jax.lax.optimization_barrier(g)[:g.shape[0] - pad_in, :g.shape[1] - pad_out],)


_pad_kernel.defvjp(_pad_kernel_fwd, _pad_kernel_bwd)


def _dense(layer: nnx.Linear, x: jax.Array, *, pad_out: int = 0, pad_in: int = 0) -> jax.Array:
  """layer(x) with the kernel zero-padded to [in + pad_in, out + pad_out] (and the bias to out + pad_out).

  The padding is made per call from the stored (true-shape) parameters, so checkpoints never see it; its
  gradient is a slice. Padded output columns are exactly 0; padded input rows multiply x's padding by 0.
  """
  if not (pad_out or pad_in):
    return layer(x)
  kernel = _pad_kernel(layer.kernel[...].astype(layer.dtype), pad_in, pad_out)
  y = jnp.dot(x.astype(layer.dtype), kernel, precision=layer.precision)
  if layer.bias is not None:
    y = y + jnp.pad(layer.bias[...].astype(layer.dtype), (0, pad_out))
  return y


def _sub_ln(ln: nnx.LayerNorm | None, x: jax.Array, pad: int) -> jax.Array:
  """The MLP's sub-LN over the true hidden features of x, whose last `pad` columns are zero padding.

  A plain LayerNorm over the padded width would count the zeros in the mean and variance; here both statistics
  are masked to the true features (as flax computes them: float32, E[x^2] - E[x]^2), and the padding stays 0
  (zero scale and bias there), so the next layer's zero rows see zeros.
  """
  if ln is None or not pad:
    return x if ln is None else ln(x)
  # Mirrors nnx.LayerNorm's arithmetic (inputs and scale/bias in ln.dtype, statistics in float32 or wider).
  x = x.astype(ln.dtype)
  stats = x.astype(jnp.promote_types(ln.dtype, jnp.float32))
  mask = jnp.arange(x.shape[-1]) < x.shape[-1] - pad
  mean = jnp.mean(stats, axis=-1, keepdims=True, where=mask)
  var = jnp.maximum(0.0, jnp.mean(stats * stats, axis=-1, keepdims=True, where=mask) - mean * mean)
  scale, bias = (jnp.pad(p[...].astype(ln.dtype), (0, pad)) for p in (ln.scale, ln.bias))
  return ((x - mean) * (jax.lax.rsqrt(var + ln.epsilon) * scale) + bias).astype(ln.dtype)


class SwiGLU(nnx.Module):
  """EVA-02's MLP: w3(ffn_ln(silu(w1 x) * w2 x)), optionally computed at a padded hidden size.

  With `opts.mlp_pad_multiple` the hidden activations are padded with zero columns (silu(0) * 0 = 0) so the
  three matmuls get tile-aligned shapes (L/14: 2730 -> 2816); results equal the unpadded MLP's.
  """

  def __init__(self, spec: VisionSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.pad = hidden_padding(spec.mlp_dim, opts.mlp_pad_multiple)
    self.w1 = linear(spec.width, spec.mlp_dim, opts, rngs, axes=('embed', 'mlp'))
    self.w2 = linear(spec.width, spec.mlp_dim, opts, rngs, axes=('embed', 'mlp'))
    self.ffn_ln = layer_norm(spec.mlp_dim, spec.norm_eps, opts, rngs) if spec.subln else None
    self.w3 = linear(spec.mlp_dim, spec.width, opts, rngs, axes=('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    pad = self.pad
    x = jax.nn.silu(_dense(self.w1, x, pad_out=pad)) * _dense(self.w2, x, pad_out=pad)
    return _dense(self.w3, _sub_ln(self.ffn_ln, x, pad), pad_in=pad)


class GeluMlp(nnx.Module):
  """EVA-01 / bigE MLP: fc2(gelu(fc1 x)) with the exact (erf) GELU; padded like SwiGLU (gelu(0) = 0)."""

  def __init__(self, spec: VisionSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.pad = hidden_padding(spec.mlp_dim, opts.mlp_pad_multiple)
    self.fc1 = linear(spec.width, spec.mlp_dim, opts, rngs, axes=('embed', 'mlp'))
    self.ffn_ln = layer_norm(spec.mlp_dim, spec.norm_eps, opts, rngs) if spec.subln else None
    self.fc2 = linear(spec.mlp_dim, spec.width, opts, rngs, axes=('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.gelu(_dense(self.fc1, x, pad_out=self.pad), approximate=False)
    return _dense(self.fc2, _sub_ln(self.ffn_ln, x, self.pad), pad_in=self.pad)


class EvaBlock(nnx.Module):
  """Pre-norm `x + f(norm(x))`, or post-norm `x + norm(f(x))` for bigE; optional layer scale."""

  def __init__(self, spec: VisionSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.postnorm = spec.postnorm
    self.norm1 = layer_norm(spec.width, spec.norm_eps, opts, rngs)
    self.attn = EvaAttention(spec, opts, rngs=rngs)
    self.norm2 = layer_norm(spec.width, spec.norm_eps, opts, rngs)
    self.mlp = SwiGLU(spec, opts, rngs=rngs) if spec.mlp == 'swiglu' else GeluMlp(spec, opts, rngs=rngs)
    if spec.layer_scale_init:
      self.gamma_1 = param(jnp.full((spec.width,), spec.layer_scale_init, opts.param_dtype), ('norm',))
      self.gamma_2 = param(jnp.full((spec.width,), spec.layer_scale_init, opts.param_dtype), ('norm',))
    else:
      self.gamma_1 = self.gamma_2 = None

  def _branch(self, x, fn, norm, gamma, rate, key):
    y = norm(fn(x)) if self.postnorm else fn(norm(x))
    if gamma is not None:
      y = y * gamma[...].astype(y.dtype)
    return x + drop_path(y, rate, key)

  def __call__(self, x, *, drop_rate=0.0, key=None, rope=None):
    key_attn, key_mlp = jax.random.split(key) if key is not None else (None, None)
    x = self._branch(x, lambda h: self.attn(h, rope), self.norm1, self.gamma_1, drop_rate, key_attn)
    return self._branch(x, self.mlp, self.norm2, self.gamma_2, drop_rate, key_mlp)


def num_kept_patches(num_patches: int, ratio: float) -> int:
  """Patch tokens kept by patch dropout, as the reference computes it."""
  return max(1, int(num_patches * (1.0 - ratio)))


def sample_patch_keep_indices(key: jax.Array, batch: int, num_patches: int, ratio: float) -> jax.Array:
  """A per-sample random subset of patch indices [batch, keep] (FLIP-style token masking)."""
  keep = num_kept_patches(num_patches, ratio)
  scores = jax.random.normal(key, (batch, num_patches))
  return jax.lax.top_k(scores, keep)[1]


class VisionTransformer(nnx.Module):
  """Patch embedding + CLS + absolute positions -> EVA blocks -> LayerNorm -> CLS token -> head."""

  def __init__(self, spec: VisionSpec, embed_dim: int, opts: ModelOptions, *, drop_path_rate: float = 0.0,
               patch_dropout: float = 0.0, rngs: nnx.Rngs):
    spec.validate()
    if not 0.0 <= patch_dropout < 1.0:
      raise ValueError(f'patch_dropout must be in [0, 1), got {patch_dropout}')
    self.spec = spec
    self.opts = opts
    self.drop_path_rate = float(drop_path_rate)
    self.patch_dropout = float(patch_dropout)
    width, patch = spec.width, spec.patch_size
    self.patch_embed = nnx.Conv(3, width, kernel_size=(patch, patch), strides=(patch, patch), padding='VALID',
                                dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs,
                                kernel_metadata={AXES_METADATA: (None, None, None, 'embed')},
                                bias_metadata={AXES_METADATA: ('norm',)})
    self.cls_token = param(trunc_normal(0.02)(rngs.params(), (1, 1, width), opts.param_dtype), (None, None, 'embed'))
    self.pos_embed = param(trunc_normal(0.02)(rngs.params(), (1, spec.num_patches + 1, width), opts.param_dtype),
                           (None, None, 'embed'))
    self.blocks = create_stacked(lambda r: EvaBlock(spec, opts, rngs=r), spec.depth, rngs)
    self._rescale_residual_outputs()
    self.norm = layer_norm(width, spec.norm_eps, opts, rngs)
    # EVA initialises the head at 1e-3 of the usual scale.
    self.head = linear(width, embed_dim, opts, rngs, axes=('embed', 'mlp'), std=0.02 * 1e-3)

  def _rescale_residual_outputs(self):
    # EVA's fix_init_weight: the outputs of block i (1-based) start scaled by 1/sqrt(2 i).
    scale = (1.0 / np.sqrt(2.0 * np.arange(1, self.spec.depth + 1)))[:, None, None]
    mlp_out = self.blocks.mlp.w3 if self.spec.mlp == 'swiglu' else self.blocks.mlp.fc2
    for layer in (self.blocks.attn.proj, mlp_out):
      layer.kernel[...] = (layer.kernel[...] * scale).astype(layer.kernel[...].dtype)

  def patch_dropout_active(self, train: bool) -> bool:
    return train and self.patch_dropout > 0.0

  def __call__(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None,
               patch_keep_indices: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, 3] -> image embeddings [B, embed_dim] (not normalised).

    train: enables patch dropout and drop path, which then need `rng`.
    patch_keep_indices: [B, keep] patch indices to keep, overriding the random choice (for tests and probes).
    """
    spec, opts = self.spec, self.opts
    if images.ndim != 4 or images.shape[1:] != (spec.image_size, spec.image_size, 3):
      raise ValueError(f'expected images [batch, {spec.image_size}, {spec.image_size}, 3] (NHWC), '
                       f'got {images.shape}')
    needs_rng = train and (self.patch_dropout > 0 or self.drop_path_rate > 0)
    if needs_rng and rng is None:
      raise ValueError('training with patch dropout or drop path needs an rng key')
    batch = images.shape[0]
    x = self.patch_embed(images.astype(opts.dtype)).reshape(batch, spec.num_patches, spec.width)
    cls = jnp.broadcast_to(self.cls_token[...].astype(opts.dtype), (batch, 1, spec.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(opts.dtype)

    rope = None
    if spec.rope:
      cos, sin = (jnp.asarray(t) for t in rope_lib.rope_2d_tables(spec.head_dim, spec.grid_size,
                                                                    spec.pt_seq_len))
      rope = (cos, sin)
    if patch_keep_indices is None and self.patch_dropout_active(train):
      rng, mask_rng = jax.random.split(rng)
      patch_keep_indices = sample_patch_keep_indices(mask_rng, batch, spec.num_patches, self.patch_dropout)
    if patch_keep_indices is not None:
      patches = jnp.take_along_axis(x[:, 1:], patch_keep_indices[..., None], axis=1)
      x = jnp.concatenate([x[:, :1], patches], axis=1)
      if rope is not None:  # each kept token keeps its own rotary angles
        rope = tuple(t[patch_keep_indices] for t in rope)

    depth = spec.depth
    per_layer = {'drop_rate': jnp.linspace(0.0, self.drop_path_rate, depth, dtype=jnp.float32)}
    if train and self.drop_path_rate > 0:
      per_layer['key'] = jax.random.split(rng, depth)
    x = run_stacked(self.blocks, x, per_layer, opts, rope=rope)
    x = self.norm(x)
    return self.head(x[:, 0])


"""The EVA vision transformer: EVA-01 (g), EVA-02 (B, L), bigE and EVA-CLIP-8B/18B blocks, patch dropout, CLS pooling.

Parameter names follow the EVA repository (`q_proj`, `q_bias`, `inner_attn_ln`, `mlp.w1/w2/ffn_ln/w3`,
`mlp.fc1/fc2`, `norm1/norm2`, `gamma_1/gamma_2`) so the checkpoint mappings stay one-to-one. Images are NHWC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_clip_jax.errors import InputError
from eva_clip_jax.models import rope as rope_lib
from eva_clip_jax.models.common import (AXES_METADATA, ModelOptions, create_stacked, drop_path, fused_qkv, linear,
                                        norm_layer, param, run_stacked, trunc_normal)
from eva_clip_jax.models.registry import VisionSpec
from eva_clip_jax.ops import dot_product_attention


class EvaAttention(nnx.Module):
  """Self-attention with q and v biases (none for EVA-CLIP-8B/18B) but no k bias; optional sub-LN and 2D RoPE (CLS
  excluded).

  The RoPE tables go to the attention seam, which fuses the rotation into the kernel where the backend can (the
  rotated q and k then never exist in memory) and rotates q and k first otherwise.
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
    if spec.qkv_bias:
      self.q_bias = param(jnp.zeros((width,), opts.param_dtype), ('norm',))
      self.v_bias = param(jnp.zeros((width,), opts.param_dtype), ('norm',))
    else:
      self.q_bias = self.v_bias = None
    self.inner_attn_ln = norm_layer(spec.norm, width, spec.norm_eps, opts, rngs) if spec.subln else None
    self.proj = linear(width, width, opts, rngs, axes=('heads', 'embed'))

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    batch, seq, width = x.shape
    if hasattr(self, 'qkv'):
      q, k, v = fused_qkv(self.qkv, x, self.num_heads)
    else:
      q, k, v = (t.reshape(batch, seq, self.num_heads, -1) for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
    if self.q_bias is not None:
      q = q + self.q_bias[...].astype(self.dtype).reshape(self.num_heads, -1)
      v = v + self.v_bias[...].astype(self.dtype).reshape(self.num_heads, -1)
    # Tables for the patch tokens: [seq - 1, D], or [B, kept, D] under patch dropout; the CLS token is not rotated.
    out = dot_product_attention(q, k, v, rope=rope, backend=self.backend)
    out = out.reshape(batch, seq, width)
    if self.inner_attn_ln is not None:
      out = self.inner_attn_ln(out)
    return self.proj(out)


class SwiGLU(nnx.Module):
  """EVA-02's MLP: w3(ffn_ln(silu(w1 x) * w2 x))."""

  def __init__(self, spec: VisionSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.w1 = linear(spec.width, spec.mlp_dim, opts, rngs, axes=('embed', 'mlp'))
    self.w2 = linear(spec.width, spec.mlp_dim, opts, rngs, axes=('embed', 'mlp'))
    self.ffn_ln = norm_layer(spec.norm, spec.mlp_dim, spec.norm_eps, opts, rngs) if spec.subln else None
    self.w3 = linear(spec.mlp_dim, spec.width, opts, rngs, axes=('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.silu(self.w1(x)) * self.w2(x)
    return self.w3(x if self.ffn_ln is None else self.ffn_ln(x))


class GeluMlp(nnx.Module):
  """EVA-01 / bigE MLP: fc2(gelu(fc1 x)) with the exact (erf) GELU."""

  def __init__(self, spec: VisionSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.fc1 = linear(spec.width, spec.mlp_dim, opts, rngs, axes=('embed', 'mlp'))
    self.ffn_ln = norm_layer(spec.norm, spec.mlp_dim, spec.norm_eps, opts, rngs) if spec.subln else None
    self.fc2 = linear(spec.mlp_dim, spec.width, opts, rngs, axes=('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.gelu(self.fc1(x), approximate=False)
    return self.fc2(x if self.ffn_ln is None else self.ffn_ln(x))


class EvaBlock(nnx.Module):
  """Pre-norm `x + f(norm(x))`, or post-norm `x + norm(f(x))` for bigE; optional layer scale."""

  def __init__(self, spec: VisionSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.postnorm = spec.postnorm
    self.norm1 = norm_layer(spec.norm, spec.width, spec.norm_eps, opts, rngs)
    self.attn = EvaAttention(spec, opts, rngs=rngs)
    self.norm2 = norm_layer(spec.norm, spec.width, spec.norm_eps, opts, rngs)
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
      raise InputError(f'patch_dropout must be in [0, 1), got {patch_dropout}')
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
    self.norm = norm_layer(spec.norm, width, spec.norm_eps, opts, rngs)
    # EVA initialises the head at 1e-3 of the usual scale.
    self.head = linear(width, embed_dim, opts, rngs, axes=('embed', 'mlp'), std=0.02 * 1e-3, use_bias=spec.qkv_bias)

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


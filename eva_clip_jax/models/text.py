"""The OpenAI-CLIP causal text transformer, pooled at the end-of-text token.

Parameter names follow open_clip (`token_embedding`, `positional_embedding`, `ln_1`, `attn.in_proj`,
`attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_final`, `text_projection`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eva_clip_jax.models.common import (AXES_METADATA, ModelOptions, constrain_batch, create_stacked, fused_qkv,
                                        gathered, layer_norm, linear, param, run_stacked)
from eva_clip_jax.models.registry import TextSpec
from eva_clip_jax.ops import dot_product_attention


class CausalSelfAttention(nnx.Module):

  def __init__(self, spec: TextSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    width = spec.width
    self.num_heads = spec.num_heads
    self.backend = opts.attention
    self.in_proj = linear(width, 3 * width, opts, rngs, axes=('embed', 'heads'), std=width ** -0.5, normal=True)
    self.out_proj = linear(width, width, opts, rngs, axes=('heads', 'embed'),
                           std=width ** -0.5 * (2 * spec.depth) ** -0.5, normal=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq, width = x.shape
    q, k, v = fused_qkv(self.in_proj, x, self.num_heads)
    out = dot_product_attention(q, k, v, causal=True, backend=self.backend)
    return self.out_proj(out.reshape(batch, seq, width))


class Mlp(nnx.Module):

  def __init__(self, spec: TextSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.c_fc = linear(spec.width, spec.mlp_dim, opts, rngs, axes=('embed', 'mlp'), std=(2 * spec.width) ** -0.5,
                       normal=True)
    self.c_proj = linear(spec.mlp_dim, spec.width, opts, rngs, axes=('mlp', 'embed'),
                         std=spec.width ** -0.5 * (2 * spec.depth) ** -0.5, normal=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class TextBlock(nnx.Module):

  def __init__(self, spec: TextSpec, opts: ModelOptions, *, rngs: nnx.Rngs):
    self.ln_1 = layer_norm(spec.width, spec.norm_eps, opts, rngs)
    self.attn = CausalSelfAttention(spec, opts, rngs=rngs)
    self.ln_2 = layer_norm(spec.width, spec.norm_eps, opts, rngs)
    self.mlp = Mlp(spec, opts, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class TextTransformer(nnx.Module):
  """token ids [B, L] (L <= context_length) -> text embeddings [B, embed_dim] (not normalised)."""

  def __init__(self, spec: TextSpec, embed_dim: int, opts: ModelOptions, *, rngs: nnx.Rngs):
    spec.validate()
    self.spec = spec
    self.opts = opts
    self.token_embedding = nnx.Embed(spec.vocab_size, spec.width, dtype=opts.dtype, param_dtype=opts.param_dtype,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
                                     embedding_metadata={AXES_METADATA: ('vocab', 'embed')})
    self.positional_embedding = param(
        nnx.initializers.normal(0.01)(rngs.params(), (spec.context_length, spec.width), opts.param_dtype),
        (None, 'embed'))
    self.blocks = create_stacked(lambda r: TextBlock(spec, opts, rngs=r), spec.depth, rngs)
    self.ln_final = layer_norm(spec.width, spec.norm_eps, opts, rngs)
    self.text_projection = param(
        nnx.initializers.normal(spec.width ** -0.5)(rngs.params(), (spec.width, embed_dim), opts.param_dtype),
        ('embed', 'mlp'))

  def __call__(self, text: jax.Array) -> jax.Array:
    spec, opts = self.spec, self.opts
    if text.ndim != 2 or text.shape[1] > spec.context_length:
      raise ValueError(f'expected token ids [batch, <= {spec.context_length}], got {text.shape}')
    if not jnp.issubdtype(text.dtype, jnp.integer):
      raise ValueError(f'expected integer token ids, got {text.dtype}')
    table = gathered(self.token_embedding.embedding[...])
    x = jnp.take(table, text, axis=0).astype(opts.dtype)
    x = constrain_batch(x) + gathered(self.positional_embedding[...])[:text.shape[1]].astype(opts.dtype)
    x = run_stacked(self.blocks, x, {}, opts)
    x = self.ln_final(x)
    # The end-of-text token has the largest id in the vocabulary, so argmax finds it.
    pooled = jnp.take_along_axis(x, jnp.argmax(text, axis=-1)[:, None, None], axis=1)[:, 0]
    return pooled @ self.text_projection[...].astype(opts.dtype)

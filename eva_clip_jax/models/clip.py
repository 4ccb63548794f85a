"""The two-tower EVA-CLIP model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from eva_clip_jax.models.common import ModelOptions, param
from eva_clip_jax.models.registry import ModelSpec
from eva_clip_jax.models.text import TextTransformer
from eva_clip_jax.models.vision import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nnx.Module):
  """`visual` (EVA ViT), `text` (CLIP text transformer) and a learned `logit_scale` (log of 1/temperature)."""

  def __init__(self, spec: ModelSpec, opts: ModelOptions | None = None, *, drop_path_rate: float = 0.0,
               patch_dropout: float = 0.0, rngs: nnx.Rngs):
    opts = opts or ModelOptions()
    spec.validate()
    self.spec = spec
    self.opts = opts
    self.visual = VisionTransformer(spec.vision, spec.embed_dim, opts, drop_path_rate=drop_path_rate,
                                    patch_dropout=patch_dropout, rngs=rngs)
    self.text = TextTransformer(spec.text, spec.embed_dim, opts, rngs=rngs)
    # Kept in float32 whatever param_dtype is: its exp() multiplies every logit.
    self.logit_scale = param(jnp.asarray(math.log(1 / 0.07), jnp.float32), ())

  def encode_image(self, images: jax.Array, *, normalize: bool = False, train: bool = False,
                   rng: jax.Array | None = None, patch_keep_indices: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, 3], already resized and normalised (see `eva_clip_jax.transforms`)."""
    features = self.visual(images, train=train, rng=rng, patch_keep_indices=patch_keep_indices)
    return l2_normalize(features) if normalize else features

  def encode_text(self, text: jax.Array, *, normalize: bool = False) -> jax.Array:
    """text: token ids [B, L] from `get_tokenizer(name)`."""
    features = self.text(text)
    return l2_normalize(features) if normalize else features

  def __call__(self, images: jax.Array, text: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (normalised image features, normalised text features, logit_scale.exp()), as open_clip does."""
    image_features = self.encode_image(images, normalize=True, train=train, rng=rng)
    text_features = self.encode_text(text, normalize=True)
    return image_features, text_features, jnp.exp(self.logit_scale[...])

  def get_logits(self, images: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img]) in evaluation mode."""
    image_features, text_features, scale = self(images, text)
    logits_per_image = scale * image_features @ text_features.T
    return logits_per_image, logits_per_image.T

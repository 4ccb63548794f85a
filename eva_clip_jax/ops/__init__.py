"""Shape-level operations shared by the towers. Knows nothing about models."""

from eva_clip_jax.ops.attention import available_backends, dot_product_attention, register_backend

__all__ = ['available_backends', 'dot_product_attention', 'register_backend']

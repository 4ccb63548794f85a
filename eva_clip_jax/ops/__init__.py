"""Shape-level operations shared by the towers. Knows nothing about models."""

from eva_clip_jax.ops.attention import available_backends, dot_product_attention, register_backend
# Importing the kernel module registers the 'pallas' attention backend. It imports Pallas's Triton and TPU
# modules only when a kernel is first traced, so this costs `import eva_clip_jax` little.
from eva_clip_jax.ops.flash_attention import flash_attention
# The 'mosaic' backend (tokamax's Mosaic GPU kernel); tokamax is imported only when it is first traced.
from eva_clip_jax.ops import mosaic_attention  # noqa: F401  pylint: disable=unused-import

__all__ = ['available_backends', 'dot_product_attention', 'flash_attention', 'register_backend']

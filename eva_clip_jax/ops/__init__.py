"""Shape-level operations shared by the towers: the attention seam and its backends. Knows nothing about models.

The backends are registered here, explicitly, in the order 'auto' considers them (then 'xla'); a new backend is
one module and one line below. The kernels import Pallas's TPU and Triton modules only when they are first traced.
"""

from eva_clip_jax.ops import cudnn, tpu_attention, xla
from eva_clip_jax.ops.attention import Backend, available_backends, dot_product_attention, register_backend
from eva_clip_jax.ops.experimental import flash_attention, mosaic_attention

register_backend('xla', xla.attention)
register_backend('cudnn', cudnn.attention, supports=cudnn.supports, auto_on=('gpu',), needs=cudnn.NEEDS)
register_backend('pallas_tpu', tpu_attention.attention, supports=tpu_attention.supports, fuses_rope=True,
                 per_device=True, auto_on=('tpu',), needs=tpu_attention.NEEDS)
register_backend('pallas_flash', flash_attention.attention, fuses_rope=True, per_device=True)
register_backend('mosaic', mosaic_attention.attention, per_device=True)

__all__ = ['Backend', 'available_backends', 'dot_product_attention', 'register_backend']

"""The Pallas flash-attention kernel (experimental, 'pallas_flash'; interpreted on CPU) against the 'xla' backend:
outputs and gradients.

Small batches and head counts keep the interpreter fast; block sizes below the sequence length make every case
walk several query and key blocks, with the last one partly padding.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_clip_jax import ops
from eva_clip_jax.models import create_model
from eva_clip_jax.models import rope as rope_lib
from eva_clip_jax.ops import attention as attention_lib
from eva_clip_jax.ops.experimental.flash_attention import flash_attention
from helpers import assert_close, attention_inputs, numpy_attention, out_and_grads, patch_dropout_tables, xla_attention

pytestmark = pytest.mark.usefixtures('float32_matmuls')  # float32 tolerances: no TF32 on GPUs


# seq, head_dim, causal, (block_q, block_k, block_q_bwd, block_k_bwd); None = the target's defaults.
F32_CASES = [
    (99, 64, False, (32, 32, 32, 32)),
    (129, 88, False, (64, 32, 32, 64)),
    (197, 112, False, (64, 64, 64, 64)),
    (257, 64, False, None),  # default blocks: several 128/64 blocks
    (77, 64, True, (32, 16, 16, 32)),  # the text tower's length, causal across blocks
]


@pytest.mark.parametrize('seq,head_dim,causal,blocks', F32_CASES)
def test_float32_matches_xla_forward_and_gradients(seq, head_dim, causal, blocks):
  q, k, v, cotangent = attention_inputs(seq, head_dim)
  block_args = dict(zip(('block_q', 'block_k', 'block_q_bwd', 'block_k_bwd'), blocks or ()))
  got = out_and_grads(lambda *a: flash_attention(*a, causal=causal, **block_args), q, k, v, cotangent)
  assert_close(got, out_and_grads(xla_attention(causal), q, k, v, cotangent), atol=1e-5)
  np.testing.assert_allclose(got[0], numpy_attention(q, k, v, causal), atol=1e-5)


def test_long_sequence_forward():
  q, k, v, _ = attention_inputs(577, 64, heads=1)  # 336px / 14 = 24x24 patches + CLS: five 128-row blocks
  out = jax.jit(flash_attention)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, False), atol=1e-5)


# Fused RoPE: shared tables for full sequences (1 + grid^2), per-sample tables for patch-dropout sequences.
@pytest.mark.parametrize('seq,head_dim,per_sample', [(50, 64, False), (289, 64, True)])
def test_fused_rope_matches_rotating_first(seq, head_dim, per_sample):
  batch = 2
  q, k, v, cotangent = attention_inputs(seq, head_dim, batch=batch, heads=1)
  if per_sample:
    rope = patch_dropout_tables(head_dim, grid=24, kept=seq - 1, batch=batch)
  else:
    rope = tuple(jnp.asarray(t) for t in rope_lib.rope_2d_tables(head_dim, int(np.sqrt(seq - 1))))
  flash = lambda *a: flash_attention(*a, rope=rope, block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=64)
  assert_close(out_and_grads(flash, q, k, v, cotangent), out_and_grads(xla_attention(rope=rope), q, k, v, cotangent),
                atol=1e-5)


# 16-bit inputs: both sides see the same 16-bit q, k, v; the reference computes in float32 from them. What is
# left is the kernel's rounding to 16 bits of what feeds its matmuls (probabilities, ds, rotated q/k) and of its
# outputs: a few units of the last place (bfloat16 keeps 8 significant bits, 2^-8 ~ 4e-3; float16 11 bits,
# 2^-11 ~ 5e-4). Measured: at most 0.65% (bfloat16) and 0.12% (float16) of the largest reference value, about
# what the 'xla' backend itself gives with 16-bit inputs. Tolerances: 2e-2 and 4e-3 relative to that maximum.
@pytest.mark.parametrize('dtype,seq,head_dim,causal,with_rope', [(jnp.bfloat16, 129, 88, False, True),
                                                                (jnp.bfloat16, 77, 64, True, False),
                                                                (jnp.float16, 99, 112, False, True)])
def test_16_bit_inputs_match_float32_reference(dtype, seq, head_dim, causal, with_rope):
  rel_tol = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}[dtype]
  q, k, v, cotangent = attention_inputs(seq, head_dim, batch=2, heads=1, seed=1)
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  rope = patch_dropout_tables(head_dim, grid=16, kept=seq - 1, batch=2) if with_rope else None
  flash = lambda *a: flash_attention(*a, causal=causal, rope=rope, block_q=64, block_k=32, block_q_bwd=32,
                                         block_k_bwd=64)
  assert jax.eval_shape(flash, q, k, v).dtype == dtype
  got = out_and_grads(flash, q, k, v, cotangent)
  want = out_and_grads(xla_attention(causal, rope), *(t.astype(jnp.float32) for t in (q, k, v)), cotangent)
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert np.abs(a - b).max() <= rel_tol * np.abs(b).max(), name


# Mosaic TPU lowering, run by the TPU interpreter of Pallas (`pltpu.InterpretParams`): padding, causal, RoPE.
@pytest.mark.parametrize('seq,head_dim,causal,with_rope', [(65, 88, False, True), (77, 32, True, False)])
def test_tpu_kernels_in_the_tpu_interpreter(seq, head_dim, causal, with_rope):
  q, k, v, cotangent = attention_inputs(seq, head_dim, batch=2, heads=1)
  rope = patch_dropout_tables(head_dim, grid=16, kept=seq - 1, batch=2) if with_rope else None
  flash = lambda *a: flash_attention(*a, causal=causal, rope=rope, target='tpu', interpret=True, block_q=32,
                                         block_k=16, block_q_bwd=16, block_k_bwd=32)
  assert_close(out_and_grads(flash, q, k, v, cotangent), out_and_grads(xla_attention(causal, rope), q, k, v, cotangent),
                atol=1e-5)


# Forward, dq and dk/dv: three kernels on either target.
@pytest.mark.parametrize('target,platform,custom_call,kernels', [('triton', 'cuda', '__gpu$xla.gpu.triton', 3),
                                                                 ('tpu', 'tpu', 'tpu_custom_call', 3)])
def test_kernels_lower_for_gpu_and_tpu(target, platform, custom_call, kernels):
  # No GPU or TPU here: lowering for one still runs the Triton / Mosaic kernel lowering, which rejects what those
  # compilers cannot take (non-power-of-two Triton blocks, unsupported ops), for the forward and both backward
  # kernels. Compiling the lowered kernels needs the hardware.
  spec = jax.ShapeDtypeStruct((8, 197, 2, 64), jnp.bfloat16)
  rope = tuple(jnp.asarray(t) for t in rope_lib.rope_2d_tables(64, 14))
  for kwargs in (dict(rope=rope), dict(causal=True)):
    def loss(q, k, v):
      out = flash_attention(q, k, v, target=target, interpret=False, **kwargs)
      return jnp.sum(out.astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec, spec, spec).lower(lowering_platforms=(platform,))
    assert re.findall(r'custom_call @([\w$.]+)', lowered.as_text()) == [custom_call] * kernels


def test_tiny_model_with_pallas_flash_attention_matches_xla():
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  text = jax.random.randint(jax.random.key(1), (2, 32), 1, 1000)
  outputs = {}
  for backend in ('xla', 'pallas_flash'):
    model = create_model('tiny', attention=backend)
    outputs[backend] = (np.asarray(model.encode_image(images)), np.asarray(model.encode_text(text)))
  for a, b in zip(outputs['pallas_flash'], outputs['xla']):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_backend_registration():
  assert 'pallas_flash' in ops.available_backends()
  q, k, v, _ = attention_inputs(20, 16, heads=1)
  np.testing.assert_allclose(np.asarray(ops.dot_product_attention(q, k, v, causal=True, backend='pallas_flash')),
                             np.asarray(ops.dot_product_attention(q, k, v, causal=True)), atol=1e-5)
  # Experimental: 'auto' never picks it (and on CPU the kernel only interprets).
  assert attention_lib.resolve('auto', q).name == 'xla'


def test_bad_arguments_are_clear_errors():
  q, k, v, _ = attention_inputs(17, 16, heads=1)
  with pytest.raises(ValueError, match='powers of two'):
    flash_attention(q, k, v, block_q=24)
  with pytest.raises(ValueError, match='rope tables'):  # more table rows than tokens
    flash_attention(q, k, v, rope=(jnp.ones((18, 16)), jnp.ones((18, 16))))
  with pytest.raises(ValueError, match='target'):
    flash_attention(q, k, v, target='mosaic_gpu')

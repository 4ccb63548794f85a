"""The whole-sequence TPU attention kernel (`ops.tpu_attention`), run by Pallas' Mosaic TPU interpreter on CPU,
against the 'xla' backend: outputs and gradients, fused RoPE (shared and per-sample tables), causal masks, the head
dims it packs into 128 lanes; and the attention seam running it as the 'pallas_tpu' backend. Its real compile (the
TPU compiler, no TPU) and 'auto' choosing it for TPU targets are in tests/test_accelerator_compile.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_clip_jax import ops
from eva_clip_jax.ops import tpu_attention
from helpers import assert_close, attention_inputs, out_and_grads, patch_dropout_tables, xla_attention


def _kernel(causal=False, rope=None):
  return lambda q, k, v: tpu_attention.tpu_attention(q, k, v, causal=causal, rope=rope, interpret=True)


# seq, heads, head_dim, causal, rope: B/16's 50%-masked vision length with per-sample tables, an odd length with
# the shared table, the causal text tower, 4 heads of 32 and one of 128 in a lane group.
@pytest.mark.parametrize('seq,heads,head_dim,causal,rope', [(26, 2, 64, False, 'per_sample'),
                                                            (17, 4, 64, False, 'shared'),
                                                            (13, 2, 64, True, None),
                                                            (17, 4, 32, False, 'per_sample'),
                                                            (10, 1, 128, False, None)])
def test_float32_matches_xla(seq, heads, head_dim, causal, rope):
  batch = 8  # the smallest per-device batch the kernel takes (its blocks' sublane dimension)
  q, k, v, cotangent = attention_inputs(seq, head_dim, batch=batch, heads=heads)
  tables = None
  if rope == 'per_sample':
    tables = patch_dropout_tables(head_dim, grid=6, kept=seq - 1, batch=batch)
  elif rope == 'shared':
    tables = patch_dropout_tables(head_dim, grid=4, kept=seq - 1, batch=1)
    tables = tuple(t[0] for t in tables)
  got = out_and_grads(_kernel(causal, tables), q, k, v, cotangent)
  assert_close(got, out_and_grads(xla_attention(causal, tables), q, k, v, cotangent), atol=1e-5)


def test_bfloat16_matches_float32_reference():
  # As for the flash kernels (tests/test_flash_attention.py): the rounding of what feeds the kernel's matmuls
  # to bfloat16 (8 significant bits) leaves differences under 2% of the largest reference value.
  q, k, v, cotangent = attention_inputs(26, 64, batch=16, heads=2, seed=1)
  q, k, v = (t.astype(jnp.bfloat16) for t in (q, k, v))
  tables = patch_dropout_tables(64, grid=6, kept=25, batch=16)
  assert jax.eval_shape(_kernel(rope=tables), q, k, v).dtype == jnp.bfloat16
  got = out_and_grads(_kernel(rope=tables), q, k, v, cotangent)
  want = out_and_grads(xla_attention(rope=tables), *(t.astype(jnp.float32) for t in (q, k, v)), cotangent)
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max(), name


def test_several_grid_steps():
  # 24 sequences: batch blocks of 8 (24 is no multiple of 16), three grid steps along the batch, two lane groups.
  q, k, v, cotangent = attention_inputs(9, 64, batch=24, heads=4)
  assert tpu_attention.batch_block(24, 9, 4, True) == 8 and tpu_attention.batch_block(32, 9, 2, True) == 16
  tables = patch_dropout_tables(64, grid=4, kept=8, batch=24)
  assert_close(out_and_grads(_kernel(rope=tables), q, k, v, cotangent),
                out_and_grads(xla_attention(rope=tables), q, k, v, cotangent), atol=1e-5)


def test_the_seam_runs_it_as_pallas_tpu_with_the_rope_tables():
  # The model's call: q, k, v and the tables through `ops.dot_product_attention`; on CPU the kernel interprets.
  q, k, v, cotangent = attention_inputs(17, 64, batch=8, heads=2)
  tables = patch_dropout_tables(64, grid=4, kept=16, batch=8)
  seam = lambda q, k, v: ops.dot_product_attention(q, k, v, rope=tables, backend='pallas_tpu')
  jaxpr = str(jax.make_jaxpr(seam)(q, k, v))
  assert 'tpu_attention_fwd' in jaxpr and 'flash_attention_fwd' not in jaxpr
  assert_close(out_and_grads(seam, q, k, v, cotangent), out_and_grads(xla_attention(rope=tables), q, k, v, cotangent),
                atol=1e-5)


def test_unsupported_shapes_are_clear_errors():
  q, k, v, _ = attention_inputs(17, 88, batch=8, heads=2)
  assert not tpu_attention.supports(q.shape, q.dtype, 'tpu')
  with pytest.raises(ValueError, match='head_dim'):
    tpu_attention.tpu_attention(q, k, v, interpret=True)
  with pytest.raises(ValueError, match="'pallas_tpu' needs"):
    ops.dot_product_attention(q, k, v, backend='pallas_tpu')
  supports = lambda q, platform='tpu': tpu_attention.supports(q.shape, q.dtype, platform)
  assert supports(attention_inputs(17, 64, batch=8, heads=2)[0]) and supports(attention_inputs(17, 64, batch=8, heads=2)[0], 'cpu')
  assert not supports(attention_inputs(17, 64, batch=8, heads=2)[0], 'gpu')
  assert not supports(attention_inputs(17, 64, batch=8, heads=1)[0])  # 64 lanes: not a whole 128-lane group
  assert not supports(attention_inputs(17, 64, batch=4, heads=2)[0])  # fewer than 8 sequences per block
  q, k, v, _ = attention_inputs(17, 64, batch=8, heads=2)
  with pytest.raises(ValueError, match='rope tables'):  # more table rows than tokens
    tpu_attention.tpu_attention(q, k, v, rope=(jnp.ones((18, 64)), jnp.ones((18, 64))), interpret=True)

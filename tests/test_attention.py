"""The attention function and its backend switch, against a plain numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_clip_jax import ops
from eva_clip_jax.ops import attention as attention_lib


def _numpy_attention(q, k, v, causal):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if causal:
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


def _qkv(seq, heads, head_dim, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, (2, seq, heads, head_dim), dtype) for key in keys]


@pytest.mark.parametrize('seq,head_dim,causal', [(99, 64, False), (197, 88, False), (50, 112, False),
                                                 (77, 64, True), (13, 32, True)])
def test_xla_matches_reference(seq, head_dim, causal):
  q, k, v = _qkv(seq, 2, head_dim)
  out = ops.dot_product_attention(q, k, v, causal=causal)
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, causal), atol=1e-5)


def test_causal_mask_hides_the_future():
  q, k, v = _qkv(10, 1, 8)
  out = ops.dot_product_attention(q, k, v, causal=True)
  v_changed = v.at[:, 5:].set(100.0)
  out_changed = ops.dot_product_attention(q, k, v_changed, causal=True)
  np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(out_changed[:, :5]))


@pytest.mark.parametrize('dtype,atol', [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_16_bit_inputs_stay_close_to_float32(dtype, atol):
  # bfloat16 keeps 8 mantissa bits (relative step 2^-8 ~ 4e-3); outputs are averages of O(1) values.
  q, k, v = _qkv(64, 2, 64)
  ref = ops.dot_product_attention(q, k, v)
  low = ops.dot_product_attention(*(t.astype(dtype) for t in (q, k, v)))
  assert low.dtype == dtype
  np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(ref), atol=atol)


def test_16_bit_gradients_stay_close_to_float32():
  # The backward reuses the 16-bit probabilities (attention._softmax_to): gradients within bfloat16 rounding of the
  # float32 ones, relative to their largest magnitude (measured: under 0.8%).
  q, k, v = _qkv(99, 2, 64)
  cotangent = jax.random.normal(jax.random.key(3), q.shape)

  def grads(dtype):
    fn = lambda *a: ops.dot_product_attention(*a).astype(jnp.float32)
    _, vjp = jax.vjp(fn, *(t.astype(dtype) for t in (q, k, v)))
    return [np.asarray(g, np.float32) for g in vjp(cotangent)]

  for name, low, ref in zip(('dq', 'dk', 'dv'), grads(jnp.bfloat16), grads(jnp.float32)):
    assert np.abs(low - ref).max() <= 2e-2 * np.abs(ref).max(), name


def test_cudnn_off_gpu_is_a_clear_error():
  q, k, v = _qkv(8, 1, 8, jnp.bfloat16)
  with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
    ops.dot_product_attention(q, k, v, backend='cudnn')


def test_unknown_and_unbuilt_backends_are_clear_errors():
  q, k, v = _qkv(8, 1, 8)
  with pytest.raises(ValueError, match='Unknown attention backend'):
    ops.dot_product_attention(q, k, v, backend='magic')
  if 'pallas' not in ops.available_backends():
    with pytest.raises(ValueError, match='Pallas'):
      ops.dot_product_attention(q, k, v, backend='pallas')


def test_auto_runs_everywhere():
  q, k, v = _qkv(8, 1, 8)
  np.testing.assert_allclose(np.asarray(ops.dot_product_attention(q, k, v, backend='auto')),
                             np.asarray(ops.dot_product_attention(q, k, v)), atol=0)


def test_registered_backend_is_used_by_the_model(monkeypatch):
  import eva_clip_jax as ec

  calls = []

  def counting(q, k, v, *, causal, scale):
    calls.append(causal)
    return attention_lib._xla_attention(q, k, v, causal=causal, scale=scale)

  monkeypatch.setitem(attention_lib._BACKENDS, 'counting', counting)
  model = ec.create_model('tiny', attention='counting', scan_layers=False)
  reference = ec.create_model('tiny')
  images = jnp.ones((1, 64, 64, 3))
  text = jnp.asarray(ec.tokenize(['a cat'], 32))
  out = model(images, text)
  ref = reference(images, text)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert True in calls and False in calls  # the text tower is causal, the vision tower is not


def test_shape_errors_name_the_layout():
  with pytest.raises(ValueError, match=r'\[batch, seq, heads, head_dim\]'):
    ops.dot_product_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)))


def _assert_16_bit_backend_matches_xla(backend, seq, head_dim, causal):
  # Both sides get the same bfloat16 inputs; XLA's reference computes its softmax in float32 and so do the fused
  # kernels, so what is left is bfloat16 rounding: within 2% of the largest reference value.
  q, k, v = _qkv(seq, 2, head_dim, jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.key(5), q.shape, jnp.bfloat16)

  def out_and_grads(backend):
    def run(q, k, v):
      out, vjp = jax.vjp(lambda *a: ops.dot_product_attention(*a, causal=causal, backend=backend), q, k, v)
      return (out, *vjp(cotangent))
    return [np.asarray(x, np.float32) for x in jax.jit(run)(q, k, v)]

  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), out_and_grads(backend), out_and_grads('xla')):
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max(), name


@pytest.mark.skipif(jax.devices()[0].platform != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
@pytest.mark.parametrize('seq,head_dim,causal', [(197, 64, False), (99, 64, False), (257, 88, False),
                                                 (50, 112, False), (77, 64, True)])
def test_cudnn_matches_xla_on_gpu(seq, head_dim, causal):
  _assert_16_bit_backend_matches_xla('cudnn', seq, head_dim, causal)  # odd lengths: attention._cudnn_attention pads


def _hopper_with_tokamax() -> bool:
  from eva_clip_jax.ops import mosaic_attention
  device = jax.devices()[0]
  return (device.platform == 'gpu' and str(getattr(device, 'compute_capability', '')).startswith(('9.', '10.'))
          and mosaic_attention.tokamax_available())


# The only numerics check of the 'mosaic' backend: it cannot run on CPU (tests/test_accelerator_compile.py says why).
@pytest.mark.skipif(not _hopper_with_tokamax(), reason="'mosaic' needs a Hopper/Blackwell GPU and tokamax")
@pytest.mark.parametrize('seq,head_dim,causal', [(197, 64, False), (99, 64, False), (257, 88, False),
                                                 (77, 64, True)])
def test_mosaic_matches_xla_on_gpu(seq, head_dim, causal):
  _assert_16_bit_backend_matches_xla('mosaic', seq, head_dim, causal)  # padded 197 -> 200, 77 -> 128, keys masked


def test_shard_kernel_runs_per_device_on_a_mesh():
  # The 'mosaic' backend's shard_map (a kernel's custom call cannot be partitioned): batch over 'data', heads over
  # 'tensor', each device seeing only its shard, and the same result as one call over everything.
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'tensor'))
  # Batch 4: one sample per data shard.
  q, k, v = (jax.device_put(jnp.concatenate([x, -x]), NamedSharding(mesh, P('data', None, 'tensor')))
             for x in _qkv(9, 4, 8))
  shapes = []

  def kernel(q, k, v):
    shapes.append(q.shape)
    return ops.dot_product_attention(q, k, v)

  out = jax.jit(lambda q, k, v: ops.attention.shard_kernel(q, kernel)(q, k, v))(q, k, v)
  assert shapes == [(1, 9, 2, 8)]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ops.dot_product_attention(q, k, v)), atol=1e-6)

"""The attention seam: its function against a plain numpy reference, its registry, the RoPE it applies for
backends that do not fuse it, and the shard_map it runs kernels in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_attention
from configs import tiny
from eva_clip_jax import ops
from eva_clip_jax.models import create_model
from eva_clip_jax.models import rope as rope_lib
from eva_clip_jax.ops import attention as attention_lib
from eva_clip_jax.ops import xla as xla_lib
from eva_clip_jax.ops.rope import apply_rope_after_prefix
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from helpers import numpy_attention

pytestmark = pytest.mark.usefixtures('float32_matmuls')  # float32 tolerances: no TF32 on GPUs


def _qkv(seq, heads, head_dim, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, (2, seq, heads, head_dim), dtype) for key in keys]


@pytest.mark.parametrize('seq,head_dim,causal', [(99, 64, False), (197, 88, False), (50, 112, False),
                                                 (77, 64, True), (13, 32, True)])
def test_xla_matches_reference(seq, head_dim, causal):
  q, k, v = _qkv(seq, 2, head_dim)
  with jax.default_matmul_precision('highest'):  # GPUs default to TF32 for float32 matmuls (~1e-3)
    out = ops.dot_product_attention(q, k, v, causal=causal)
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, causal), atol=1e-5)


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
  if jax.default_backend() == 'gpu':
    pytest.skip('a GPU is attached: cuDNN is available here')
  q, k, v = _qkv(8, 1, 8, jnp.bfloat16)
  with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
    ops.dot_product_attention(q, k, v, backend='cudnn')


def test_unknown_and_renamed_backends_are_clear_errors():
  q, k, v = _qkv(8, 1, 8)
  with pytest.raises(ValueError, match='Unknown attention backend'):
    ops.dot_product_attention(q, k, v, backend='magic')
  with pytest.raises(ValueError, match="now two backends: 'pallas_tpu'.*'pallas_flash'"):
    ops.dot_product_attention(q, k, v, backend='pallas')
  with pytest.raises(ValueError, match="'pallas_tpu'"):
    create_model('tiny', attention='pallas', abstract=True)
  # The TPU kernel chosen explicitly for inputs it cannot take (head_dim 8: not a 128-lane group) says what it needs.
  with pytest.raises(ValueError, match='pallas_tpu.*needs .*head_dim dividing 128'):
    ops.dot_product_attention(q, k, v, backend='pallas_tpu')


def test_auto_runs_everywhere():
  q, k, v = _qkv(8, 1, 8)
  np.testing.assert_allclose(np.asarray(ops.dot_product_attention(q, k, v, backend='auto')),
                             np.asarray(ops.dot_product_attention(q, k, v)), atol=0)


@pytest.fixture
def registry(monkeypatch):
  """Backends registered in a test are gone after it."""
  monkeypatch.setattr(attention_lib, '_BACKENDS', dict(attention_lib._BACKENDS))


def _train_losses(attention, steps=3):
  config = tiny.get_config()
  config.batch_size, config.model.attention, config.model.patch_dropout = 8, attention, 0.5
  mesh = sharding_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  setup = step_lib.make_setup(config, mesh)
  state, train_step = step_lib.init_state(setup), step_lib.make_train_step(setup)
  rng, losses = np.random.default_rng(0), []
  for _ in range(steps):
    batch = {'image': rng.normal(size=(8, 64, 64, 3)).astype(np.float32),
             'text': rng.integers(1, 49407, (8, 32)).astype(np.int32)}
    state, metrics = train_step(state, step_lib.device_batch(batch, mesh))
    losses.append(float(jax.device_get(metrics['loss'])))
  return losses


def test_a_new_backend_is_one_module_and_one_registration_line(registry):
  # The toy backend takes no RoPE tables: the seam rotates q and k for it (the tiny vision tower has 2D RoPE and
  # patch dropout, so per-sample tables), and passing them would be a TypeError. The same training run as with
  # 'xla' (whose RoPE the parity tests check against the PyTorch reference): the same losses, up to float32
  # rounding of two ways of writing one computation.
  calls = []
  counting = lambda q, k, v, **kw: calls.append(kw['causal']) or toy_attention.attention(q, k, v, **kw)
  ops.register_backend('toy', counting)
  assert 'toy' in ops.available_backends()
  toy, xla = _train_losses('toy'), _train_losses('xla')
  assert True in calls and False in calls  # the text tower is causal, the vision tower is not
  assert len(set(toy)) == 3  # three different steps, not one loss repeated
  np.testing.assert_allclose(toy, xla, rtol=1e-5)


def test_the_seam_rotates_for_backends_that_do_not_fuse_rope(registry):
  q, k, v = _qkv(17, 2, 16)
  rope = tuple(jnp.asarray(t) for t in rope_lib.rope_2d_tables(16, 4))  # 16 patch tokens after the CLS token
  seen = {}

  def fused(q, k, v, *, causal, scale, rope):
    seen['rope'] = rope
    q, k = (apply_rope_after_prefix(t, *rope) for t in (q, k))
    return xla_lib.attention(q, k, v, causal=causal, scale=scale)

  ops.register_backend('fused', fused, fuses_rope=True)
  want = ops.dot_product_attention(*(apply_rope_after_prefix(t, *rope) if i < 2 else t for i, t in
                                     enumerate((q, k, v))))
  for backend in ('xla', 'fused'):
    np.testing.assert_allclose(np.asarray(ops.dot_product_attention(q, k, v, rope=rope, backend=backend)),
                               np.asarray(want), atol=1e-6)
  assert seen['rope'] is rope  # handed over, not applied first
  assert not np.allclose(np.asarray(want), np.asarray(ops.dot_product_attention(q, k, v)), atol=1e-3)


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
  from eva_clip_jax.ops.experimental import mosaic_attention
  device = jax.devices()[0]
  return (device.platform == 'gpu' and str(getattr(device, 'compute_capability', '')).startswith(('9.', '10.'))
          and mosaic_attention.tokamax_available())


# The only numerics check of the 'mosaic' backend: it cannot run on CPU (tests/test_accelerator_compile.py says why).
@pytest.mark.skipif(not _hopper_with_tokamax(), reason="'mosaic' needs a Hopper/Blackwell GPU and tokamax")
@pytest.mark.parametrize('seq,head_dim,causal', [(197, 64, False), (99, 64, False), (257, 88, False),
                                                 (77, 64, True)])
def test_mosaic_matches_xla_on_gpu(seq, head_dim, causal):
  _assert_16_bit_backend_matches_xla('mosaic', seq, head_dim, causal)  # padded 197 -> 200, 77 -> 128, keys masked


def test_kernels_run_per_device_on_a_mesh(registry):
  # A kernel's custom call cannot be partitioned: the seam runs a per-device backend in a shard_map, the batch over
  # 'data', the heads over 'tensor', per-sample RoPE tables split with the batch; each device sees only its shard,
  # and the result is that of one call over everything.
  from jax.sharding import NamedSharding, PartitionSpec as P
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (the 8 fake CPU devices; a single GPU has one)')
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'tensor'))
  # Batch 4: one sample per data shard.
  q, k, v = (jax.device_put(jnp.concatenate([x, -x]), NamedSharding(mesh, P('data', None, 'tensor')))
             for x in _qkv(9, 4, 8))
  cos, sin = (jnp.asarray(t) for t in rope_lib.rope_2d_tables(8, 4))
  keep = jnp.stack([jnp.arange(8) + i for i in range(4)])  # per-sample tables: each sample its own 8 rows
  rope = (cos[keep], sin[keep])
  shapes = []

  def kernel(q, k, v, *, causal, scale, rope):
    shapes.append((q.shape, rope[0].shape))
    q, k = (apply_rope_after_prefix(t, *rope) for t in (q, k))
    return xla_lib.attention(q, k, v, causal=causal, scale=scale)

  ops.register_backend('kernel', kernel, fuses_rope=True, per_device=True)
  out = jax.jit(lambda q, k, v: ops.dot_product_attention(q, k, v, rope=rope, backend='kernel'))(q, k, v)
  assert shapes == [((1, 9, 2, 8), (1, 8, 8))]
  want = ops.dot_product_attention(*(jax.device_get(t) for t in (q, k, v)), rope=rope)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)

"""fsdp x tensor parallelism for EVA-CLIP-8B/18B-type blocks (RMSNorm, fused q|k|v without bias, head dim 128,
post-norm): on 8 devices the forward and a train step equal one device's, the fused projection keeps whole heads on
each device (no activation resharding), and fsdp leaves none of the full-size models replicated."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_clip_jax import transforms
from eva_clip_jax.models import create_model, get_model_spec, registry, replace_spec
from eva_clip_jax.models.common import fused_qkv
from eva_clip_jax.models.paths import flat_paths
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from helpers import single_device_mesh, train_config

# EVA-CLIP-18B's blocks at two layers and 1/10 of its width: 4 heads of 128 (the text tower 4 of 64), MLP ratio 5.
SPEC = replace_spec(get_model_spec('EVA-CLIP-18B'), name='eva-clip-18b-small', embed_dim=128, vision__depth=2,
                    vision__width=512, vision__num_heads=4, vision__mlp_dim=2560, vision__image_size=28,
                    text__depth=2, text__width=256, text__num_heads=4, text__context_length=16)
BATCH = 16


@pytest.fixture(autouse=True)
def small_model(monkeypatch):
  monkeypatch.setitem(registry.MODELS, SPEC.name, SPEC)


def _config(mesh_config):
  return train_config(**{'model.name': SPEC.name, 'model.dtype': 'float32', 'model.attention': 'xla',
                         'model.patch_dropout': 0.0, 'sharding.strategy': 'fsdp', 'batch_size': BATCH,
                         'mesh': dict(data=1, **mesh_config), 'label_smoothing': 0.0})


def _batch():
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (BATCH, 28, 28, 3), dtype=np.uint8),
          'text': rng.integers(1, 49407, (BATCH, 16)).astype(np.int32)}


def _run(mesh_config, params):
  """(features and logits, step metrics, HLO of the step) on a mesh."""
  config = _config(mesh_config)
  mesh = sharding_lib.make_mesh(config.mesh) if mesh_config else single_device_mesh()
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, params)
  batch = step_lib.device_batch(_batch(), mesh)

  @jax.jit
  def forward(params, images, text):
    with sharding_lib.activation_sharding(mesh):
      image_features, text_features, logit_scale = setup.model(params)(transforms.normalize_images(images), text)
    return image_features, text_features, logit_scale * image_features @ text_features.T

  features = jax.device_get(forward(state.params, batch['image'], batch['text']))
  train_step = step_lib.make_train_step(setup).lower(state, batch).compile()
  hlo = train_step.as_text()
  _, metrics = train_step(state, batch)
  return features, jax.device_get(metrics), hlo


@pytest.fixture(scope='module')
def one_device():
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(registry.MODELS, SPEC.name, SPEC)
    model = create_model(SPEC.name, seed=1)
    params = jax.device_get(nnx.state(model, nnx.Param).to_pure_dict())
    return params, _run({}, params)


@pytest.mark.parametrize('mesh_config', [dict(fsdp=2, tensor=4), dict(fsdp=4, tensor=2)], ids=['f2t4', 'f4t2'])
def test_fsdp_and_tensor_parallel_equal_one_device(one_device, mesh_config):
  params, (want, want_metrics, _) = one_device
  got, metrics, hlo = _run(mesh_config, params)
  # float32 throughout; sharded matmuls sum their partial products in another order: differences of 1e-6 relative.
  for name, a, b in zip(('image features', 'text features', 'logits'), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  for name in ('loss', 'grad_norm'):
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-4, err_msg=name)
  # Whole heads of q, k and v on each device: no activation ([per-device batch, seq, ...]) is permuted or exchanged
  # between devices. Splitting a contiguously sharded [batch, seq, 3 x width] q|k|v output did that, every layer.
  per_device = BATCH // mesh_config['fsdp']
  seqs = ((28 // 14) ** 2 + 1, 16)
  moved = [line for line in hlo.splitlines() if re.search(r'= \w+\[(\d+),(\d+)[,\]].* (collective-permute|all-to-all)',
                                                          line)]
  moved = [line for line in moved
           if tuple(map(int, re.search(r'= \w+\[(\d+),(\d+)', line).groups())) in {(per_device, s) for s in seqs}]
  assert not moved, moved[:3]


def test_fused_qkv_gives_each_device_whole_heads():
  """The stored [width, 3 x width] kernel is split in contiguous blocks over 'tensor' (the checkpoints' layout:
  device 0 of 4 holds q's first three quarters); `fused_qkv` views it as [width, 3, heads, head_dim] with the heads
  on 'tensor', so q, k and v come out sharded by whole heads, with no activation moved between devices."""
  config = _config(dict(fsdp=2, tensor=4))
  mesh = sharding_lib.make_mesh(config.mesh)
  setup = step_lib.make_setup(config, mesh)
  stored = setup.shardings.params['visual']['blocks']['attn']['qkv']['kernel']
  assert stored.spec == P(None, 'fsdp', 'tensor')
  kernel = jax.ShapeDtypeStruct((512, 1536), jnp.float32, sharding=NamedSharding(mesh, P('fsdp', 'tensor')))
  x = jax.ShapeDtypeStruct((BATCH, 5, 512), jnp.float32, sharding=NamedSharding(mesh, P('fsdp')))

  def project(kernel, x):
    layer = nnx.eval_shape(lambda: nnx.Linear(512, 1536, use_bias=False, rngs=nnx.Rngs(0)))
    layer.kernel = nnx.Param(kernel)
    with sharding_lib.activation_sharding(mesh):
      return fused_qkv(layer, x, 4)

  compiled = jax.jit(project).lower(kernel, x).compile()
  heads = NamedSharding(mesh, P('fsdp', None, 'tensor', None))  # [batch, seq, heads, head_dim]
  assert all(sharding.is_equivalent_to(heads, 4) for sharding in compiled.output_shardings)
  assert not re.search(r'(collective-permute|all-to-all)', compiled.as_text())


@pytest.mark.parametrize('name', ['EVA-CLIP-8B', 'EVA-CLIP-8B-plus', 'EVA-CLIP-18B'])
@pytest.mark.parametrize('mesh_config', [dict(fsdp=64, tensor=4), dict(fsdp=128, tensor=1)], ids=['f64t4', 'f128'])
def test_full_size_models_pass_the_fsdp_replication_check(name, mesh_config):
  """At full size (abstract: eval_shape, nothing allocated) on 256 or 128 devices, fsdp shards all but the small
  vectors (norm scales, 18B's 1.2M-element MLP biases): the check of sharding.py passes with the recipe's
  limit, every matrix and embedding is split over 'fsdp', and with tensor parallelism every block matrix over
  'tensor' as well."""
  config = train_config(**{'model.name': name, 'sharding.strategy': 'fsdp'})
  mesh = jax.sharding.AbstractMesh((1, mesh_config['fsdp'], mesh_config['tensor']), sharding_lib.MESH_AXES)
  state = nnx.state(create_model(name, abstract=True), nnx.Param)
  params, axes = state.to_pure_dict(), sharding_lib.logical_axes(state)
  shardings = sharding_lib.param_shardings(params, axes, mesh, 'fsdp', config.sharding.axis_rules)
  sharding_lib.check_fsdp_sharding(shardings, params, mesh,
                                   max_replicated_fraction=config.sharding.max_replicated_fraction)
  for path, sharding in zip(flat_paths(params), jax.tree.leaves(shardings)):
    if 'embed' in axes[path]:  # every matrix and embedding: the width on 'fsdp'
      assert 'fsdp' in str(sharding.spec), (path, sharding.spec)
    if mesh_config['tensor'] > 1 and {'heads', 'mlp'} & set(axes[path]) and '/blocks/' in path:
      assert 'tensor' in str(sharding.spec), (path, sharding.spec)  # and the blocks' heads or MLP on 'tensor'


def test_fsdp_over_512_devices_leaves_the_text_tower_whole():
  """The text width 1280 (= 5 x 256) does not split 512 ways, so fsdp:512 would keep the text tower's 0.7B
  parameters whole on every device (8.5% of 8B): the check refuses, and 512 devices take data:2,fsdp:256 or
  fsdp:128,tensor:4 instead (launch/README.md's plans)."""
  config = train_config(**{'model.name': 'EVA-CLIP-8B', 'sharding.strategy': 'fsdp'})
  state = nnx.state(create_model('EVA-CLIP-8B', abstract=True), nnx.Param)
  params, axes = state.to_pure_dict(), sharding_lib.logical_axes(state)
  for sizes, fits in (((1, 512, 1), False), ((2, 256, 1), True), ((1, 128, 4), True)):
    mesh = jax.sharding.AbstractMesh(sizes, sharding_lib.MESH_AXES)
    shardings = sharding_lib.param_shardings(params, axes, mesh, 'fsdp', config.sharding.axis_rules)
    check = lambda: sharding_lib.check_fsdp_sharding(  # noqa: E731
        shardings, params, mesh, max_replicated_fraction=config.sharding.max_replicated_fraction)
    if fits:
      check()
    else:
      with pytest.raises(ValueError, match=r'fsdp: 8.5% .* text/blocks/mlp'):
        check()


def test_a_tensor_size_that_splits_heads_is_named_at_setup(caplog):
  """8 'tensor' devices cannot hold whole heads of a 4-head tower: the step still runs (the fused projection's output
  is resharded instead), but slowly, so the setup says which towers and why; 4 divides both and says nothing."""
  with caplog.at_level('WARNING'):
    step_lib.make_setup(_config(dict(fsdp=2, tensor=4)), sharding_lib.make_mesh(dict(data=1, fsdp=2, tensor=4)))
  assert 'does not divide the heads' not in caplog.text
  with caplog.at_level('WARNING'):
    step_lib.make_setup(_config(dict(fsdp=1, tensor=8)), sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=8)))
  assert "the 'tensor' mesh size 8 does not divide the heads (image 4, text 4)" in caplog.text
  abstract = jax.sharding.AbstractMesh((1, 1, 4), sharding_lib.MESH_AXES)
  assert sharding_lib.tensor_heads_problem(abstract, {'image': 40, 'text': 20}) is None  # 18B on tensor:4
  assert 'text 20' in sharding_lib.tensor_heads_problem(
      jax.sharding.AbstractMesh((1, 1, 8), sharding_lib.MESH_AXES), {'image': 40, 'text': 20})

"""The mesh from the config, logical parameter axes and the per-strategy shardings (no training, no compiles)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from eva_clip_jax.models import create_model
from eva_clip_jax.training import sharding as sharding_lib
from eva_clip_jax.training.loop import train_and_evaluate


@pytest.fixture(scope='module')
def abstract_params():
  from flax import nnx
  return nnx.state(create_model('EVA02-CLIP-B-16', abstract=True), nnx.Param).to_pure_dict()


@pytest.mark.parametrize('path,ndim,expected', [
    ('visual/blocks/mlp/w1/kernel', 3, ('layers', 'embed', 'mlp')),
    ('visual/blocks/mlp/w3/kernel', 3, ('layers', 'mlp', 'embed')),
    ('visual/blocks/attn/proj/kernel', 3, ('layers', 'mlp', 'embed')),
    ('text/blocks/attn/in_proj/kernel', 3, ('layers', 'embed', 'mlp')),
    ('visual/blocks/norm1/scale', 2, ('layers', None)),
    ('visual/head/kernel', 2, ('embed', 'mlp')),
    ('text/token_embedding/embedding', 2, ('vocab', 'embed')),
    ('visual/pos_embed', 3, (None, None, 'embed')),
    ('visual/patch_embed/kernel', 4, (None, None, None, 'embed')),
    ('logit_scale', 0, ()),
])
def test_logical_axes(path, ndim, expected):
  assert sharding_lib.logical_axes(path, ndim) == expected


def test_mesh_from_config():
  mesh = sharding_lib.make_mesh(dict(data=-1, fsdp=2, tensor=1))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert sharding_lib.data_parallel_size(mesh) == 8
  with pytest.raises(ValueError, match='unknown axes'):
    sharding_lib.make_mesh(dict(model=8))
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding_lib.make_mesh(dict(data=-1, fsdp=-1))
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding_lib.make_mesh(dict(data=16))
  with pytest.raises(ValueError, match='does not divide'):
    sharding_lib.make_mesh(dict(data=-1, fsdp=3))


RULES = tiny.get_config().sharding.rules


def test_strategies_shard_what_they_should(abstract_params):
  mesh = sharding_lib.make_mesh(dict(data=2, fsdp=4))
  w1 = lambda tree: tree['visual']['blocks']['mlp']['w1']['kernel']  # noqa: E731  [12, 768, 2048]
  for strategy in ('dp', 'zero1'):
    params = sharding_lib.param_shardings(abstract_params, mesh, strategy, RULES)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(params))
  params = sharding_lib.param_shardings(abstract_params, mesh, 'fsdp', RULES)
  assert w1(params).spec == P(None, 'fsdp', None)
  moments = sharding_lib.optimizer_state_shardings(params, abstract_params, mesh, 'fsdp')
  assert w1(moments).spec == P(None, 'fsdp', 'data')  # the rest of the data-parallel devices split it further
  zero1 = sharding_lib.param_shardings(abstract_params, mesh, 'zero1', RULES)
  moments = sharding_lib.optimizer_state_shardings(zero1, abstract_params, mesh, 'zero1')
  assert w1(moments).spec == P(None, None, ('data', 'fsdp'))  # the largest dimension the 8 devices divide
  dp_moments = sharding_lib.optimizer_state_shardings(zero1, abstract_params, mesh, 'dp')
  assert all(s.is_fully_replicated for s in jax.tree.leaves(dp_moments))
  with pytest.raises(ValueError, match='unknown sharding strategy'):
    sharding_lib.param_shardings(abstract_params, mesh, 'zero3', RULES)


def test_tensor_axis_shards_the_mlp_dimension(abstract_params):
  mesh = sharding_lib.make_mesh(dict(data=4, tensor=2))
  params = sharding_lib.param_shardings(abstract_params, mesh, 'zero1', RULES)
  assert params['visual']['blocks']['mlp']['w1']['kernel'].spec == P(None, None, 'tensor')
  assert params['visual']['blocks']['mlp']['w3']['kernel'].spec == P(None, 'tensor', None)
  assert params['text']['token_embedding']['embedding'].spec == P('tensor', None)


def test_indivisible_dimensions_stay_whole(abstract_params):
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=8))
  params = sharding_lib.param_shardings(abstract_params, mesh, 'fsdp', (('embed', 'fsdp'), ('vocab', 'fsdp')))
  # 49408 = 8 x 6176 shards; B-16's text width 512 too; a 7-way split of either would not divide.
  assert params['text']['token_embedding']['embedding'].spec == P('fsdp', None)
  mesh7 = sharding_lib.make_mesh(dict(fsdp=7), devices=jax.devices()[:7])
  params = sharding_lib.param_shardings(abstract_params, mesh7, 'fsdp', RULES)
  assert params['visual']['blocks']['mlp']['w1']['kernel'].spec == P(None, None, None)


def test_zero1_moments_use_the_axes_that_divide_when_their_product_does_not():
  mesh = sharding_lib.make_mesh(dict(data=2, fsdp=4))
  replicated = sharding_lib.replicated(mesh)
  leaves = {'both': jax.ShapeDtypeStruct((3, 16), np.float32),  # 8 divides 16: every axis on one dimension
            'split': jax.ShapeDtypeStruct((12, 6), np.float32),  # 8 divides neither: fsdp on 12, data on 6
            'part': jax.ShapeDtypeStruct((12,), np.float32),  # only fsdp divides: replicated over data
            'none': jax.ShapeDtypeStruct((3, 5), np.float32)}
  specs = sharding_lib.optimizer_state_shardings(jax.tree.map(lambda _: replicated, leaves), leaves, mesh, 'zero1')
  assert {k: v.spec for k, v in specs.items()} == {
      'both': P(None, ('data', 'fsdp')), 'split': P('fsdp', 'data'), 'part': P('fsdp'), 'none': P(None, None)}
  for name, leaf in leaves.items():  # every spec is valid for its shape
    jax.device_put(np.zeros(leaf.shape, leaf.dtype), specs[name])


def test_batch_must_divide_over_the_data_parallel_devices(tmp_path):
  config = tiny.get_config()
  config.batch_size = 12
  with pytest.raises(ValueError, match='batch_size 12 must divide evenly over the 8 data-parallel devices'):
    train_and_evaluate(config, str(tmp_path))

"""The mesh from the config, the logical axes the models declare and the per-strategy shardings (no training, no
compiles)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import tiny
from eva_clip_jax.models import create_model
from eva_clip_jax.models.common import AXES_METADATA
from eva_clip_jax.models.paths import flat_paths
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from eva_clip_jax.training.loop import train_and_evaluate


def _param_state(name='EVA02-CLIP-B-16'):
  return nnx.state(create_model(name, abstract=True), nnx.Param)


@pytest.fixture(scope='module')
def b16():
  state = _param_state()
  return state.to_pure_dict(), sharding_lib.logical_axes(state)


def _shardings(b16, mesh, strategy, rules=None):
  params, axes = b16
  return sharding_lib.param_shardings(params, axes, mesh, strategy, RULES if rules is None else rules)


@pytest.mark.parametrize('path,expected', [
    ('visual/blocks/mlp/w1/kernel', ('layers', 'embed', 'mlp')),
    ('visual/blocks/mlp/w3/kernel', ('layers', 'mlp', 'embed')),
    ('visual/blocks/attn/q_proj/kernel', ('layers', 'embed', 'heads')),
    ('visual/blocks/attn/proj/kernel', ('layers', 'heads', 'embed')),
    ('text/blocks/attn/in_proj/kernel', ('layers', 'embed', 'heads')),
    ('text/blocks/attn/out_proj/kernel', ('layers', 'heads', 'embed')),
    ('visual/blocks/norm1/scale', ('layers', 'norm')),
    ('visual/blocks/attn/q_bias', ('layers', 'norm')),
    ('visual/head/kernel', ('embed', 'mlp')),
    ('text/text_projection', ('embed', 'mlp')),
    ('text/token_embedding/embedding', ('vocab', 'embed')),
    ('visual/pos_embed', (None, None, 'embed')),
    ('visual/patch_embed/kernel', (None, None, None, 'embed')),
    ('logit_scale', ()),
])
def test_models_declare_logical_axes(b16, path, expected):
  assert b16[1][path] == expected


@pytest.mark.parametrize('model', ['EVA01-CLIP-g-14', 'EVA02-CLIP-bigE-14', 'tiny'])
def test_every_parameter_of_every_family_declares_its_axes(model):
  state = _param_state(model)
  axes = sharding_lib.logical_axes(state)
  assert set(axes) == set(flat_paths(state.to_pure_dict()))


def _edit_axes(state, path, axes):
  for key, variable in nnx.to_flat_state(state):
    if '/'.join(map(str, key)) == path:
      variable.set_metadata(AXES_METADATA, axes)
      return state
  raise KeyError(path)


def test_a_parameter_without_or_with_wrong_axes_fails():
  """Removed, renamed or miscounted logical axes are errors, never a silent fallback to replication."""
  w1 = 'visual/blocks/mlp/w1/kernel'
  with pytest.raises(ValueError, match=f'{w1}: no logical axes'):
    sharding_lib.logical_axes(_edit_axes(_param_state('tiny'), w1, None))
  with pytest.raises(ValueError, match=f"{w1}: unknown logical axes \\['hidden'\\]"):
    sharding_lib.logical_axes(_edit_axes(_param_state('tiny'), w1, ('layers', 'embed', 'hidden')))
  with pytest.raises(ValueError, match=f'{w1}: logical axes'):
    sharding_lib.logical_axes(_edit_axes(_param_state('tiny'), w1, ('embed', 'mlp')))
  state = _param_state('tiny')
  params, axes = state.to_pure_dict(), sharding_lib.logical_axes(state)
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=8))
  with pytest.raises(ValueError, match='no logical axes for parameters'):
    sharding_lib.param_shardings(params, {k: v for k, v in axes.items() if k != w1}, mesh, 'fsdp', RULES)
  with pytest.raises(ValueError, match="missing \\['mlp'\\]"):
    sharding_lib.param_shardings(params, axes, mesh, 'fsdp', [r for r in RULES if r[0] != 'mlp'])
  with pytest.raises(ValueError, match="mesh axes \\['model'\\]"):
    sharding_lib.param_shardings(params, axes, mesh, 'fsdp', [*RULES[:-1], ('norm', 'model')])


def test_fsdp_fails_loudly_when_the_weights_stay_whole():
  """A rule mapping no weight dimension to 'fsdp' (here: the width left unsharded) leaves the model replicated on
  every device; the setup refuses, naming the largest such parameters."""
  config = tiny.get_config()
  config.sharding.strategy = 'fsdp'
  config.mesh.update(dict(data=1, fsdp=8))
  mesh = sharding_lib.make_mesh(config.mesh)
  step_lib.make_setup(config, mesh)  # the recipe's rules shard it
  config.sharding.axis_rules = tuple((name, None if name == 'embed' else axes)
                                     for name, axes in config.sharding.axis_rules)
  with pytest.raises(ValueError, match=r'fsdp: 100.0% of the parameters are not sharded .*text/token_embedding'):
    step_lib.make_setup(config, mesh)


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


RULES = tiny.get_config().sharding.axis_rules


def test_strategies_shard_what_they_should(b16):
  abstract_params = b16[0]
  mesh = sharding_lib.make_mesh(dict(data=2, fsdp=4))
  w1 = lambda tree: tree['visual']['blocks']['mlp']['w1']['kernel']  # noqa: E731  [12, 768, 2048]
  for strategy in ('dp', 'zero1'):
    params = _shardings(b16, mesh, strategy)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(params))
  params = _shardings(b16, mesh, 'fsdp')
  assert w1(params).spec == P(None, 'fsdp', None)
  moments = sharding_lib.optimizer_state_shardings(params, abstract_params, mesh, 'fsdp')
  assert w1(moments).spec == P(None, 'fsdp', 'data')  # the rest of the data-parallel devices split it further
  zero1 = _shardings(b16, mesh, 'zero1')
  moments = sharding_lib.optimizer_state_shardings(zero1, abstract_params, mesh, 'zero1')
  assert w1(moments).spec == P(None, None, ('data', 'fsdp'))  # the largest dimension the 8 devices divide
  dp_moments = sharding_lib.optimizer_state_shardings(zero1, abstract_params, mesh, 'dp')
  assert all(s.is_fully_replicated for s in jax.tree.leaves(dp_moments))
  with pytest.raises(ValueError, match='unknown sharding strategy'):
    _shardings(b16, mesh, 'zero3')


def test_tensor_axis_shards_the_mlp_and_heads_dimensions(b16):
  mesh = sharding_lib.make_mesh(dict(data=4, tensor=2))
  params = _shardings(b16, mesh, 'zero1')
  assert params['visual']['blocks']['mlp']['w1']['kernel'].spec == P(None, None, 'tensor')
  assert params['visual']['blocks']['mlp']['w3']['kernel'].spec == P(None, 'tensor', None)
  assert params['visual']['blocks']['attn']['q_proj']['kernel'].spec == P(None, None, 'tensor')
  assert params['text']['blocks']['attn']['out_proj']['kernel'].spec == P(None, 'tensor', None)
  assert params['text']['token_embedding']['embedding'].spec == P('tensor', None)


def test_indivisible_dimensions_stay_whole(b16):
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=8))
  rules = (('embed', 'fsdp'), ('vocab', 'fsdp'), ('mlp', None), ('heads', None), ('layers', None), ('norm', None))
  params = _shardings(b16, mesh, 'fsdp', rules)
  # 49408 = 8 x 6176 shards; B-16's text width 512 too; a 7-way split of either would not divide.
  assert params['text']['token_embedding']['embedding'].spec == P('fsdp', None)
  mesh7 = sharding_lib.make_mesh(dict(fsdp=7), devices=jax.devices()[:7])
  params = _shardings(b16, mesh7, 'fsdp')
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


def test_the_start_up_parameter_table():
  """One row per parameter: shape, logical axes -> mesh axes, layer, LR scale, weight decay."""
  config = tiny.get_config()
  config.sharding.strategy = 'fsdp'
  config.layer_decay.visual = 0.5
  config.mesh.update(dict(data=1, fsdp=8))
  setup = step_lib.make_setup(config, sharding_lib.make_mesh(config.mesh))
  table = setup.parameter_table().splitlines()
  assert table[0].split() == ['parameter', 'shape', 'logical', 'axes', 'mesh', 'axes', 'tower', 'layer', 'lr',
                              'scale', 'wd']
  rows = {line.split()[0]: line for line in table[1:]}
  assert set(rows) == set(setup.logical_axes)
  w1 = ' '.join(rows['visual/blocks/mlp/w1/kernel'].split())
  assert '(2, 64, 170) layers, embed, mlp None, fsdp, None visual 1, 2 0.25, 0.5 0.05' in w1
  assert ' '.join(rows['logit_scale'].split()).endswith('- base - 1 0')

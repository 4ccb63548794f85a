"""A config's `init` block (EVA MIM vision tower, CLIP text tower) becomes the train state's starting point."""

import numpy as np
import torch

from configs import tiny
from eva_clip_jax.training import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from eva_clip_jax.training.loop import initial_params
from test_conversion import _mim_state


def test_mim_init_lands_in_the_sharded_state(tmp_path):
  state_dict = _mim_state(patch=8, image_size=64)
  torch.save(state_dict, tmp_path / 'mim.pt')
  config = tiny.get_config()
  config.init.visual = str(tmp_path / 'mim.pt')
  params = initial_params(config)
  mesh = sharding_lib.make_mesh(dict(data=8))
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, params)
  q = np.asarray(state.params['visual']['blocks']['attn']['q_proj']['kernel'])
  for layer in range(2):  # torch Linear weights are [out, in]; ours [in, out], stacked over layers
    key = next(k for k in state_dict if k.endswith(f'blocks.{layer}.attn.q_proj.weight'))
    np.testing.assert_array_equal(q[layer], state_dict[key].numpy().T)
  # No init block: the seed's random weights. The text tower matches them (to the last bit XLA's fused sampling may
  # round differently from eager initialisation).
  fresh = step_lib.init_state(setup)
  np.testing.assert_allclose(np.asarray(state.params['text']['positional_embedding']),
                             np.asarray(fresh.params['text']['positional_embedding']), rtol=1e-6)
  assert not np.array_equal(q, np.asarray(fresh.params['visual']['blocks']['attn']['q_proj']['kernel']))
  assert int(state.opt_state.count) == 0 and int(state.step) == 0

"""A config's `init` block (EVA MIM vision tower, CLIP text tower) becomes the train state's starting point."""

import jax
import numpy as np
import pytest
import torch

from configs import tiny
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from eva_clip_jax.training.loop import initial_params
from helpers import mim_state


def test_mim_init_lands_in_the_sharded_state(tmp_path):
  state_dict = mim_state(patch=8, image_size=64)
  torch.save(state_dict, tmp_path / 'mim.pt')
  config = tiny.get_config()
  config.init.visual = str(tmp_path / 'mim.pt')
  mesh = sharding_lib.make_mesh(dict(data=8))
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup, initial_params(config, setup))
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


def test_tower_init_is_read_into_fsdp_shardings_as_the_host_init_loads_it(tmp_path):
  """The per-tower init (the 8B/18B recipe: MIM vision tower + CLIP text tower) is read shard by shard into the
  training shardings, never built on the host: the loaded parameters equal `init_towers` into a host model, the
  fresh ones the seed's random weights made in their shardings."""
  from eva_clip_jax.conversion import api
  from eva_clip_jax.models import create_model
  from eva_clip_jax.models.paths import flatten

  torch.save(mim_state(patch=8, image_size=64), tmp_path / 'mim.pt')
  config = tiny.get_config()
  config.init.visual = str(tmp_path / 'mim.pt')
  config.sharding.strategy = 'fsdp'
  setup = step_lib.make_setup(config, sharding_lib.make_mesh(dict(fsdp=8)))
  params = initial_params(config, setup)
  shardings = jax.tree.leaves(setup.shardings.params)
  assert [x.sharding for x in jax.tree.leaves(params)] == shardings
  assert any(not s.is_fully_replicated for s in shardings)

  host = create_model(config.model.name, seed=config.seed, **step_lib.model_kwargs(config))
  report = api.init_from_config(host, config.init)
  assert 'visual/blocks/mlp/w1/kernel' in report['loaded'] and 'visual/head/kernel' in report['fresh']
  got, want = flatten(params), flatten(api.model_params(host))
  fresh = flatten(step_lib.random_params(setup))
  assert sorted(got) == sorted(want)
  for path in report['loaded']:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
  for path in report['fresh']:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(fresh[path]), err_msg=path)


def test_fine_tuning_starts_from_a_whole_open_clip_layout_model(tmp_path):
  """config.init.full: an open_clip-layout file (random open_clip weights, written as open_clip saves them) becomes
  the whole starting state, heads and logit scale included: its embeddings before the first step are the file's."""
  from eva_clip_jax.conversion.torch_reference import open_clip_model, torch_features
  from eva_clip_jax.models import get_model_spec
  from test_conversion import TOLERANCE, attention_inputs

  spec = get_model_spec('tiny')
  reference = open_clip_model(spec, seed=11)
  with torch.no_grad():
    reference.logit_scale.fill_(np.log(42.0))  # not the fresh value ln(1 / 0.07): it must come from the file
  images, text = attention_inputs(spec)
  want_image, want_text, want_logits = torch_features(reference, images, text)
  torch.save(reference.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
  config = tiny.get_config()
  config.init.full = str(tmp_path / 'open_clip_pytorch_model.bin')  # the per-tower init.visual/text are not used
  config.init.visual = 'not/used.pt'
  config.sharding.strategy = 'fsdp'
  setup = step_lib.make_setup(config, sharding_lib.make_mesh(dict(fsdp=8)))
  params = initial_params(config, setup)  # read straight into the training shardings, shard by shard
  shardings = jax.tree.leaves(setup.shardings.params)
  assert [x.sharding for x in jax.tree.leaves(params)] == shardings
  assert any(not s.is_fully_replicated for s in shardings)
  state = step_lib.init_state(setup, params)
  model = setup.model(state.params)
  np.testing.assert_allclose(np.asarray(model.encode_image(images)), want_image, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.asarray(model.encode_text(text)), want_text, atol=TOLERANCE, rtol=0)
  logits, _ = model.get_logits(images, text)  # the logit scale came from the file too
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=42 * TOLERANCE, rtol=0)
  np.testing.assert_allclose(float(np.exp(state.params['logit_scale'])), 42.0, rtol=1e-6)


def test_missing_fine_tuning_file_fails_clearly():
  config = tiny.get_config()
  config.init.full = '/no/such/EVA02_CLIP_B_psz16_s8B.pt'
  setup = step_lib.make_setup(config, sharding_lib.make_mesh(dict(data=8)))
  with pytest.raises(FileNotFoundError, match='config.init.full'):
    initial_params(config, setup)


def test_readme_fine_tuning_command_parses():
  """The README's fine-tuning command is a valid set of overrides of configs/b16.py."""
  import pathlib
  import re
  import shlex

  from test_configs import load_config
  root = pathlib.Path(__file__).resolve().parents[1]
  block = re.search(r'```bash\n\s*(python -m eva_clip_jax.train --config=configs/b16.py --workdir=/ckpt/b16_ft.*?)```',
                    (root / 'README.md').read_text(), re.S).group(1)
  args = [a for a in shlex.split(block.replace('\\\n', ' ')) if a.startswith('--config')]
  args = [a.replace('configs/b16.py', str(root / 'configs' / 'b16.py')) for a in args]
  config = load_config(args)
  assert config.init.full == 'EVA02_CLIP_B_psz16_s8B.pt'
  assert config.data.sources == (('my_shards/{00000..00099}.tar', 1.0),)
  assert config.total_steps == 2000 and config.lr.visual == 2e-5

"""The evaluation commands' model: released weights read straight into the training shardings (8B and 18B do not
fit one device), scoring as the unsharded model does."""

import jax
import numpy as np

import eva_clip_jax as ec
from configs import tiny
from eva_clip_jax.conversion import api
from eva_clip_jax.training.eval_model import build_eval_model


def test_pretrained_weights_are_read_into_fsdp_tensor_shardings_and_score_as_one_device(tmp_path):
  model = ec.create_model('tiny', seed=5)
  path = str(tmp_path / 'EVA_CLIP_tiny.safetensors')
  api.export_file(model, path, 'tiny', 'eva')
  config = tiny.get_config()
  config.pretrained = path
  config.sharding.strategy = 'fsdp'
  config.mesh = dict(data=1, fsdp=4, tensor=2)
  evaluated = build_eval_model(config)
  leaves = jax.tree.leaves(evaluated.params)
  assert {d for x in leaves for d in x.sharding.device_set} == set(jax.devices())
  split = sum(x.size for x in leaves if not x.sharding.is_fully_replicated)
  assert split > 0.9 * sum(x.size for x in leaves)  # the weights are split over the devices, not copied (norms are)
  images = np.random.default_rng(0).uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32)
  tokens = ec.get_tokenizer(context_length=32)(['a photo of a cat', 'a dog', 'two birds'])
  bound = evaluated.extractor(8)
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)  # the extractor normalises
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(bound.images(images), unit(model.encode_image(images)), atol=1e-5)
    np.testing.assert_allclose(bound.texts(np.asarray(tokens)), unit(model.encode_text(tokens)), atol=1e-5)

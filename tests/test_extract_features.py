"""`python -m eva_clip_jax.extract_features`: the demo set's embeddings and keys, computed on 8 devices, equal
encode_image / encode_text of the same model."""

import jax.numpy as jnp
import numpy as np

from configs import tiny
from eva_clip_jax.data.demo import write_demo_set
from eva_clip_jax.evaluation import datasets
from eva_clip_jax.extract_features import extract_features, output_paths
from eva_clip_jax.models import create_model
from eva_clip_jax.training import step as step_lib


def test_demo_set_features_equal_the_models_encoders(tmp_path):
  parts = write_demo_set(str(tmp_path / 'demo'), num_train=1, num_val=20, samples_per_shard=8)
  config = tiny.get_config()  # mesh data=-1: all 8 fake devices; random weights of the config's seed
  paths = extract_features(config, parts['val'], str(tmp_path / 'out'), batch_size=8)  # 20 = 8 + 8 + 4 (padded)
  assert paths == output_paths(str(tmp_path / 'out'))
  image_features, text_features = np.load(paths['image_features']), np.load(paths['text_features'])
  keys = open(paths['keys'], encoding='utf-8').read().split()
  assert keys == [f'{i:06d}' for i in range(20)]
  model = create_model(config.model.name, seed=config.seed, **step_lib.model_kwargs(config))
  batch = next(iter(datasets.shard_batches(parts['val'], 64, 20, 32, shard_by_process=False)))
  np.testing.assert_allclose(image_features, np.asarray(model.encode_image(jnp.asarray(batch['image']),
                                                                           normalize=True)), atol=1e-5)
  np.testing.assert_allclose(text_features, np.asarray(model.encode_text(jnp.asarray(batch['text']),
                                                                         normalize=True)), atol=1e-5)
  assert image_features.shape == text_features.shape == (20, model.spec.embed_dim)

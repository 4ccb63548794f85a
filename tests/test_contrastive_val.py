"""Validation loss and mean / median rank on held-out shards, as the reference's evaluate computes them."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from eva_clip_jax.data.demo import write_demo_set
from eva_clip_jax.evaluation import build_evaluators, contrastive_val, datasets
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib
from eva_clip_jax.training.loss import clip_loss


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_metrics_equal_the_references_argsort_and_the_training_loss():
  rng = np.random.default_rng(0)
  image = _unit(rng.normal(size=(50, 8)))
  text = _unit(image + rng.normal(size=(50, 8)))  # noisy pairs: ranks spread over 1 .. 50
  got = contrastive_val.clip_metrics(image, text)
  logits = image @ text.T
  for name, scores in (('image_to_text', logits), ('text_to_image', logits.T)):
    # The reference: rank of the true pair in each row's descending argsort.
    preds = np.nonzero(np.argsort(-scores, axis=1) == np.arange(50)[:, None])[1]
    assert got[f'{name}_mean_rank'] == preds.mean() + 1
    assert got[f'{name}_median_rank'] == np.floor(np.median(preds)) + 1
    for k in (1, 5, 10):
      assert got[f'{name}_R@{k}'] == np.mean(preds < k)
  assert 1 < got['image_to_text_mean_rank'] < 25
  # val_loss: batches of 16, 16, 16, 2, each the training loss, weighted by size.
  want = sum(float(clip_loss(jnp.asarray(image[i:i + 16]), jnp.asarray(text[i:i + 16]), 20.0)) * len(image[i:i + 16])
             for i in range(0, 50, 16)) / 50
  np.testing.assert_allclose(contrastive_val.validation_loss(image, text, 20.0, 16), want, rtol=1e-5)


def test_contrastive_val_evaluator_on_the_training_mesh(tmp_path):
  parts = write_demo_set(str(tmp_path / 'demo'), num_train=1, num_val=24, samples_per_shard=8)
  config = tiny.get_config()
  mesh = sharding_lib.make_mesh(dict(data=8))
  setup = step_lib.make_setup(config, mesh)
  state = step_lib.init_state(setup)
  (evaluator,) = build_evaluators({'val': dict(kind='contrastive_val', data=parts['val'], batch_size=8)},
                                  model_fn=setup.model, mesh=mesh, param_shardings=setup.shardings.params)
  result = evaluator.run(state.params)
  # The same numbers from the model's own encoders on the same 24 pairs.
  model = setup.model(jax.device_get(state.params))
  batch = next(iter(datasets.shard_batches(parts['val'], 64, 24, 32, shard_by_process=False)))
  image = np.asarray(model.encode_image(jnp.asarray(batch['image']), normalize=True))
  text = np.asarray(model.encode_text(jnp.asarray(batch['text']), normalize=True))
  scale = float(np.exp(jax.device_get(state.params['logit_scale'])))
  want = contrastive_val.clip_metrics(image, text)
  assert result['val/num_samples'] == 24
  for key, value in want.items():
    np.testing.assert_allclose(result[f'val/{key}'], value, rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(result['val/val_loss'], contrastive_val.validation_loss(image, text, scale, 8),
                             rtol=1e-4)


def test_training_reports_the_validation_numbers(tmp_path):
  from eva_clip_jax.training.loop import train_and_evaluate
  parts = write_demo_set(str(tmp_path / 'demo'), num_train=32, num_val=16, samples_per_shard=16)
  config = tiny.get_config()
  config.data.sources = ((parts['train'], 1.0),)
  config.data.update(dict(num_workers=0, shuffle_buffer=8))
  config.batch_size, config.total_steps, config.log_every_steps = 8, 2, 1
  config.evals = {'val': dict(kind='contrastive_val', data=parts['val'], batch_size=8, every_steps=1)}
  _, metrics = train_and_evaluate(config, str(tmp_path / 'work'))
  assert metrics['val/num_samples'] == 16 and np.isfinite(metrics['val/val_loss'])
  assert 1 <= metrics['val/text_to_image_median_rank'] <= 16

"""The tiny model on the bundled demo data: the recipe's shape at a size two CPU cores train in minutes."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='tiny',
      visual_lr=1e-3, text_lr=1e-3, base_lr=1e-3,
      visual_layer_decay=1.0, text_layer_decay=1.0,
      data='demo',
      batch_size=64,
      epochs=1, virtual_epoch=64 * 500, loader_workers=1,  # 500 steps
      warmup_steps=50,
      patch_dropout=0.5,
  )
  config.model.dtype = 'float32'  # CPUs have no fast 16-bit matmuls
  # The demo set, as `python -m eva_clip_jax.data.demo --dst=demo_data` writes it.
  config.data.sources = (('demo_data/train', 1.0),)
  config.data.update(dict(shuffle_buffer=512, cycle_length=4, num_workers=2, resampled=False))
  config.evals = dict(
      demo_zero_shot=dict(kind='zero_shot', dataset='shards', data='demo_data/val',
                          classnames='demo_data/classnames.txt', templates='demo_data/templates.txt', batch_size=128,
                          every_steps=100),
      demo_retrieval=dict(kind='retrieval', dataset='captions_csv', data='demo_data/val.csv', batch_size=128,
                          every_steps=100),
      demo_val=dict(kind='contrastive_val', data='demo_data/val', batch_size=64, every_steps=100),
  )
  return apply_variant(config, arg)

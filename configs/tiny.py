"""The tiny model on the bundled demo data: the recipe's shape at a size two CPU cores train in minutes."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='tiny',
      visual_lr=1e-3, text_lr=1e-3, base_lr=1e-3,
      visual_layer_decay=1.0, text_layer_decay=1.0,
      batch_size=64,
      samples_seen=64 * 500,
      warmup_steps=50,
      patch_dropout=0.5,
  )
  config.model.dtype = 'float32'  # CPUs have no fast 16-bit matmuls
  return apply_variant(config, arg)

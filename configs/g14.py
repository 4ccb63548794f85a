"""EVA01-CLIP-g/14: 11B samples at 224px, batch 41k on 256 A100-40GB (model card, wandb report).

The EVA repository publishes no training command for g/14. Learning rates and layer decay below follow
g/14+, which trains the same EVA-01 g image tower; drop path 0.4 is from the g/14 model config.
"""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA01-CLIP-g-14',
      visual_init='EVA01_g_psz14',
      text_init='openai/clip-vit-large-patch14',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.85, text_layer_decay=0.75,
      batch_size=40_960,  # "41k": 160 per GPU x 256
      samples_seen=11e9,
      drop_path_rate=0.4,
  )
  return apply_variant(config, arg)

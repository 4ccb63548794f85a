"""EVA02-CLIP-L/14: 4B samples at 224px, batch 131k (EVA-CLIP/README.md training command; model card s4B)."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-L-14',
      visual_init='EVA02_L_psz14',
      text_init='openai/clip-vit-large-patch14',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.85, text_layer_decay=0.75,
      batch_size=131_072,  # 1024 per GPU x 128
      samples_seen=4e9,
  )
  return apply_variant(config, arg)

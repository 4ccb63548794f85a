"""EVA02-CLIP-L/14 (Table 8): 4.19B samples at 224px, batch 131k (EVA-CLIP/README.md training command:
1024 per GPU x 128, 100 epochs of 40M samples = 32,000 steps; model card s4B)."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-L-14',
      visual_init='EVA02_L_psz14',
      text_init='openai/clip-vit-large-patch14',
      data='Merged-2B',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.85, text_layer_decay=0.75,
      batch_size=131_072,  # 1024 per GPU x 128
      epochs=100,
  )
  return apply_variant(config, arg)

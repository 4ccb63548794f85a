"""EVA02-CLIP-B/16 (Table 8): 8.39B samples at 224px, batch 131k (EVA-CLIP/README.md training command:
2048 per GPU x 64, 200 epochs of 40M samples over the two Merged-2B sources = 64,000 steps; model card s8B)."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-B-16',
      visual_init='EVA02_B_psz14to16',  # EVA-02 B MIM weights, patch kernel resized 14 -> 16
      text_init='openai/clip-vit-base-patch16',
      data='Merged-2B',
      visual_lr=2e-4, text_lr=2e-5,
      visual_layer_decay=0.75, text_layer_decay=0.75,
      batch_size=131_072,  # 2048 per GPU x 64
      epochs=200,
  )
  return apply_variant(config, arg)

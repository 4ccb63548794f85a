"""EVA02-CLIP-B/16: 8B samples at 224px, batch 131k (EVA-CLIP/README.md training command; model card s8B)."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-B-16',
      visual_init='EVA02_B_psz14to16',  # EVA-02 B MIM weights, patch kernel resized 14 -> 16
      text_init='openai/clip-vit-base-patch16',
      visual_lr=2e-4, text_lr=2e-5,
      visual_layer_decay=0.75, text_layer_decay=0.75,
      batch_size=131_072,  # 2048 per GPU x 64
      samples_seen=8e9,
  )
  return apply_variant(config, arg)

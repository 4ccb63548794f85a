"""EVA01-CLIP-g/14+: 11B samples at 224px, batch 115k, 50% patch dropout (EVA-CLIP/README.md; s11B)."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA01-CLIP-g-14-plus',
      visual_init='EVA01_g_psz14',
      text_init='laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.85, text_layer_decay=0.75,
      batch_size=114_688,  # 1024 per GPU x 112
      samples_seen=11e9,
      patch_dropout=0.5,
  )
  return apply_variant(config, arg)

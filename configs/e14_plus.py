"""EVA02-CLIP-E/14+ (bigE, bigG text tower): 9B samples at 224px, batch 144k, 50% patch dropout
(EVA-CLIP/README.md; model card s9B, trained in bf16)."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-bigE-14-plus',
      visual_init='EVA02_E_psz14',
      text_init='laion/CLIP-ViT-bigG-14-laion2B-39B-b160k',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.9, text_layer_decay=0.75,
      batch_size=144_000,  # 1000 per GPU x 144
      samples_seen=9e9,
      patch_dropout=0.5,
  )
  config.model.remat = 'full'
  return apply_variant(config, arg)

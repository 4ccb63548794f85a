"""EVA02-CLIP-E/14 (bigE): 4B samples at 224px, batch 115k, 50% patch dropout (EVA-CLIP/README.md; s4B)."""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-bigE-14',
      visual_init='EVA02_E_psz14',
      text_init='laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.9, text_layer_decay=0.75,
      batch_size=115_200,  # 800 per GPU x 144
      samples_seen=4e9,
      patch_dropout=0.5,
  )
  config.model.remat = 'full'  # the reference ran with gradient checkpointing
  return apply_variant(config, arg)

"""EVA02-CLIP-E/14 (bigE, Table 10): LAION-2B, 4.06B samples at 224px, batch 115k, 50% patch dropout
(EVA-CLIP/README.md: 800 per GPU x 144, 100 epochs of 40M samples = 35,200 steps; s4B).

Table 10 says DeepSpeed fp16; we compute in bfloat16 (recipe.DEVIATIONS): --config.model.dtype=float16 for fp16.
"""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-bigE-14',
      visual_init='EVA02_E_psz14',
      text_init='laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
      data='LAION-2B',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.9, text_layer_decay=0.75,
      batch_size=115_200,  # 800 per GPU x 144
      epochs=100,
      patch_dropout=0.5,
  )
  config.model.remat = 'full'  # the reference ran with gradient checkpointing
  return apply_variant(config, arg)

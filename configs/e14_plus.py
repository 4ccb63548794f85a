"""EVA02-CLIP-E/14+ (bigE, bigG text tower, Table 10): LAION-2B, 8.99B samples at 224px, batch 144k, 50% patch
dropout, bf16 (EVA-CLIP/README.md; model card s9B).

The released command runs 100 epochs of 40M samples (280 batches of 144,000 each: 4.03B samples), which
contradicts Table 10's 9B and the checkpoint's name (s9B); we follow the table: 223 epochs = 62,440 steps.
"""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-bigE-14-plus',
      visual_init='EVA02_E_psz14',
      text_init='laion/CLIP-ViT-bigG-14-laion2B-39B-b160k',
      data='LAION-2B',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.9, text_layer_decay=0.75,
      batch_size=144_000,  # 1000 per GPU x 144
      epochs=223,
      patch_dropout=0.5,
  )
  config.model.remat = 'full'
  return apply_variant(config, arg)

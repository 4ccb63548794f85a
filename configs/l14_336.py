"""EVA02-CLIP-L/14-336 (Table 8's L/14+): 2.02B further samples at 336px from the L/14 CLIP, batch 61k
(EVA-CLIP/README.md: 480 per GPU x 128, 50 epochs of 40M samples = 32,800 steps).

Both towers start from EVA02-CLIP-L/14 (s4B) with its position embedding interpolated 16x16 -> 24x24; the
RoPE tables are recomputed for the 24x24 grid. Total seen: 6B.
"""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA02-CLIP-L-14-336',
      visual_init='EVA02_CLIP_L_psz14_224to336', text_init='EVA02_CLIP_L_psz14_224to336',
      data='Merged-2B',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.75, text_layer_decay=0.65,
      batch_size=61_440,  # 480 per GPU x 128
      epochs=50,
  )
  config.init.skip = ()  # a CLIP checkpoint: heads and logit scale carry over
  return apply_variant(config, arg)

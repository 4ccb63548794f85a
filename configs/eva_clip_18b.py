"""EVA-CLIP-18B (EVA-CLIP-18B/README.md): EVA_18B_psz14 (MIM from the E/14+ CLIP) and the E/14+ text tower,
Merged-2B+ (Merged-2B, 20M LAION-COCO and, at the end, 23M Merged-video samples), global batch 108K on 360
A100-40GB, 6B samples (the checkpoint's s6B).

Optimizer, clipping, precision, remat and sharding as configs/eva_clip_8b.py; the unpublished values there are
E/14+'s here too (learning rates, layer decay, weight decay, warmup, patch dropout). The data set is Merged-2B's
sources: LAION-COCO and the video frames are the user's to add to config.data.sources.
"""

from eva_clip_jax.recipe import apply_variant, xb_recipe


def get_config(arg=None):
  config = xb_recipe(
      model='EVA-CLIP-18B',
      visual_init='EVA_18B_psz14',
      text_init='EVA02_CLIP_E_psz14_plus_s9B',
      batch_size=108_000,  # "108K" on 360 GPUs: 300 each (the per-GPU batch is not published)
      samples_seen=6e9,
  )
  return apply_variant(config, arg)

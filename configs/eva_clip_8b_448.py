"""EVA-CLIP-8B-448 (EVA-CLIP-18B/README.md; the Hugging Face repository BAAI/EVA-CLIP-8B-448): both towers from
EVA-CLIP-8B (s9B), a further 0.6B samples (the checkpoint's s0.6B) at 448px, global batch 24K on 384 A100-40GB,
Merged-2B. The position embedding is interpolated 16x16 -> 32x32 at load.

Optimizer, clipping, precision, remat and sharding as configs/eva_clip_8b.py; the unpublished values there are
E/14+'s here too (learning rates, layer decay, weight decay, warmup, patch dropout).
"""

from eva_clip_jax.recipe import apply_variant, xb_recipe


def get_config(arg=None):
  config = xb_recipe(
      model='EVA-CLIP-8B-plus',
      visual_init='EVA_CLIP_8B_psz14_s9B', text_init='EVA_CLIP_8B_psz14_s9B',
      batch_size=24_192,  # "24K" on 384 GPUs: 63 each (the per-GPU batch is not published)
      samples_seen=0.6e9,
  )
  config.init.skip = ()  # a CLIP checkpoint: heads and logit scale carry over
  return apply_variant(config, arg)

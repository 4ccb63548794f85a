"""EVA-CLIP-8B (EVA-CLIP-18B/README.md): EVA_8B_psz14 (MIM from the E/14+ CLIP) and the E/14+ text tower, Merged-2B,
global batch 178K on 384 A100-40GB, 9B samples (the checkpoint's s9B).

The README and EVA-CLIP-18B/shinji/training/deepspeed_config.json publish the rest of what is set here: LAMB with
betas (0.9, 0.999), eps 1e-8, gradient clipping 5, fp16 with dynamic loss scaling (initial 2^16, window 1000,
hysteresis 2, minimum 1: config.loss_scale's defaults), ZeRO-1 and activation checkpointing. NOT published:
learning rates, layer decay, weight decay, warmup and patch dropout; those are E/14+'s (configs/e14_plus.py), marked
where they are set. Precision: bfloat16 as every config here (recipe.DEVIATIONS says why); the released fp16 is
`--config.model.dtype=float16`. ZeRO-1 keeps a replica of the 8B parameters on every device (32 GB in float32):
fsdp instead (launch/README.md's plans for these models).
"""

from eva_clip_jax.recipe import apply_variant, xb_recipe


def get_config(arg=None):
  config = xb_recipe(
      model='EVA-CLIP-8B',
      visual_init='EVA_8B_psz14',
      text_init='EVA02_CLIP_E_psz14_plus_s9B',  # its text tower; the head, projection and logit scale start fresh
      batch_size=178_176,  # "178K" on 384 GPUs: 464 each (the per-GPU batch is not published)
      samples_seen=9e9,
  )
  return apply_variant(config, arg)

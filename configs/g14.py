"""EVA01-CLIP-g/14 (Table 9): AdamW, LAION-400M, 11.0B samples at 224px, batch 41k on 256 A100-40GB (model card).

The EVA repository publishes no training command for g/14: the learning rates, layer decay and optimizer are
Table 9's, the loader settings (40M-sample virtual epochs, 8 workers) the other commands'; 273 epochs of 984
batches = 268,632 steps, 11.0B samples.

Drop path 0.0, as Table 9 states. The reference's model config (EVA01-CLIP-g-14.json) says 0.4, but that file
also builds the model for evaluation and fine-tuning, where the value does not act, while Table 9 is the one
published statement of how this model was trained (and every other row of Tables 8-10 says 0.0). For the model
config's value: --config.model.drop_path_rate=0.4.
"""

from eva_clip_jax.recipe import apply_variant, clip_recipe


def get_config(arg=None):
  config = clip_recipe(
      model='EVA01-CLIP-g-14',
      visual_init='EVA01_g_psz14',
      text_init='openai/clip-vit-large-patch14',
      data='LAION-400M',
      optimizer='adamw',
      visual_lr=4e-4, text_lr=4e-5,
      visual_layer_decay=0.85, text_layer_decay=0.75,
      batch_size=40_960,  # "41k": 160 per GPU x 256
      epochs=273,
      drop_path_rate=0.0,
  )
  return apply_variant(config, arg)

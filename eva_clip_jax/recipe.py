"""The EVA-CLIP training recipe as an ml_collections ConfigDict; `configs/*.py` fill in each model's row.

The values come from the paper and the EVA repository's released training commands (EVA-CLIP/README.md,
`training/params.py` defaults); each config file names its sources. Architecture is not restated here:
`config.model.name` points into the model registry.
"""

from __future__ import annotations

import ml_collections


def clip_recipe(*, model: str, visual_lr: float, text_lr: float, visual_layer_decay: float,
                text_layer_decay: float, batch_size: int, samples_seen: float, visual_init: str = '',
                text_init: str = '', drop_path_rate: float = 0.0, patch_dropout: float = 0.0,
                base_lr: float = 5e-4, warmup_steps: int = 2000,
                weight_decay: float = 0.05) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 4096  # the reference scripts' seed

  config.model = ml_collections.ConfigDict(dict(
      name=model,
      # The paper trained with DeepSpeed fp16 + dynamic loss scaling; bfloat16 compute with float32 master
      # weights is the JAX-native equivalent. 'float16' reproduces the reference exactly.
      dtype='bfloat16', param_dtype='float32',
      attention='auto', remat='none', scan_layers=True,
      mlp_pad_multiple=0,  # e.g. 128: vision MLP hidden size padded in-graph (L/14: 2730 -> 2816), same results
      drop_path_rate=drop_path_rate,
      patch_dropout=patch_dropout,  # FLIP-style random masking of patch tokens during training
  ))
  # skip: parameters the paper's initialisation starts fresh whatever the tower checkpoints hold.
  config.init = ml_collections.ConfigDict(dict(visual=visual_init, text=text_init,
                                               skip=('visual.head', 'text.text_projection', 'logit_scale')))
  # Training data: webdataset shard patterns and their sampling weights. The paper's Merged-2B is 1.6B
  # LAION-2B + 0.4B COYO-700M samples, hence 0.8 / 0.2. Set the patterns to your copies.
  config.data = ml_collections.ConfigDict(dict(
      sources=(('', 0.8), ('', 0.2)),  # e.g. ('/data/laion2b/{00000..231349}.tar', 0.8)
      shuffle_buffer=10_000, cycle_length=16, num_workers=-1,  # -1: every core but the trainer's
      synthetic=False,  # random images and tokens instead of the sources (benchmarks, tests)
  ))
  config.pretrained = ''  # weights for evaluation: a PyTorch file, a converted directory or hf-hub:...

  # Zero-shot evaluations (eva_clip_jax.evaluation); set `data` to run one, e.g.
  # --config.evals.imagenet.data=/data/imagenet/val. every_steps: also run during training.
  config.evals = ml_collections.ConfigDict(dict(
      imagenet=dict(kind='zero_shot', data='', format='folder', classnames='imagenet', templates='openai',
                    batch_size=256, every_steps=0),
      flickr30k=dict(kind='retrieval', data='', format='csv', batch_size=256, every_steps=0),
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      name='lamb',  # LAMB as DeepSpeed ran it: trust ratio clamped to [0.01, 10], bias correction on
      b1=0.9, b2=0.98, eps=1e-6,
      grad_clip_norm=5.0,
  ))
  # Per-tower peak learning rate, weight decay and layer-wise decay; everything outside the two towers
  # (logit_scale) uses the base rate.
  config.lr = ml_collections.ConfigDict(dict(base=base_lr, visual=visual_lr, text=text_lr))
  config.weight_decay = ml_collections.ConfigDict(dict(base=weight_decay, visual=weight_decay, text=weight_decay))
  config.layer_decay = ml_collections.ConfigDict(dict(visual=visual_layer_decay, text=text_layer_decay))
  config.schedule = ml_collections.ConfigDict(dict(warmup_steps=warmup_steps, decay='cosine', end_lr=0.0))

  # One mesh for every scale: ('data', 'fsdp', 'tensor'); -1 takes the remaining devices. The batch is sharded
  # over data x fsdp. strategy: dp | zero1 (the paper's ZeRO-1) | fsdp (parameters sharded over 'fsdp' by the
  # rules: set --config.mesh.fsdp=-1 --config.mesh.data=1). axis_rules map the logical axes the models declare on
  # their parameters (models/common.py) to mesh axes; under fsdp, more than max_replicated_fraction of the
  # parameters left whole on every device is an error.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict(dict(
      strategy='zero1',
      axis_rules=(('layers', None), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'), ('vocab', 'tensor'),
                  ('norm', None)),
      max_replicated_fraction=0.02,
  ))
  # float16 only: DeepSpeed's dynamic loss scaling as the reference ran it.
  config.loss_scale = ml_collections.ConfigDict(dict(initial_power=16, window=1000, hysteresis=2, min_scale=1.0))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, asynchronous=True))
  config.log_every_steps = 50
  config.prefetch = 2  # batches in flight to the devices
  config.peak_flops_per_device = 0.0  # for MFU where the device table has no entry (0: look it up)

  config.batch_size = batch_size  # global
  config.samples_seen = int(samples_seen)
  config.total_steps = int(samples_seen) // batch_size
  config.label_smoothing = 0.0
  return config


def apply_variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`--config=configs/b16.py:runlocal` shrinks a recipe to something a laptop CPU runs in minutes."""
  if not arg:
    return config
  if arg != 'runlocal':
    raise ValueError(f"unknown config argument {arg!r}; the only variant is 'runlocal'")
  config.model.dtype = 'float32'
  config.batch_size = 8
  config.total_steps = 10
  config.samples_seen = config.batch_size * config.total_steps
  config.schedule.warmup_steps = 2
  config.log_every_steps = 2
  config.checkpoint.every_steps = 5
  # A smoke run of the recipe's shapes: no checkpoints to download, no data to point at (override to use them).
  config.init.visual = config.init.text = ''
  config.data.synthetic = True
  config.evals = {}
  return config

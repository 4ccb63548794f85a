"""The EVA-CLIP training recipe as an ml_collections ConfigDict; `configs/*.py` fill in each model's row.

The values come from the paper's Tables 8-10 (`tests/data/paper_recipes.json` holds them as printed and
`tests/test_paper_recipes.py` compares every config with its row) and the EVA repository's released training
commands (EVA-CLIP/README.md, `training/params.py`); each config file names its sources. Where a config departs
from its table row on purpose, `DEVIATIONS` says so and why. Architecture is not restated here:
`config.model.name` points into the model registry.
"""

from __future__ import annotations

import math

import ml_collections

from eva_clip_jax.errors import InputError

# The paper's image-text data sets -> (source name, sampling weight) per source. The shard patterns are the user's
# copies (`--config.data.sources`). Merged-2B is 1.6B LAION-2B + 0.4B COYO-700M samples, hence 0.8 / 0.2.
DATASETS = {
    'Merged-2B': (('laion2b', 0.8), ('coyo700m', 0.2)),
    'LAION-2B': (('laion2b', 1.0),),
    'LAION-400M': (('laion400m', 1.0),),
    'demo': (('demo', 1.0),),
}

# The released commands' data-loader settings, which fix their step counts (`reference_steps`).
REFERENCE_VIRTUAL_EPOCH = 40_000_000  # --train-num-samples, with --dataset-resampled
REFERENCE_WORKERS = 8  # --workers

# Where a config departs from its row of Tables 8-10 on purpose: {(config, table field): (our value, why)}.
# Every fp16 row: the TPU/GPU-native bfloat16 with float32 master weights, no loss scaling to tune; DeepSpeed's
# fp16 with dynamic loss scaling, as the paper ran it, is `--config.model.dtype=float16`.
_BF16 = ('bfloat16', 'bfloat16 compute with float32 master weights is the JAX-native mixed precision (TPUs have no '
                     'fast float16; no loss scale to tune); --config.model.dtype=float16 runs DeepSpeed fp16 with '
                     "the reference's dynamic loss scaling")
DEVIATIONS = {(name, 'precision'): _BF16 for name in ('b16', 'l14', 'l14_336', 'g14', 'g14_plus', 'e14')}

# Optimizer hyper-parameters: the paper's (0.9, 0.98, 1e-6), or what the released commands actually ran. The
# reference's params.py picks 0.98 / 1e-6 only for model names containing 'vit'; 'EVA02-CLIP-B-16' and the other
# EVA-CLIP names do not, so its runs used the Adam defaults (0.9, 0.999, 1e-8). Variant ':reference_betas'.
PAPER_BETAS = dict(b1=0.9, b2=0.98, eps=1e-6)
REFERENCE_BETAS = dict(b1=0.9, b2=0.999, eps=1e-8)


def reference_steps(*, epochs: int, batch_size: int, num_sources: int,
                    virtual_epoch: int = REFERENCE_VIRTUAL_EPOCH, workers: int = REFERENCE_WORKERS) -> int:
  """The step count of the reference's loader: each of the `num_sources` sources gets `virtual_epoch //
  num_sources` samples per (virtual) epoch, rounded up to whole global batches and then to a multiple of the
  data-loader workers (open_clip's get_wds_dataset); the epoch is the sources' batches together.
  B/16: 40M / 2 = 20M -> 153 -> 160 batches per source, 320 per epoch, x 200 epochs = 64,000 steps (8.39B samples).
  """
  batches = math.ceil(math.ceil(virtual_epoch // num_sources / batch_size) / workers) * workers
  return epochs * num_sources * batches


def clip_recipe(*, model: str, visual_lr: float, text_lr: float, visual_layer_decay: float,
                text_layer_decay: float, batch_size: int, epochs: int | None = None,
                samples_seen: float | None = None, data: str = 'Merged-2B', optimizer: str = 'lamb',
                visual_init: str = '', text_init: str = '', drop_path_rate: float = 0.0, patch_dropout: float = 0.0,
                base_lr: float = 5e-4, warmup_steps: int = 2000, weight_decay: float = 0.05,
                virtual_epoch: int = REFERENCE_VIRTUAL_EPOCH,
                loader_workers: int = REFERENCE_WORKERS) -> ml_collections.ConfigDict:
  """One model's recipe. Steps follow the reference's derivation (`reference_steps`) from `epochs` of
  `virtual_epoch` samples over the sources of `data` (a `DATASETS` name); or, for tests and benchmarks,
  `samples_seen` // `batch_size`."""
  if (epochs is None) == (samples_seen is None):
    raise InputError('give the recipe either epochs (the reference derivation) or samples_seen')
  if data not in DATASETS:
    raise InputError(f'unknown data set {data!r}; the recipes know {sorted(DATASETS)}')
  config = ml_collections.ConfigDict()
  config.seed = 4096  # the reference scripts' seed

  config.model = ml_collections.ConfigDict(dict(
      name=model,
      # The paper trained with DeepSpeed fp16 (bf16 for E/14+); see DEVIATIONS. 'float16' runs it that way.
      dtype='bfloat16', param_dtype='float32',
      attention='auto', remat='none', scan_layers=True,
      drop_path_rate=drop_path_rate,
      patch_dropout=patch_dropout,  # FLIP-style random masking of patch tokens during training
  ))
  # skip: parameters the paper's initialisation starts fresh whatever the tower checkpoints hold.
  # full: a whole EVA-CLIP model (PyTorch file in either layout, or a converted directory) to fine-tune from,
  # heads and logit scale included, as the reference's --pretrained; it replaces visual/text/skip.
  config.init = ml_collections.ConfigDict(dict(visual=visual_init, text=text_init, full='',
                                               skip=('visual.head', 'text.text_projection', 'logit_scale')))
  # Locked towers (open_clip's --lock-image / --lock-text): a locked tower's parameters get no gradient, no
  # optimizer state and no update, except its last `*_unlocked_groups` layer groups (the layer-decay groups: the
  # final norm and head are the last group, the last block the one before it, ...). LiT: lock_towers.visual=True.
  # (Not `config.lock`: ConfigDict.lock is a method, and attribute access would find it.)
  config.lock_towers = ml_collections.ConfigDict(dict(visual=False, visual_unlocked_groups=0, text=False,
                                                      text_unlocked_groups=0))
  # Training data: webdataset shard patterns and their sampling weights, one per source of the paper's data set
  # (`DATASETS`). Set the patterns to your copies, e.g. (('/data/laion2b/{00000..231349}.tar', 0.8), ...).
  config.data = ml_collections.ConfigDict(dict(
      name=data,
      sources=tuple(('', weight) for _, weight in DATASETS[data]),
      shuffle_buffer=10_000, cycle_length=16, num_workers=-1,  # -1: every core but the trainer's
      # 'sample': sources mixed by weight within each batch; 'batch': each global batch from one source, taking
      # turns by weight, as the reference's MixingDataLoader (its Merged-2B runs alternated LAION-2B and COYO
      # batches 1:1: --config.data.mixing=batch with weights 0.5, 0.5).
      mixing='sample',
      resampled=True,  # shards drawn with replacement, as every released command ran (--dataset-resampled)
      synthetic=False,  # random images and tokens instead of the sources (benchmarks, tests)
  ))
  config.pretrained = ''  # weights for evaluation: a PyTorch file, a converted directory or hf-hub:...

  # Zero-shot evaluations (eva_clip_jax.evaluation); set `data` to run one, e.g.
  # --config.evals.imagenet.data=/data/imagenet/val. every_steps: also run during training.
  config.evals = ml_collections.ConfigDict(dict(
      imagenet=dict(kind='zero_shot', dataset='folder', data='', classnames='imagenet', templates='openai',
                    batch_size=256, every_steps=0),
      flickr30k=dict(kind='retrieval', dataset='captions_csv', data='', batch_size=256, every_steps=0),
      # Held-out training-like shards: the reference's validation loss and mean / median rank.
      val=dict(kind='contrastive_val', data='', batch_size=256, every_steps=0),
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      name=optimizer,  # 'lamb': LAMB as DeepSpeed ran it (trust ratio clamped to [0.01, 10]); 'adamw'
      **PAPER_BETAS,
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
  # max_failed_saves: saves failing in a row (full disk, a bucket refusing writes) before the run stops.
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, asynchronous=True,
                                                    max_failed_saves=3))
  config.log_every_steps = 50
  config.prefetch = 2  # batches in flight to the devices
  config.peak_flops_per_device = 0.0  # for MFU where the device table has no entry (0: look it up)

  config.batch_size = batch_size  # global: the contrastive batch
  # Contrastive gradient accumulation (GradCache, open_clip's --accum-freq): the global batch is run as this many
  # micro-batches per step, with the loss and gradients of the whole batch. For batches larger than the devices hold.
  config.accum_steps = 1
  config.epochs, config.virtual_epoch = epochs or 0, virtual_epoch
  if epochs:
    config.total_steps = reference_steps(epochs=epochs, batch_size=batch_size, num_sources=len(DATASETS[data]),
                                         virtual_epoch=virtual_epoch, workers=loader_workers)
  else:
    config.total_steps = int(samples_seen) // batch_size
  config.samples_seen = config.total_steps * batch_size
  config.label_smoothing = 0.0
  return config


def xb_recipe(**kwargs):
  """EVA-CLIP-8B, 8B-448 and 18B (configs/eva_clip_*.py): EVA-CLIP-18B/shinji/training/deepspeed_config.json's
  LAMB, clipping and activation checkpointing, on fsdp (its ZeRO-1 would replicate the parameters, 32-73 GB in
  float32, on every device); the values the EVA-CLIP-18B release does not publish are E/14+'s."""
  config = clip_recipe(
      data='Merged-2B',
      # E/14+'s values (configs/e14_plus.py), not published for these models:
      visual_lr=4e-4, text_lr=4e-5, visual_layer_decay=0.9, text_layer_decay=0.75, patch_dropout=0.5,
      **kwargs)
  config.optimizer.update(REFERENCE_BETAS)  # deepspeed_config.json's LAMB: (0.9, 0.999), eps 1e-8
  config.optimizer.grad_clip_norm = 5.0  # deepspeed_config.json's gradient_clipping
  config.model.remat = 'full'  # deepspeed_config.json's activation_checkpointing
  config.sharding.strategy = 'fsdp'
  # The fsdp size must divide the text width, 1280 = 5 x 256, or the text tower stays whole and the fsdp check
  # refuses: up to 256 devices (a power of two) all on fsdp; 512 as data=2, fsdp=256; 384 as data=3, fsdp=128.
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config


def _reference_betas(config: ml_collections.ConfigDict) -> None:
  config.optimizer.update(REFERENCE_BETAS)


def _reference_loader(config: ml_collections.ConfigDict) -> None:
  """The sources as the released commands mixed them: whole batches taking turns, each source an equal share
  (their --train-data-list gave no per-source sizes, so the MixingDataLoader went round-robin)."""
  config.data.mixing = 'batch'
  sources = config.data.sources
  config.data.sources = tuple((pattern, 1.0 / len(sources)) for pattern, _ in sources)


def _runlocal(config: ml_collections.ConfigDict) -> None:
  config.model.dtype = 'float32'
  config.batch_size = 8
  config.total_steps = 10
  config.samples_seen = config.batch_size * config.total_steps
  config.schedule.warmup_steps = 2
  config.log_every_steps = 2
  config.checkpoint.every_steps = 5
  # A smoke run of the recipe's shapes: no checkpoints to download, no data to point at (override to use them).
  config.init.visual = config.init.text = config.init.full = ''
  config.data.synthetic = True
  config.evals = {}


# runlocal: a recipe shrunk to something a laptop CPU runs in minutes; reference_betas: the optimizer
# hyper-parameters the released commands ran instead of the paper's; reference_loader: their source mixing.
VARIANTS = {'runlocal': _runlocal, 'reference_betas': _reference_betas, 'reference_loader': _reference_loader}


def apply_variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`--config=configs/b16.py:runlocal,reference_betas`: comma-separated `VARIANTS`, applied in order."""
  for name in (arg or '').split(','):
    if not name:
      continue
    if name not in VARIANTS:
      raise InputError(f'unknown config argument {name!r}; the variants are {sorted(VARIANTS)}')
    VARIANTS[name](config)
  return config

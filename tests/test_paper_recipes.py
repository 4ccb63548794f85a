"""Every config's recipe equals its row of the paper's Tables 8-10 (transcribed as data in
data/paper_recipes.json), except where `recipe.DEVIATIONS` says otherwise and why; the step counts follow the
reference's derivation."""

import inspect
import json
import pathlib

import pytest

from eva_clip_jax import recipe
from eva_clip_jax.data import pipeline
from eva_clip_jax.models import get_model_spec
from helpers import CONFIG_DIR, load_config

TABLES = json.loads((pathlib.Path(__file__).parent / 'data' / 'paper_recipes.json').read_text())['rows']

# The tables name checkpoints and data by their models; the configs by the files the EVA repository publishes.
CHECKPOINTS = {
    'EVA-02-B': 'EVA02_B_psz14to16', 'EVA-02-L': 'EVA02_L_psz14', 'EVA-02-E': 'EVA02_E_psz14',
    'EVA-01-g': 'EVA01_g_psz14', 'EVA-02-CLIP-L': 'EVA02_CLIP_L_psz14_224to336',
    'OpenAI CLIP-B': 'openai/clip-vit-base-patch16', 'OpenAI CLIP-L': 'openai/clip-vit-large-patch14',
    'Openai CLIP-L': 'openai/clip-vit-large-patch14', 'Open CLIP-H': 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
    'Open CLIP-G': 'laion/CLIP-ViT-bigG-14-laion2B-39B-b160k',
}
OPTIMIZERS = {'LAMB': 'lamb', 'AadamW': 'adamw'}
PRECISION = {'DeepSpeed fp16': 'float16', 'DeepSpeed bf16': 'bfloat16'}


def _count(text: str) -> float:
  return float(text[:-1]) * {'k': 1e3, 'K': 1e3, 'B': 1e9}[text[-1]]


def _ours(config) -> dict:
  """The config's values of the table's fields, in the table's terms."""
  spec = get_model_spec(config.model.name)
  return {
      'image_init': config.init.visual, 'text_init': config.init.text, 'data': config.data.name,
      'image_lr': config.lr.visual, 'image_layer_decay': config.layer_decay.visual, 'text_lr': config.lr.text,
      'text_layer_decay': config.layer_decay.text,
      'schedule': {'cosine': 'cosine decay'}.get(config.schedule.decay, config.schedule.decay),
      'optimizer': config.optimizer.name,
      'betas_eps': [config.optimizer.b1, config.optimizer.b2, config.optimizer.eps],
      'weight_decay': (config.weight_decay.visual, config.weight_decay.text),
      'resolution': spec.vision.image_size, 'patch_size': spec.vision.patch_size,
      'batch_size': config.batch_size, 'samples_seen': config.samples_seen, 'drop_path': config.model.drop_path_rate,
      'random_resized_crop': list(inspect.signature(pipeline.DecodeSample).parameters['scale'].default),
      'precision': config.model.dtype,
      'zero_stage': {'zero1': 1, 'fsdp': 3, 'dp': 0}[config.sharding.strategy],
  }


def _expected(row: dict) -> dict:
  """The table's row in the configs' terms."""
  return {**row, 'image_init': CHECKPOINTS[row['image_init']], 'text_init': CHECKPOINTS[row['text_init']],
          'optimizer': OPTIMIZERS[row['optimizer']], 'weight_decay': (row['weight_decay'],) * 2,
          'precision': PRECISION[row['precision']]}


@pytest.mark.parametrize('name', sorted(TABLES))
def test_config_equals_its_table_row(name):
  config = load_config([f'--config={CONFIG_DIR / name}.py'])
  ours, want = _ours(config), _expected(TABLES[name])
  for field in ours:
    if (name, field) in recipe.DEVIATIONS:
      value, why = recipe.DEVIATIONS[name, field]
      assert ours[field] == value and ours[field] != want[field] and why, (name, field)
    elif field == 'batch_size':  # the table rounds: "131k" is 131,072 = 2048 x 64, "41k" 40,960 = 160 x 256
      assert abs(ours[field] - _count(want[field])) < 0.01 * _count(want[field]), (name, field)
    elif field == 'samples_seen':  # "8B" is 64,000 steps of 131,072: 8.39B (the reference's whole batches)
      assert abs(ours[field] - _count(want[field])) < 0.05 * _count(want[field]), (name, field, ours[field])
    else:
      assert ours[field] == want[field], (name, field, ours[field], want[field])
  assert all(config_name in TABLES for config_name, _ in recipe.DEVIATIONS)  # no stale exceptions


# EVA-CLIP-8B, 8B-448 and 18B are not in the EVA-CLIP paper's tables: EVA-CLIP-18B/README.md's model cards and
# EVA-CLIP-18B/shinji/training/deepspeed_config.json publish their recipe (init, data, batch, samples, GPUs; LAMB,
# clipping, ZeRO-1, activation checkpointing). (batch size, samples seen, image init, text init, data, GPUs).
RELEASED_XB = {
    'eva_clip_8b': ('178K', '9B', 'EVA_8B_psz14', 'EVA02_CLIP_E_psz14_plus_s9B', 'Merged-2B', 384),
    'eva_clip_8b_448': ('24K', '0.6B', 'EVA_CLIP_8B_psz14_s9B', 'EVA_CLIP_8B_psz14_s9B', 'Merged-2B', 384),
    # Merged-2B+ adds LAION-COCO and video frames to Merged-2B's sources: the user's shards (the config says so).
    'eva_clip_18b': ('108K', '6B', 'EVA_18B_psz14', 'EVA02_CLIP_E_psz14_plus_s9B', 'Merged-2B', 360),
}


def test_every_paper_config_has_a_row():
  assert {p.stem for p in CONFIG_DIR.glob('*.py')} - set(TABLES) == {'tiny', *RELEASED_XB}


@pytest.mark.parametrize('name', sorted(RELEASED_XB))
def test_8b_and_18b_configs_follow_the_release(name):
  config = load_config([f'--config={CONFIG_DIR / name}.py'])
  batch, samples, image_init, text_init, data, gpus = RELEASED_XB[name]
  assert abs(config.batch_size - _count(batch)) < 0.01 * _count(batch) and config.batch_size % gpus == 0
  assert abs(config.samples_seen - _count(samples)) < 0.01 * _count(samples)
  assert (config.init.visual, config.init.text, config.data.name) == (image_init, text_init, data)
  assert (config.optimizer.name, config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (
      'lamb', 0.9, 0.999, 1e-8)
  assert config.optimizer.grad_clip_norm == 5.0 and config.model.remat == 'full'
  assert (config.loss_scale.initial_power, config.loss_scale.window, config.loss_scale.hysteresis,
          config.loss_scale.min_scale) == (16, 1000, 2, 1.0)  # deepspeed_config.json's fp16 loss scaler
  # ZeRO-1 would replicate the 8B/18B parameters on every device: fsdp over all of them instead.
  assert config.sharding.strategy == 'fsdp' and config.mesh.fsdp == -1 and config.mesh.data == 1


def test_steps_follow_the_reference_derivation():
  """B/16's released command: 2048 x 64 per step, 200 epochs of --train-num-samples 40M split over two sources,
  each rounded up to whole batches and to a multiple of 8 workers: 64,000 steps, 8.39B samples."""
  b16 = load_config([f'--config={CONFIG_DIR}/b16.py'])
  assert (b16.total_steps, b16.samples_seen) == (64_000, 8_388_608_000)
  assert recipe.reference_steps(epochs=100, batch_size=115_200, num_sources=1) == 35_200  # E/14's command
  assert recipe.reference_steps(epochs=1, batch_size=10, num_sources=2, virtual_epoch=100, workers=4) == 2 * 8


def test_reference_betas_are_one_flag_away():
  paper = load_config([f'--config={CONFIG_DIR}/l14.py'])
  released = load_config([f'--config={CONFIG_DIR}/l14.py:reference_betas'])
  assert (paper.optimizer.b1, paper.optimizer.b2, paper.optimizer.eps) == (0.9, 0.98, 1e-6)
  assert (released.optimizer.b1, released.optimizer.b2, released.optimizer.eps) == (0.9, 0.999, 1e-8)
  both = load_config([f'--config={CONFIG_DIR}/l14.py:runlocal,reference_betas'])
  assert both.optimizer.b2 == 0.999 and both.total_steps == 10


def test_reference_loader_variant_alternates_whole_batches():
  paper = load_config([f'--config={CONFIG_DIR}/b16.py'])
  released = load_config([f'--config={CONFIG_DIR}/b16.py:reference_loader'])
  assert (paper.data.mixing, [w for _, w in paper.data.sources]) == ('sample', [0.8, 0.2])
  assert (released.data.mixing, [w for _, w in released.data.sources]) == ('batch', [0.5, 0.5])
  assert paper.data.resampled and released.data.resampled  # --dataset-resampled in every released command

"""Every config loads, names a registered model, carries the paper's recipe, and takes command-line overrides."""

import pytest

import eva_clip_jax as ec
from helpers import CONFIG_DIR, load_config

EXPECTED = {
    'b16': 'EVA02-CLIP-B-16', 'l14': 'EVA02-CLIP-L-14', 'l14_336': 'EVA02-CLIP-L-14-336',
    'g14': 'EVA01-CLIP-g-14', 'g14_plus': 'EVA01-CLIP-g-14-plus', 'e14': 'EVA02-CLIP-bigE-14',
    'e14_plus': 'EVA02-CLIP-bigE-14-plus', 'tiny': 'tiny', 'eva_clip_8b': 'EVA-CLIP-8B',
    'eva_clip_8b_448': 'EVA-CLIP-8B-plus', 'eva_clip_18b': 'EVA-CLIP-18B',
}


def test_one_config_per_model():
  assert {p.stem for p in CONFIG_DIR.glob('*.py')} == set(EXPECTED)


@pytest.mark.parametrize('stem', sorted(EXPECTED))
def test_config_names_its_model_and_recipe(stem):
  config = load_config([f'--config={CONFIG_DIR / stem}.py'])
  assert config.model.name == EXPECTED[stem]
  model = ec.create_model(abstract=True, **config.model.to_dict())  # every model field is a create_model knob
  assert model.spec.name == EXPECTED[stem]
  assert config.optimizer.name in ('lamb', 'adamw')  # the rows: test_paper_recipes.py
  assert config.total_steps * config.batch_size == config.samples_seen > 0
  assert 0 < config.layer_decay.visual <= 1 and 0 < config.layer_decay.text <= 1
  assert config.lr.visual > 0 and config.lr.text > 0


def test_paper_rows():
  b16 = load_config([f'--config={CONFIG_DIR}/b16.py'])
  assert (b16.lr.visual, b16.lr.text, b16.layer_decay.visual, b16.batch_size, b16.total_steps) == (
      2e-4, 2e-5, 0.75, 131_072, 64_000)
  e14 = load_config([f'--config={CONFIG_DIR}/e14.py'])
  assert (e14.model.patch_dropout, e14.layer_decay.visual, e14.batch_size) == (0.5, 0.9, 115_200)
  g14 = load_config([f'--config={CONFIG_DIR}/g14.py'])
  assert (g14.optimizer.name, g14.model.drop_path_rate, g14.data.name) == ('adamw', 0.0, 'LAION-400M')


def test_overrides_and_runlocal():
  config = load_config([f'--config={CONFIG_DIR}/l14.py:runlocal', '--config.batch_size=16',
                  '--config.model.patch_dropout=0.5', '--config.lr.visual=1e-3'])
  assert config.batch_size == 16 and config.model.patch_dropout == 0.5 and config.lr.visual == 1e-3
  assert config.total_steps == 10 and config.model.dtype == 'float32'
  with pytest.raises(Exception, match='unknown config argument'):
    load_config([f'--config={CONFIG_DIR}/l14.py:fast'])


def test_training_features_are_one_flag_each():
  """Locked towers, accumulation, fine-tuning, mixing and resampling are fields the command line reaches."""
  config = load_config([f'--config={CONFIG_DIR}/b16.py', '--config.lock_towers.visual=True',
                  '--config.lock_towers.text_unlocked_groups=2', '--config.accum_steps=4',
                  '--config.init.full=EVA02_CLIP_B_psz16_s8B.pt', '--config.data.mixing=batch',
                  '--config.data.resampled=False'])
  assert config.lock_towers.visual and config.lock_towers.text_unlocked_groups == 2 and config.accum_steps == 4
  assert config.init.full == 'EVA02_CLIP_B_psz16_s8B.pt'
  assert config.data.mixing == 'batch' and not config.data.resampled

r"""Zero-shot evaluation from a config: model, weights, data sets -> a results table and a JSON file.

  python -m eva_clip_jax.evaluate --config=configs/b16.py \
      --config.pretrained=EVA02_CLIP_B_psz16_s8B.pt \
      --config.evals.imagenet.data=/data/imagenet/val --output=results.json

Evaluations whose `data` is empty are skipped (and listed as such).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

import eva_clip_jax as ec
from eva_clip_jax.evaluation import build_evaluators

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file', lock_config=False)
_OUTPUT = flags.DEFINE_string('output', 'eval_results.json', 'where to write the results as JSON')


def evaluate(config) -> dict[str, float]:
  model_cfg = dict(config.model)
  name = model_cfg.pop('name')
  model = ec.create_model(name, pretrained=config.get('pretrained') or None, dtype=model_cfg.get('dtype', 'float32'),
                          attention=model_cfg.get('attention', 'xla'), scan_layers=model_cfg.get('scan_layers', True))
  evals = {k: v for k, v in dict(config.evals).items() if v.get('data')}
  skipped = sorted(set(config.evals) - set(evals))
  if skipped:
    print(f'skipped (no data configured): {", ".join(skipped)}')
  results: dict[str, float] = {}
  for evaluator in build_evaluators(evals):
    results.update(evaluator.run(model))
  return results


def main(argv):
  del argv
  results = evaluate(_CONFIG.value)
  width = max([len(k) for k in results] + [6])
  print(f'{"metric":{width}s}  value')
  for key, value in results.items():
    print(f'{key:{width}s}  {value:.4f}' if isinstance(value, float) else f'{key:{width}s}  {value}')
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, 'w') as f:
    json.dump(results, f, indent=1)
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)

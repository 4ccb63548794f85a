r"""Zero-shot evaluation: the paper's benchmark suite, or the evaluations a config lists.

  # The paper's tables (Tables 1-4) for a released model, from prepared data (see the README):
  python -m eva_clip_jax.evaluate --config=configs/b16.py --config.pretrained=EVA02_CLIP_B_psz16_s8B.pt \
      --suite=paper --data_dir=/data/eval --output_dir=results/b16

  # The config's own evaluations (config.evals; those whose `data` is empty are skipped):
  python -m eva_clip_jax.evaluate --config=configs/tiny.py --output=results.json

Suites: imagenet (Table 1), classification (Table 2), video (Table 3), retrieval (Table 4), paper (all). The model
is built as training builds it (same mesh, same parameter shardings, same jitted towers as the in-training
evaluators), with config.pretrained's weights when given. Results are kept per dataset under --output_dir, so a
rerun skips what is done; the tables are printed with the paper's numbers beside ours for a released model, and
written as tables.txt, results.json and results.csv.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from eva_clip_jax import accelerator, cli, storage
from eva_clip_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file', lock_config=False)
_OUTPUT = flags.DEFINE_string('output', 'eval_results.json', 'without --suite: where to write the results as JSON')
_SUITE = flags.DEFINE_enum('suite', None, ['imagenet', 'classification', 'video', 'retrieval', 'paper'],
                           "the paper's benchmark suite to run (instead of config.evals)")
_DATASETS = flags.DEFINE_list('datasets', None, 'with --suite: only these datasets of it (keys as in the tables)')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'with --suite: the prepared data (tfds data_dir + folder datasets)')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'eval_results', 'with --suite: results, per-dataset state, tables')
_PRECISION = flags.DEFINE_enum('precision', None, ['float32', 'bfloat16', 'float16'],
                               "the towers' compute dtype (default: the config's model.dtype)")
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'with --suite: images per process per step')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 0, 'with --suite: grain worker processes decoding image files')
_RERUN = flags.DEFINE_bool('rerun', False, 'with --suite: evaluate again the datasets already done')


def _prepare(config):
  from eva_clip_jax.training.eval_model import build_eval_model  # pylint: disable=g-import-not-at-top
  if _PRECISION.value:
    config.model.dtype = _PRECISION.value
  return build_eval_model(config)


def evaluate(config) -> dict[str, float]:
  """The config's evaluations (config.evals), on the training mesh."""
  from eva_clip_jax.evaluation import build_evaluators  # pylint: disable=g-import-not-at-top
  model = _prepare(config)
  results: dict[str, float] = {}
  for evaluator in build_evaluators(dict(config.evals), model_fn=model.model_fn, mesh=model.mesh,
                                    param_shardings=model.param_shardings):
    results.update(evaluator.run(model.params))
  return results


def evaluate_suite(config, suite_name: str, data_dir: str, output_dir: str, *, datasets=None, batch_size: int = 64,
                   num_workers: int = 0, rerun: bool = False) -> dict[str, dict]:
  """Runs a suite of the paper's datasets; prints and writes its tables. Returns {dataset: result}."""
  from eva_clip_jax.evaluation import report, runner, suite  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.models import get_model_spec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.tokenizer import get_tokenizer  # pylint: disable=g-import-not-at-top
  keys = suite.SUITES[suite_name]
  if datasets:
    unknown = sorted(set(datasets) - set(keys))
    if unknown:
      raise InputError(f'--datasets {unknown} are not in suite {suite_name!r}: {", ".join(keys)}')
    keys = [k for k in keys if k in datasets]
  bound = _prepare(config).extractor(batch_size)
  spec = get_model_spec(config.model.name)
  results = runner.run_suite(bound, get_tokenizer(context_length=spec.text.context_length), keys,
                             data_dir=data_dir, image_size=spec.vision.image_size, output_dir=output_dir,
                             model_id=runner.model_identity(config.to_dict()), batch_size=batch_size,
                             num_workers=num_workers, rerun=rerun)
  if jax.process_index() == 0:
    tables = report.format_suite(suite_name, results, config.model.name)
    print(tables)
    storage.write_text(storage.join(output_dir, 'tables.txt'), tables)
    report.write_json(storage.join(output_dir, 'results.json'), results, config.model.name, suite_name)
    report.write_csv(storage.join(output_dir, 'results.csv'), results, config.model.name)
    print(f'wrote {output_dir}/tables.txt, results.json, results.csv')
  return results


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required (a configs/*.py file)')
  accelerator.require_accelerator_in_use()  # a GPU host with CPU-only JAX stops here, not hours later
  if _SUITE.value:
    if not _DATA_DIR.value:
      raise app.UsageError('--suite needs --data_dir (the prepared data; see the README)')
    from eva_clip_jax.evaluation.suite import SUITES  # pylint: disable=g-import-not-at-top
    unknown = sorted(set(_DATASETS.value or ()) - set(SUITES[_SUITE.value]))
    if unknown:
      raise app.UsageError(f'--datasets {unknown} are not in suite {_SUITE.value!r}: {", ".join(SUITES[_SUITE.value])}')
    evaluate_suite(config, _SUITE.value, _DATA_DIR.value, _OUTPUT_DIR.value, datasets=_DATASETS.value,
                   batch_size=_BATCH_SIZE.value, num_workers=_NUM_WORKERS.value, rerun=_RERUN.value)
    return
  results = evaluate(config)
  width = max([len(k) for k in results] + [6])
  print(f'{"metric":{width}s}  value')
  for key, value in results.items():
    print(f'{key:{width}s}  {value:.4f}' if isinstance(value, float) else f'{key:{width}s}  {value}')
  storage.write_text(_OUTPUT.value, json.dumps(results, indent=1))
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  cli.run(main)

"""The paper's tables: its numbers (assets/paper_tables.json, transcribed once), ours printed beside them in the
paper's layout (one row per dataset, in the paper's order), and the results as JSON and CSV."""

from __future__ import annotations

import csv
import functools
import importlib.resources
import json
import math
from typing import Mapping

from eva_clip_jax import storage
from eva_clip_jax.evaluation.suite import DATASETS, SUITES, TABLES

@functools.lru_cache(maxsize=1)
def paper_tables() -> dict:
  return json.loads(importlib.resources.files('eva_clip_jax').joinpath('assets', 'paper_tables.json').read_text(
      encoding='utf-8'))


def paper_model_name(model: str) -> str | None:
  """The paper's row name for a model of this library ('EVA02-CLIP-B-16' -> 'EVA-02-CLIP-B/16'), or None."""
  from eva_clip_jax.models.registry import ALIASES  # pylint: disable=g-import-not-at-top
  models = paper_tables()['models']
  name = ALIASES.get(model, model)
  return next((row for row, ours in models.items() if ours == name or row == model), None)


def paper_numbers(table: str, model: str) -> dict[str, float]:
  """{column: the paper's percentage} for `model` in one table; {} when the paper has no row for it.

  EVA-CLIP-8B, 8B-448 and 18B came after the paper: their README publishes only each table's average ('avg', and
  'mean_recall' for retrieval), which is what this returns for them."""
  row = paper_model_name(model)
  data = paper_tables()['tables'][table]
  if row is not None and row in data['rows']:
    return dict(zip(data['columns'], data['rows'][row]))
  return {key.split('/', 1)[1]: value for key, value in _successor_row(model).items() if key.startswith(table + '/')}


def _successor_row(model: str) -> dict[str, float]:
  from eva_clip_jax.models.registry import ALIASES  # pylint: disable=g-import-not-at-top
  return paper_tables()['successors']['rows'].get(ALIASES.get(model, model), {})


def _who(model: str) -> str:
  who = paper_model_name(model)
  if who:
    return f' (the paper\'s {who})'
  if _successor_row(model):
    return ' (published: the EVA-CLIP-18B README\'s averages only)'
  return ' (not in the paper: no paper column)'


def headline(key: str, result: Mapping) -> float | None:
  """The number the paper's table shows for a dataset (a fraction), or None when it did not run."""
  metric = DATASETS[key].metric
  value = result.get(metric) if isinstance(result, Mapping) else None
  return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _pct(value: float | None) -> str:
  return '-' if value is None else f'{100 * value:.1f}'


def _paper(value) -> str:
  return '-' if value is None else f'{value:.1f}'


def format_table(table: str, results: Mapping[str, Mapping], model: str) -> str:
  """One table: a row per dataset in the paper's order (ours, the paper's), then the table's averages."""
  paper = paper_numbers(table, model)
  caption = paper_tables()['tables'][table]['caption']
  lines = [caption, f'model {model}' + _who(model)]
  if table == 'retrieval':
    return '\n'.join(lines + _retrieval_rows(results, paper)) + '\n'
  keys = SUITES[table] if table != 'video' else SUITES['video']
  width = max(len(DATASETS[k].title) for k in keys) + 2
  lines.append(f'{"dataset":{width}s}{"metric":>16s}{"ours":>8s}{"paper":>8s}  status')
  ours = {}
  for key in keys:
    result = results.get(key, {})
    ours[key] = headline(key, result)
    status = result.get('status', 'not run') if isinstance(result, Mapping) else 'not run'
    lines.append(f'{DATASETS[key].title:{width}s}{DATASETS[key].metric:>16s}{_pct(ours[key]):>8s}'
                 f'{_paper(paper.get(key)):>8s}  {status}')
  done = [v for v in ours.values() if v is not None]
  avg = sum(done) / len(done) if len(done) == len(keys) else None
  lines.append(f'{"avg":{width}s}{"":>16s}{_pct(avg):>8s}{_paper(paper.get("avg")):>8s}')
  if table == 'imagenet':
    delta = None if avg is None else ours['imagenet1k'] - avg
    lines.append(f'{"delta (IN-1K - avg)":{width}s}{"":>16s}{_pct(delta):>8s}{_paper(paper.get("delta")):>8s}')
  return '\n'.join(lines) + '\n'


def _retrieval_rows(results: Mapping[str, Mapping], paper: Mapping[str, float]) -> list[str]:
  lines = [f'{"dataset":12s}{"direction":>16s}' + ''.join(f'{f"R@{k}":>8s}{"paper":>7s}' for k in (1, 5, 10))]
  for key in SUITES['retrieval']:
    result = results.get(key, {})
    for direction, label in (('image_to_text', 'text retrieval'), ('text_to_image', 'image retrieval')):
      cells = ''
      for k in (1, 5, 10):
        metric = f'{direction}_R@{k}'
        value = result.get(metric) if isinstance(result, Mapping) else None
        cells += f'{_pct(value):>8s}{_paper(paper.get(f"{key}/{metric}")):>7s}'
      lines.append(f'{DATASETS[key].title:12s}{label:>16s}{cells}')
  # Mean recall (the EVA-CLIP-18B paper's MR): the mean of the twelve recalls above.
  metrics = [f'{direction}_R@{k}' for direction in ('image_to_text', 'text_to_image') for k in (1, 5, 10)]
  ours = [results.get(key, {}).get(m) for key in SUITES['retrieval'] for m in metrics]
  theirs = [paper.get(f'{key}/{m}') for key in SUITES['retrieval'] for m in metrics]
  mean = lambda values: None if None in values else sum(values) / len(values)
  published = paper.get('mean_recall', mean(theirs))
  lines.append(f'{"mean recall":28s}{_pct(mean(ours)):>8s}{_paper(published):>7s}')
  return lines


def format_suite(suite: str, results: Mapping[str, Mapping], model: str) -> str:
  return '\n'.join(format_table(table, results, model) for table in TABLES[suite])


def write_json(path: str, results: Mapping[str, Mapping], model: str, suite: str) -> None:
  paper = {t: paper_numbers(t, model) for t in TABLES[suite]}
  with storage.atomic_write(path, 'w', encoding='utf-8') as f:
    json.dump({'model': model, 'paper_model': paper_model_name(model), 'suite': suite, 'results': results,
               'paper': paper}, f, indent=1, sort_keys=False)


def write_csv(path: str, results: Mapping[str, Mapping], model: str) -> None:
  """One row per (dataset, metric): dataset, metric, value, paper (the paper's number for the table's metric)."""
  paper = {}
  for table in ('imagenet', 'classification', 'video', 'retrieval'):
    paper.update(paper_numbers(table, model))
  with storage.atomic_write(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['dataset', 'metric', 'value', 'paper'])
    for key, result in results.items():
      for metric, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          reported = paper.get(f'{key}/{metric}') if DATASETS[key].task == 'retrieval' else (
              paper.get(key) if metric == DATASETS[key].metric else None)
          writer.writerow([key, metric, value, '' if reported is None else reported])

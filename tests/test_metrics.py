"""What the console and the metric files show: one progress line per log step (a redrawn bar on a terminal), every
scalar in metrics.jsonl; evaluation's image count through the same display."""

import io
import json

from eva_clip_jax.evaluation import runner
from eva_clip_jax.progress import Progress
from eva_clip_jax.training import metrics as metrics_lib

SUMMARY = {'loss': 3.21, 'perf/samples_per_s': 1234.5, 'perf/eta_hours': 1.5, 'lr/visual': 1e-4}


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_is_one_line_per_update_in_a_log():
  stream = io.StringIO()
  progress = Progress(1000, stream=stream, bar=True)
  progress.update(50, metrics_lib.progress_text(50, 1000, SUMMARY))
  progress.message('step 50 imagenet: top1=0.1000')
  progress.update(100, metrics_lib.progress_text(100, 1000, {'loss': 3.0}))
  progress.close()
  assert stream.getvalue().splitlines() == [
      'step 50/1000 | loss 3.2100 | 1,234 samples/s | ETA 1:30:00', 'step 50 imagenet: top1=0.1000',
      'step 100/1000 | loss 3.0000']


def test_progress_redraws_a_bar_on_a_terminal():
  stream = _Terminal()
  progress = Progress(100, stream=stream, bar=True)
  progress.update(50, metrics_lib.progress_text(50, 100, SUMMARY))
  progress.update(100, metrics_lib.progress_text(100, 100, SUMMARY))
  progress.message('done')
  out = stream.getvalue()
  assert out.count('\n') == 2  # the bar line, ended by the message, and the message
  assert '\r[' + '#' * 15 + '.' * 15 + '] step 50/100' in out and '\r[' + '#' * 30 + '] step 100/100' in out


def test_evaluation_progress_is_a_line_per_tenth_in_a_log(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr(runner.sys, 'stderr', stream)
  progress = runner._image_progress('imagenet', 1000)
  for _ in range(40):
    progress(50)  # 2,000 of 1,000: past the total too, a line per tenth
  progress.close()
  lines = stream.getvalue().splitlines()
  assert [line.split(' img/s')[0].rsplit('  ', 1)[0] for line in lines[:3]] == [
      'imagenet  50/1000 images   5%', 'imagenet  100/1000 images  10%', 'imagenet  200/1000 images  20%']
  assert len(lines) == 21 and all(line.endswith(' img/s') for line in lines)


def test_writer_keeps_every_scalar_in_jsonl(tmp_path):
  writer = metrics_lib.Writer(str(tmp_path))
  writer.write_scalars(50, SUMMARY)
  writer.write_scalars(100, {'loss': 3.0})
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert rows == [{'step': 50, **SUMMARY}, {'step': 100, 'loss': 3.0}]
  assert list(tmp_path.glob('events.out.tfevents.*'))  # and the TensorBoard event file

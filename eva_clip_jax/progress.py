"""The console's progress display, one for training's steps and evaluation's images.

On a terminal one line is redrawn in place (behind a bar when asked); elsewhere (logs, CI) an update is a line of
its own: every update, or only the first in each tenth of the total. Process 0 only. Callers choose the text:
training's 'step 120/500 | loss ... | samples/s | ETA' (eva_clip_jax.training.metrics.progress_text), evaluation's
'name  1234/50000 images  2%  310 img/s' (eva_clip_jax.evaluation.runner).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

import jax

_BAR_WIDTH = 30


class Progress:
  """A progress line. `update(done, text)` draws `text` for `done` of `total`; a progress object is also a
  counter's callback, `progress(n)`, that adds n to `done` and draws `describe(self)` (the evaluators' form).

  bar: on a terminal, a [####....] bar of done / total before the text. tenths: off a terminal, only the first
  update in each tenth of the total is written (of each 10,000 when the total is unknown). The default stream is
  sys.stdout at construction time."""

  def __init__(self, total: int | None, *, stream: TextIO | None = None, bar: bool = False, tenths: bool = False,
               describe: Callable[['Progress'], str] | None = None):
    self.total, self.done = total, 0
    self.stream = stream or sys.stdout
    self.enabled = jax.process_index() == 0
    self.terminal = self.enabled and hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.bar, self.tenths, self.describe = bar, tenths, describe
    self.start = time.perf_counter()
    self._open_line, self._last_tenth = False, None

  @property
  def rate(self) -> float:
    """`done` per second since construction."""
    return self.done / max(time.perf_counter() - self.start, 1e-9)

  def __call__(self, n: int) -> None:
    self.done += n
    if self.enabled:
      self.update(self.done, self.describe(self))

  def update(self, done: int, text: str) -> None:
    self.done = done
    if not self.enabled:
      return
    if self.terminal:
      prefix = ''
      if self.bar:
        filled = int(_BAR_WIDTH * min(done / max(self.total or 1, 1), 1.0))
        prefix = f'[{"#" * filled}{"." * (_BAR_WIDTH - filled)}] '
      self.stream.write(f'\r{prefix}{text}\x1b[K')
      self._open_line = True
    else:
      if self.tenths:
        tenth = int(10 * done / self.total) if self.total else done // 10000
        if tenth == self._last_tenth:
          return
        self._last_tenth = tenth
      self.stream.write(text + '\n')
    self.stream.flush()

  def message(self, text: str) -> None:
    """A line of its own (an evaluation result, a notice), without breaking the progress line."""
    if not self.enabled:
      return
    self._end_line()
    self.stream.write(text + '\n')
    self.stream.flush()

  def close(self) -> None:
    self._end_line()

  def _end_line(self) -> None:
    if self._open_line:
      self.stream.write('\n')
      self.stream.flush()
      self._open_line = False

"""What every command-line entry point shares: quiet library start-up and one-line errors.

A user's mistake (a config file that does not exist, a model name that is not registered, a data path with nothing
in it) ends the command with `error: <what is wrong>` on stderr and exit status 2, not a traceback through JAX or
orbax. Set EVA_CLIP_JAX_TRACEBACK=1 to see the traceback anyway.

Two kinds of error end in that line. `errors.InputError`, which the package raises where it checks what the user
gave (AcceleratorUnused is one); a ValueError or KeyError of its own invariants or from a library underneath is a bug
and keeps its traceback. And every OSError: a missing or unreadable path, a damaged shard, a full disk or an
unreachable bucket is the machine's state, not a bug, and the message names the path (the package's own
CheckpointSaveError, PretrainedUnavailable and MissingDataset are OSErrors); the cost is that an OSError from a bug
is reported in one line too, which EVA_CLIP_JAX_TRACEBACK=1 undoes. Plus absl's UsageError for a bad command line.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Callable

from absl import app

from eva_clip_jax.errors import InputError

USER_ERRORS = (InputError, OSError, app.UsageError)  # see the module docstring; anything else keeps its traceback


def quiet_library_logs() -> None:
  """Silences start-up chatter that says nothing about the run: TensorFlow's oneDNN and CPU-feature notices, JAX's
  probing for TPU and GPU backends on a host without them, orbax's per-save INFO lines. Warnings stay."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  noisy = ('/orbax/', '/jax/_src/xla_bridge', '/jax/_src/cloud_tpu_init', '/jax_plugins/', '/tensorflow_datasets/')
  py_logging.getLogger('absl').addFilter(
      lambda record: record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in noisy))
  py_logging.getLogger('absl').addFilter(_orbax_errors_in_one_line)
  py_logging.getLogger('jax._src.xla_bridge').setLevel(py_logging.ERROR)  # "Unable to initialize backend 'tpu'"


def _orbax_errors_in_one_line(record: py_logging.LogRecord) -> bool:
  """orbax logs a failed background save from each of its threads with the whole traceback (a full disk: a dozen of
  them); the checkpointer reports the failure itself with its cause and the latest usable step, so orbax's records
  keep their message line and lose the traceback (EVA_CLIP_JAX_TRACEBACK=1 keeps it)."""
  if record.exc_info and '/orbax/' in record.pathname and not os.environ.get('EVA_CLIP_JAX_TRACEBACK'):
    record.exc_info, record.exc_text = None, None
  return True


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, with user errors reported as one line."""

  def guarded(argv):
    quiet_library_logs()
    try:
      main(argv)
    except USER_ERRORS as e:
      if os.environ.get('EVA_CLIP_JAX_TRACEBACK'):
        raise
      message = str(e).strip() or type(e).__name__
      sys.stderr.write('error: ' + ' '.join(line.strip() for line in message.splitlines()) + '\n')
      sys.exit(2)

  app.run(guarded)

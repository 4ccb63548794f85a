"""Decoding worker processes that never outlive the trainer.

grain's worker processes stop when their iterator is closed, but a trainer killed with SIGKILL (the kernel's OOM
killer, a scheduler's hard kill) closes nothing, and the workers, reparented to init, would keep decoding and
holding memory forever. Each worker therefore watches the process that started the pipeline and exits when it is
gone. (PR_SET_PDEATHSIG is no substitute: it fires when the parent *thread* exits, and grain starts workers from
a thread of its own.)
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Callable


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:  # a killed but unreaped trainer is a zombie: gone for our purposes
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False
  except OSError:  # no /proc (macOS): signal 0 only checks that the pid exists
    try:
      os.kill(pid, 0)
      return True
    except ProcessLookupError:
      return False


def _watch(trainer_pid: int, interval_s: float) -> None:
  while _alive(trainer_pid):
    time.sleep(interval_s)
  os._exit(0)  # no cleanup to run: the trainer that would consume our output is gone


def _start_watcher(trainer_pid: int, interval_s: float, worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  threading.Thread(target=_watch, args=(trainer_pid, interval_s), name='exit-with-trainer', daemon=True).start()


def exit_with_trainer(interval_s: float = 1.0) -> Callable[[int, int], None]:
  """A grain `worker_init_fn` that makes each worker exit within `interval_s` of this process's death."""
  return functools.partial(_start_watcher, os.getpid(), interval_s)

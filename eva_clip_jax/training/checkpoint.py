"""Checkpoints with orbax: the train state plus every process's data-iterator position, saved asynchronously.

Atomicity comes from orbax: a step is written to a temporary directory and renamed when every process has
finished, so a crash mid-save leaves the previous step as the latest usable one. The iterator position saved with
step s is the one recorded right after the batch of step s was drawn (the loop prefetches ahead, so the live
iterator's position would be too far along).

The directory may be local or in a bucket (gs://...; orbax lists and finalises through etils.epath, tensorstore
writes the arrays). On an object store orbax writes a step in place and marks it finished with a
`commit_success.txt` object, so an unfinished step is never listed, restored or counted as the latest.

Failure modes orbax 0.12.8 does not handle, handled here:
- A save that fails in the background (full disk, lost mount, a bucket refusing writes) still counts as orbax's
  latest step, and the old steps it was meant to replace are deleted anyway. Here orbax keeps every step
  (`max_to_keep=None`); old steps are pruned only after a newer one is confirmed, and the step list is re-read
  from the directory. The failed step's partial files are removed at once, so they never confuse the next start.
  The next save step retries with the newer state; `max_failed_saves` failures in a row stop the run with
  `CheckpointSaveError`, which names the cause and the latest usable step. The final save is retried in place.
- A finalised step whose files were damaged afterwards (a truncated array file, as a half-synced disk leaves it)
  fails to restore. `restore_latest` sets such a step aside as `damaged.<step>.<unix time>` (never deletes it),
  says why, and tries the one before. On a local disk that is a rename; an object store has no rename, so every
  object of the step is copied under the new prefix, the copy checked, and only then the originals removed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as std_logging
import sys
import threading
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eva_clip_jax import storage

DAMAGED_PREFIX = 'damaged'  # <directory>/damaged.<step>.<unix time>: a step that could not be restored


class _RecordedIteratorState:
  """What grain's checkpoint handler saves: an iterator state captured earlier, as JSON bytes."""

  def __init__(self, state: Any):
    self._state = json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


class CheckpointSaveError(OSError):
  """Saves keep failing (or the final one did): the run stops, naming the cause and the latest usable step."""


class Checkpointer:

  def __init__(self, directory: str, *, every_steps: int, keep: int, asynchronous: bool = True,
               max_failed_saves: int = 3, final_save_attempts: int = 3):
    self.directory = storage.absolute(directory)
    self.every_steps = max(int(every_steps), 1)
    self.keep = max(int(keep), 1)
    self.max_failed_saves = max(int(max_failed_saves), 1)
    self.final_save_attempts = max(int(final_save_attempts), 1)
    self._failed_in_a_row = 0
    self._last_failure: str | None = None
    self._remove_hooks: Callable[[], None] | None = None  # set while a failed restore's late errors may arrive
    self._keep_hooks = False
    options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=None,
                                           enable_async_checkpointing=asynchronous, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=('state', 'data'), options=options)
    self._pending: int | None = None  # the step whose save may still be running

  def steps_on_disk(self) -> list[int]:
    """Finalised steps, read from the directory (orbax's own list also holds steps whose save failed)."""
    self._manager.reload()
    return sorted(s for s in self._manager.all_steps() if storage.isdir(storage.join(self.directory, str(s))))

  def latest_step(self) -> int | None:
    steps = self.steps_on_disk()
    return steps[-1] if steps else None

  def _settle(self) -> str | None:
    """Waits for the save in flight and prunes old steps once a newer one is confirmed. A failed save is reported,
    its partial files removed, and counted; returns the failure's cause (None when it succeeded)."""
    if self._pending is None:
      return None
    step, self._pending = self._pending, None
    cause = None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      cause = _cause(e)
    steps = self.steps_on_disk()
    if cause is None and step not in steps:
      cause = 'the step is not in the checkpoint directory after the save'
    if cause is not None:
      return self._failed(step, cause)
    self._failed_in_a_row = 0
    for old in steps[:-self.keep]:
      self._manager.delete(old)
    return None

  def _failed(self, step: int, cause: str) -> str:
    self._failed_in_a_row += 1
    self._last_failure = cause
    # The failed save's other writes end later, some at exit, with the same two reports as an abandoned restore;
    # after a failed save the hooks stay for the rest of the process (it is about to retry or to stop).
    self._silence_closed_loop_errors()
    self._keep_hooks = True
    self._remove_partial(step)
    steps = self.steps_on_disk()
    latest = steps[-1] if steps else None
    logging.error('Saving the checkpoint of step %d failed (%s); the latest usable step is %s (%d failed saves in a '
                  'row).', step, cause, latest, self._failed_in_a_row)
    if self._failed_in_a_row >= self.max_failed_saves:
      raise CheckpointSaveError(
          f'{self._failed_in_a_row} checkpoint saves in a row failed in {self.directory}, the last at step {step}: '
          f'{cause}. The latest usable step is {latest}; fix the cause and start again with the same workdir.')
    return cause

  def _remove_partial(self, step: int) -> None:
    """A failed save's own files: orbax's temporary directory (local disks) or the unfinished step (object stores,
    where no commit file marks it finished). Finalised steps are never touched."""
    if jax.process_index() == 0:
      try:
        for path in storage.glob(storage.join(self.directory, f'{step}.orbax-checkpoint-tmp*')):
          storage.remove(path, recursive=True)
        if step not in self.steps_on_disk():  # renamed into place, but not finished (a bucket: no commit file)
          storage.remove(storage.join(self.directory, str(step)), recursive=True)
      except Exception as e:  # pylint: disable=broad-except  (a bucket refusing deletes too: the save's error counts)
        logging.warning('Could not remove the partial files of step %d (%s: %s); the next start ignores them.', step,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else '')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_remove_partial_{step}')

  def save(self, step: int, state: Any, iterator_state: Any, *, force: bool = False) -> bool:
    """Starts saving (returns at once when asynchronous); False when `step` is not a save step."""
    if not force and step % self.every_steps:
      return False  # decided here: orbax's own check costs ~1.6 ms per step
    self._settle()
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(_RecordedIteratorState(iterator_state))), force=True)
    except Exception as e:  # pylint: disable=broad-except  (the synchronous part failed: no room, no permission)
      self._failed(step, _cause(e))
      return False
    self._pending = step if saved else None
    return saved

  def save_final(self, step: int, state: Any, iterator_state: Any) -> None:
    """Saves the run's last state and waits for it, retrying in place (the state is still held); raises
    CheckpointSaveError when every attempt failed, so the run exits non-zero instead of losing its last steps."""
    self._settle()
    for _ in range(self.final_save_attempts):
      if step in self.steps_on_disk():
        return
      if self.save(step, state, iterator_state, force=True) and self._settle() is None:
        return
    steps = self.steps_on_disk()
    raise CheckpointSaveError(
        f'the final checkpoint (step {step}) could not be saved in {self.directory} after '
        f'{self.final_save_attempts} attempts: {self._last_failure}. The latest usable step is '
        f'{steps[-1] if steps else None}.')

  def restore(self, step: int, abstract_state: Any, iterator) -> Any:
    """The state at `step`, laid out as `abstract_state`'s shardings; moves `iterator` to its saved position."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored.state

  def restore_latest(self, abstract_state: Any, iterator) -> tuple[Any, int] | None:
    """(state, step) from the newest step that restores, setting damaged ones aside; None when there is none."""
    for step in reversed(self.steps_on_disk()):
      try:
        with _quiet_abandoned_reads():
          return self.restore(step, abstract_state, iterator), step
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
        reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
        self._silence_closed_loop_errors()
        aside = self._set_aside(step)
        logging.error('Checkpoint step %d cannot be restored (%s); moved it to %s and trying the previous step.',
                      step, reason, aside)
    return None

  def _set_aside(self, step: int) -> str:
    aside = storage.join(self.directory, f'{DAMAGED_PREFIX}.{step}.{int(time.time())}')
    if jax.process_index() == 0:
      storage.move(storage.join(self.directory, str(step)), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
    self._manager.reload()
    return aside

  def wait(self) -> None:
    self._settle()

  def close(self) -> None:
    try:
      self._settle()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except  (orbax re-raises a failed save's error here, again)
        logging.warning('Closing the checkpoint manager: %s', _cause(e))
      if self._remove_hooks is not None and not self._keep_hooks:
        self._remove_hooks()
        self._remove_hooks = None

  def _silence_closed_loop_errors(self) -> None:
    if self._remove_hooks is None:
      self._remove_hooks = _silence_closed_loop_errors()


def _cause(error: BaseException) -> str:
  """An error in one line of at most 400 characters. Long tensorstore messages put the reason at the end
  ('... [OS error 28: No space left on device]'), so the middle is what goes."""
  first = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = f'{type(error).__name__}: {first}'
  return text if len(text) <= 400 else f'{text[:200]} ... {text[-195:]}'


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """A failed restore leaves orbax's other read coroutines to be garbage-collected with their own errors, which
  Python prints as 'Exception ignored in <coroutine>' tracebacks; the one error that matters is reported instead."""
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: logging.debug('abandoned checkpoint read: %s', unraisable.exc_value)
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


_CLOSED_LOOP = 'Event loop is closed'


def _unretrieved_task_errors(record) -> bool:
  """A logging filter: False (drop, after logging it at debug level) for asyncio's report of an unawaited failed task."""
  if str(record.msg).startswith('Task exception was never retrieved'):
    logging.debug('abandoned checkpoint read: %s', record.getMessage()[:300])
    return False
  return True


def _silence_closed_loop_errors() -> Callable[[], None]:
  """After an abandoned restore, orbax's other reads end later, after `_quiet_abandoned_reads` has ended: tensorstore
  callbacks still in flight report to the closed asyncio loop ("RuntimeError: Event loop is closed", printed as a
  traceback whichever way it surfaces: uncaught in a thread, from C, unraisable), and read tasks whose errors nobody
  awaited are reported when garbage-collected (asyncio's "Task exception was never retrieved", with the traceback).
  Both were seen in CI after "cannot be restored". Installs hooks that log those two at debug level (every other
  error is printed as before) and returns the function that removes them: the checkpointer keeps them from a failed
  restore until it is closed, and after a failed save (whose abandoned writes report as late as the process's
  exit) for the rest of the process."""
  asyncio_logger = std_logging.getLogger('asyncio')
  asyncio_logger.addFilter(_unretrieved_task_errors)

  def closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == _CLOSED_LOOP

  previous_excepthook, previous_thread_hook = sys.excepthook, threading.excepthook
  previous_unraisable = sys.unraisablehook

  def excepthook(kind, value, tb):
    if closed_loop(value):
      return logging.debug('abandoned checkpoint read: %s', value)
    return previous_excepthook(kind, value, tb)

  def thread_hook(args):
    if closed_loop(args.exc_value):
      return logging.debug('abandoned checkpoint read: %s', args.exc_value)
    return previous_thread_hook(args)

  def unraisable_hook(unraisable):
    if closed_loop(unraisable.exc_value):
      return logging.debug('abandoned checkpoint read: %s', unraisable.exc_value)
    return previous_unraisable(unraisable)

  sys.excepthook, threading.excepthook, sys.unraisablehook = excepthook, thread_hook, unraisable_hook

  def remove() -> None:
    gc.collect()  # the abandoned reads' tasks report now, while the hooks still hold
    asyncio_logger.removeFilter(_unretrieved_task_errors)
    sys.excepthook, threading.excepthook = previous_excepthook, previous_thread_hook
    sys.unraisablehook = previous_unraisable

  return remove


def read_state(step_dir: str) -> Any:
  """A saved train state as host numpy arrays (a dict of its fields), whatever mesh or process count wrote it (for
  inspection, export and tests). `step_dir` is `<workdir>/checkpoints/<step>`."""
  import numpy as np
  path = storage.join(storage.absolute(step_dir), 'state')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, 'item_metadata', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))

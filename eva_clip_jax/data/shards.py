"""Webdataset tar shards (img2dataset's layout): `KEY.jpg` + `KEY.txt` (+ `KEY.json`, `KEY.cls`) per sample.

`TarShardIterDataset` reads one shard sequentially as a grain `IterDataset` whose iterator state is the byte
offset of the next sample, so a restored pipeline resumes exactly. Shards may live in a bucket (gs://...): they are
streamed through the storage layer with a bounded read-ahead, never downloaded whole. A truncated or corrupt tar
ends its shard early with one error record, and a shard that cannot be opened or read (gone, or failing after the
client's retries) with one `unreadable_shard` record; the pipeline counts both instead of crashing. The client's
retries of transient failures ride on the next sample as `__storage_retries__`, for the metrics.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from typing import Any

import grain

from eva_clip_jax import storage

ERROR_KEY = '__error__'
RETRIES_KEY = '__storage_retries__'


def expand_braces(pattern: str) -> list[str]:
  """'data/{00000..00002}.tar' -> ['data/00000.tar', 'data/00001.tar', 'data/00002.tar'] (zero padding kept);
  '{a,b}' alternatives too."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if not match:
    return [pattern]
  head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
  range_match = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if range_match:
    lo, hi = range_match.groups()
    width = len(lo) if lo.startswith('0') else 0
    items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    items = body.split(',')
  return [p for item in items for p in expand_braces(head + item + tail)]


def list_shards(patterns: str | list[str]) -> list[str]:
  """All shard paths for brace patterns, globs, directories (prefixes), plain paths or `.txt` shard lists (one path
  per line), local or in a bucket ('::'-separated or a list).

  A brace pattern over a bucket is checked against one listing per directory, not one request per shard.
  Raises FileNotFoundError naming the pattern that matched nothing, so a typo fails at start, not mid-run.
  """
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split('::') if p]
  shards: list[str] = []
  for pattern in patterns:
    found: list[str] = []
    listings: dict[str, set[str]] = {}  # directory -> names in it, for brace-expanded paths in a bucket
    for path in expand_braces(pattern):
      if path.endswith('.txt') and storage.isfile(path):
        found.extend(_read_shard_list(path))
      elif storage.has_glob(path):
        found.extend(storage.glob(path))
      elif storage.is_url(path) and not path.endswith('/') and storage.splitext(path)[1]:
        directory = storage.dirname(path)
        if directory not in listings:
          listings[directory] = set(storage.listdir(directory)) if storage.isdir(directory) else set()
        if storage.basename(path) in listings[directory]:
          found.append(path)
      elif storage.isdir(path):
        found.extend(storage.glob(storage.join(path, '*.tar')))
      elif storage.isfile(path):
        found.append(storage.absolute(path) if not storage.is_url(path) else path)
    if not found:
      raise FileNotFoundError(f'no shard matches {pattern!r}')
    shards.extend(found)
  return shards


def _read_shard_list(path: str) -> list[str]:
  """The shards a list file names, relative ones taken relative to the list's directory."""
  base = storage.dirname(path)
  lines = [line.strip() for line in storage.read_text(path).splitlines()]
  return [line if storage.is_url(line) or line.startswith('/') else storage.join(base, line)
          for line in lines if line and not line.startswith('#')]


def _split_name(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key is everything before the first dot of the basename."""
  directory, base = posixpath.split(name)  # a name inside the tar: always '/'-separated
  stem, _, ext = base.partition('.')
  return posixpath.join(directory, stem) if directory else stem, ext.lower()


class _TarShardIterator(grain.DatasetIterator):

  def __init__(self, path: str):
    super().__init__()
    self._path = path
    self._file = None  # opened at the first read, so that a shard that cannot be opened is counted, not raised
    self._offset = 0  # byte offset of the next member header
    self._error: str | None = None  # set when the shard turned out corrupt or unreadable; reported once
    self._error_kind = 'corrupt_tar'
    self._failed = False

  def _read_header(self) -> tarfile.TarInfo | None:
    if self._file is None:
      try:
        self._file = storage.open_read(self._path, 'rb')
      except Exception as e:  # pylint: disable=broad-except  (gone, refused, or failing after the retries)
        raise _Unreadable(f'cannot open {self._path}: {type(e).__name__}: {e}') from e
    self._file.seek(self._offset)
    header = self._file.read(tarfile.BLOCKSIZE)
    if len(header) < tarfile.BLOCKSIZE:  # a complete tar ends with zero blocks, not with the file
      raise tarfile.ReadError('file ends without the end-of-archive marker (truncated)')
    if header == tarfile.NUL * tarfile.BLOCKSIZE:
      return None  # end of archive
    return tarfile.TarInfo.frombuf(header, tarfile.ENCODING, 'surrogateescape')

  def _read_data(self, info: tarfile.TarInfo) -> bytes:
    data = self._file.read(info.size)
    if len(data) < info.size:
      raise tarfile.ReadError(f'truncated member {info.name}')
    blocks = -(-info.size // tarfile.BLOCKSIZE)
    self._offset += tarfile.BLOCKSIZE * (1 + blocks)
    return data

  def __next__(self) -> dict[str, Any]:
    sample = self._next_record()
    retries = storage.take_retry_count()
    if retries:
      sample[RETRIES_KEY] = retries
    return sample

  def _next_record(self) -> dict[str, Any]:
    if self._failed:
      raise StopIteration
    if self._error is not None:
      self._failed = True
      return {ERROR_KEY: self._error_kind, '__shard__': self._path, 'detail': self._error}
    sample: dict[str, Any] = {}
    try:
      while True:
        info = self._read_header()
        if info is None:
          if sample:
            return sample
          raise StopIteration
        key, ext = _split_name(info.name)
        if sample and key != sample['__key__']:
          return sample  # the next sample starts at self._offset
        data = self._read_data(info)
        if not info.isfile():
          continue
        sample.setdefault('__key__', key)
        sample['__shard__'] = self._path
        sample[ext] = data
    except StopIteration:
      raise
    except (tarfile.TarError, UnicodeDecodeError, ValueError) as e:
      # The shard ends here; one error record reports it. The sample in progress is dropped with it: the
      # members it still lacked may be the ones lost.
      return self._fail('corrupt_tar', e)
    except Exception as e:  # pylint: disable=broad-except  (storage clients raise many types)
      # A read that fails below the tar format (an object deleted mid-read, a server failing past the client's
      # retries, a disk error) makes the rest of the shard unreadable.
      return self._fail('unreadable_shard', e)

  def _fail(self, kind: str, error: Exception) -> dict[str, Any]:
    self._error_kind, self._error = kind, f'{type(error).__name__}: {error}'[:500]
    return self._next_record()

  def get_state(self) -> dict[str, Any]:
    return {'offset': self._offset, 'error': self._error, 'error_kind': self._error_kind, 'failed': self._failed}

  def set_state(self, state: dict[str, Any]) -> None:
    self._offset = int(state['offset'])
    self._error = state['error']
    self._error_kind = state.get('error_kind', 'corrupt_tar')  # absent from checkpoints of earlier versions
    self._failed = bool(state['failed'])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class _Unreadable(Exception):
  """A shard that could not be opened at all."""


class TarShardIterDataset(grain.IterDataset):
  """The samples of one webdataset shard, as dicts {'__key__', '__shard__', ext: bytes, ...}."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def __iter__(self) -> grain.DatasetIterator:
    return _TarShardIterator(self._path)

  def __str__(self) -> str:
    return f'TarShardIterDataset({self._path})'

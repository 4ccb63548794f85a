"""Webdataset tar shards (img2dataset's layout): `KEY.jpg` + `KEY.txt` (+ `KEY.json`, `KEY.cls`) per sample.

`TarShardIterDataset` reads one shard sequentially as a grain `IterDataset` whose iterator state is the byte
offset of the next sample, so a restored pipeline resumes exactly. A truncated or corrupt tar ends its shard
early with one error record, which the pipeline counts instead of crashing.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import Any

import grain

ERROR_KEY = '__error__'


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
  """All shard paths for brace patterns, globs, directories or plain paths ('::'-separated or a list).

  Raises FileNotFoundError naming the pattern that matched nothing, so a typo fails at start, not mid-run.
  """
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split('::') if p]
  shards: list[str] = []
  for pattern in patterns:
    found: list[str] = []
    for path in expand_braces(os.path.expanduser(pattern)):
      if os.path.isdir(path):
        found.extend(sorted(glob.glob(os.path.join(path, '*.tar'))))
      elif any(c in path for c in '*?['):
        found.extend(sorted(glob.glob(path)))
      elif os.path.isfile(path):
        found.append(path)
    if not found:
      raise FileNotFoundError(f'no shard matches {pattern!r}')
    shards.extend(found)
  return shards


def _split_name(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key is everything before the first dot of the basename."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition('.')
  return os.path.join(directory, stem) if directory else stem, ext.lower()


class _TarShardIterator(grain.DatasetIterator):

  def __init__(self, path: str):
    super().__init__()
    self._path = path
    self._file = open(path, 'rb')
    self._offset = 0  # byte offset of the next member header
    self._error: str | None = None  # set when the shard turned out corrupt; reported once
    self._failed = False

  def _read_header(self) -> tarfile.TarInfo | None:
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
    if self._failed:
      raise StopIteration
    if self._error is not None:
      self._failed = True
      return {ERROR_KEY: 'corrupt_tar', '__shard__': self._path, 'detail': self._error}
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
    except (tarfile.TarError, OSError, UnicodeDecodeError, ValueError) as e:
      # The shard ends here; one error record reports it. The sample in progress is dropped with it: the
      # members it still lacked may be the ones lost.
      self._error = str(e)
      return next(self)

  def get_state(self) -> dict[str, Any]:
    return {'offset': self._offset, 'error': self._error, 'failed': self._failed}

  def set_state(self, state: dict[str, Any]) -> None:
    self._offset = int(state['offset'])
    self._error = state['error']
    self._failed = bool(state['failed'])

  def close(self) -> None:
    self._file.close()


class TarShardIterDataset(grain.IterDataset):
  """The samples of one webdataset shard, as dicts {'__key__', '__shard__', ext: bytes, ...}."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def __iter__(self) -> grain.DatasetIterator:
    return _TarShardIterator(self._path)

  def __str__(self) -> str:
    return f'TarShardIterDataset({self._path})'

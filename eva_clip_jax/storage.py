"""One path layer for every location a user names: local paths, gs:// buckets and other fsspec URLs (s3://, ...).

Shards, checkpoints, metrics, evaluation data, weights and converted outputs all go through these functions, so a
bucket works wherever a local path does; nothing else in the package calls `open`, `os.path` or `glob` on a user's
location (tests/test_boundaries.py enforces it). Paths stay plain strings: local paths behave exactly as before.

Why fsspec (with gcsfs for gs://): it streams a remote object with ranged reads and a background read-ahead
cache, retries transient HTTP failures (429, 5xx, reset connections) with exponential backoff, serves s3:// and
the other fsspec protocols where their package is installed, and is what etils.epath (orbax's directory layer)
uses for gs:// once TensorFlow's file system is ruled out. Checkpoint arrays go through tensorstore's own GCS
driver, underneath orbax.

A local GCS server (fake-gcs-server) stands in for Google Cloud Storage with one variable,
`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`, which gcsfs reads itself; importing this module points the other
two GCS clients at it as well (tensorstore: `TENSORSTORE_GCS_HTTP_URL`) and keeps etils.epath off TensorFlow's
file system (`EPATH_USE_TF=false`), which has no endpoint setting and would bypass the server.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import logging
import os
import posixpath
import shutil
import tempfile
import threading
from typing import IO, Iterator

# Set before orbax or etils first resolve a gs:// path (they read the variables when they do, not at import).
os.environ.setdefault('EPATH_USE_TF', 'false')
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')  # else a 60 s bucket-type probe per bucket


def _emulator() -> str | None:
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if not host:
    return None
  return host if host.startswith(('http://', 'https://')) else f'http://{host}'


def _never_cache_listings() -> None:
  """Every fsspec filesystem of a bucket protocol, ours and etils.epath's (orbax lists and reads checkpoint
  directories through it), re-reads listings: other processes and tensorstore change the directories a run lists,
  and a stale listing shows a step that was set aside or hides a new one."""
  import fsspec.config  # pylint: disable=g-import-not-at-top
  for protocol in ('gs', 'gcs', 's3', 'az', 'abfs'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


_never_cache_listings()
# fsspec logs every file it opens at INFO ("AdaptiveReadaheadCache enabled ..."): a line per shard and per
# checkpoint file in the training log. Its warnings and errors still show.
if logging.getLogger('fsspec').level == logging.NOTSET:
  logging.getLogger('fsspec').setLevel(logging.WARNING)


def point_clients_at_emulator() -> None:
  """Points tensorstore at the GCS server named by STORAGE_EMULATOR_HOST (gcsfs reads that variable itself)."""
  if _emulator():
    os.environ['TENSORSTORE_GCS_HTTP_URL'] = _emulator()


point_clients_at_emulator()

# Bytes fetched per ranged read of a streamed object, and how many such blocks a reader keeps: one block is read
# ahead in the background while the caller consumes the current one (fsspec's 'background' cache).
READ_BLOCK_BYTES = 8 << 20
READ_AHEAD_BLOCKS = 2


def is_url(path: str) -> bool:
  """True for a location with a protocol other than file:// (gs://bucket/x, s3://..., memory://...)."""
  protocol, sep, _ = str(path).partition('://')
  return bool(sep) and protocol not in ('', 'file')


def _local(path: str) -> str:
  path = str(path)
  return path[len('file://'):] if path.startswith('file://') else os.path.expanduser(path)


def filesystem(path: str):
  """(fsspec filesystem, path within it) for a URL. Against an emulator, GCS needs no credentials."""
  import fsspec  # pylint: disable=g-import-not-at-top
  protocol = path.split('://', 1)[0]
  options = {}
  if protocol in ('gs', 'gcs'):
    _count_gcs_retries()
    if _emulator():
      options['token'] = 'anon'
  return fsspec.core.url_to_fs(path, **options)


# ---------------------------------------------------------------------------------------------------------------
# Names.


def join(base: str, *parts: str) -> str:
  return posixpath.join(base, *parts) if is_url(base) else os.path.join(_local(base), *parts)


def absolute(path: str) -> str:
  """A local path made absolute (with ~ expanded); a URL as it is."""
  return str(path) if is_url(path) else os.path.abspath(_local(path))


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip('/')) if is_url(path) else os.path.basename(_local(path))


def dirname(path: str) -> str:
  if is_url(path):
    protocol, rest = str(path).split('://', 1)
    return f'{protocol}://{posixpath.dirname(rest.rstrip("/"))}'
  return os.path.dirname(absolute(path))


def splitext(path: str) -> tuple[str, str]:
  return posixpath.splitext(path) if is_url(path) else os.path.splitext(path)


def _with_protocol(url: str, fs_path: str) -> str:
  protocol = url.split('://', 1)[0]
  return f'{protocol}://{fs_path}'


# ---------------------------------------------------------------------------------------------------------------
# Queries and listing.


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(_local(path))
  fs, p = filesystem(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  """A directory, or on an object store a prefix that has objects under it."""
  if not is_url(path):
    return os.path.isdir(_local(path))
  fs, p = filesystem(path)
  return fs.isdir(p)


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(_local(path))
  fs, p = filesystem(path)
  return fs.isfile(p)


def size(path: str) -> int:
  if not is_url(path):
    return os.path.getsize(_local(path))
  fs, p = filesystem(path)
  return int(fs.size(p))


def listdir(path: str) -> list[str]:
  """Sorted names (not paths) of the entries directly under a directory or prefix."""
  if not is_url(path):
    return sorted(os.listdir(_local(path)))
  fs, p = filesystem(path)
  return sorted(posixpath.basename(e.rstrip('/')) for e in fs.ls(p, detail=False) if e.rstrip('/') != p.rstrip('/'))


def glob(pattern: str) -> list[str]:
  """Sorted paths matching a glob pattern (*, ?, [...]); URLs keep their protocol."""
  if not is_url(pattern):
    return sorted(glob_lib.glob(_local(pattern)))
  fs, p = filesystem(pattern)
  return sorted(_with_protocol(pattern, m) for m in fs.glob(p))


def walk_files(path: str) -> list[str]:
  """Every file under a directory or prefix, recursively, as sorted full paths."""
  if not is_url(path):
    root = _local(path)
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
  fs, p = filesystem(path)
  return sorted(_with_protocol(path, f) for f in fs.find(p))


def has_glob(path: str) -> bool:
  return any(c in path for c in '*?[')


# ---------------------------------------------------------------------------------------------------------------
# Reading.


def open_read(path: str, mode: str = 'rb', **kwargs) -> IO:
  """A file opened for reading. A URL is streamed: ranged reads of READ_BLOCK_BYTES, the next block fetched in the
  background (bounded read-ahead), seekable, never downloaded whole; transient failures retried by the client."""
  if mode not in ('r', 'rb'):
    raise ValueError(f'open_read takes r or rb, not {mode!r}')
  if not is_url(path):
    return open(_local(path), mode, **kwargs)  # pylint: disable=unspecified-encoding
  fs, p = filesystem(path)
  f = fs.open(p, 'rb', block_size=READ_BLOCK_BYTES, cache_type='background',
              cache_options={'maxblocks': READ_AHEAD_BLOCKS})
  if mode == 'r':
    import io  # pylint: disable=g-import-not-at-top
    return io.TextIOWrapper(f, encoding=kwargs.get('encoding', 'utf-8'), newline=kwargs.get('newline'))
  return f


def read_bytes(path: str) -> bytes:
  with open_read(path, 'rb') as f:
    return f.read()


def read_text(path: str, encoding: str = 'utf-8') -> str:
  return read_bytes(path).decode(encoding)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local file name for `path`, for libraries that take only file names (torch.load, safetensors): the path
  itself when local, else a temporary download removed afterwards."""
  if not is_url(path):
    yield _local(path)
    return
  fs, p = filesystem(path)
  with tempfile.TemporaryDirectory(prefix='eva_clip_jax_') as tmp:
    local = os.path.join(tmp, posixpath.basename(p))
    fs.get(p, local)
    yield local


# ---------------------------------------------------------------------------------------------------------------
# Writing.


def makedirs(path: str) -> None:
  """Creates a local directory (and parents); object stores have no directories, so a URL needs nothing."""
  if not is_url(path):
    os.makedirs(_local(path), exist_ok=True)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """A temporary local file name whose file appears at `path` whole or not at all: moved into place (local, the
  temporary file sits beside the target) or uploaded (URL) only when the block ends without an error. For writers
  that take file names (torch.save, safetensors); an interrupted write leaves at most a hidden `.<name>.*.tmp`
  file, never a half-written target."""
  if is_url(path):
    with tempfile.TemporaryDirectory(prefix='eva_clip_jax_') as tmp:
      local = os.path.join(tmp, 'upload')
      yield local
      fs, p = filesystem(path)
      fs.put_file(local, p)
    return
  target = absolute(path)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f'.{os.path.basename(target)}.', suffix='.tmp')
  os.close(fd)
  try:
    yield tmp
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', **kwargs) -> Iterator[IO]:
  """A file opened for writing that appears at `path` whole or not at all (see `atomic_file`)."""
  if mode not in ('w', 'wb'):
    raise ValueError(f'atomic_write takes w or wb, not {mode!r}')
  with atomic_file(path) as tmp:
    with open(tmp, mode, **kwargs) as f:  # pylint: disable=unspecified-encoding
      yield f


def write_bytes(path: str, data: bytes) -> None:
  with atomic_write(path, 'wb') as f:
    f.write(data)


def write_text(path: str, text: str, encoding: str = 'utf-8') -> None:
  with atomic_write(path, 'w', encoding=encoding, newline='') as f:
    f.write(text)


def upload(local_path: str, path: str) -> None:
  """Copies a local file (or a directory, recursively) to `path`, local or URL."""
  if not is_url(path):
    if os.path.isdir(local_path):
      shutil.copytree(local_path, _local(path), dirs_exist_ok=True)
    else:
      makedirs(os.path.dirname(absolute(path)))
      shutil.copyfile(local_path, _local(path))
    return
  fs, p = filesystem(path)
  fs.put(local_path, p, recursive=os.path.isdir(local_path))


def remove(path: str, recursive: bool = False) -> None:
  if not is_url(path):
    local = _local(path)
    if os.path.isdir(local) and recursive:
      shutil.rmtree(local)
    elif os.path.lexists(local):
      os.remove(local)
    return
  fs, p = filesystem(path)
  if fs.exists(p):
    fs.rm(p, recursive=recursive)


def move(src: str, dst: str) -> None:
  """Renames a file or directory. Object stores have no rename: every object under `src` is copied to `dst`, the
  copy is checked object by object (same names, same sizes), and only then are the originals removed; a failure
  before that point leaves `src` as it was."""
  if not is_url(src):
    os.rename(_local(src), _local(dst))
    return
  fs, p = filesystem(src)
  _, q = filesystem(dst)
  sources = {f[len(p):]: fs.size(f) for f in fs.find(p)} if fs.isdir(p) else {'': fs.size(p)}
  for suffix in sources:
    fs.copy(p + suffix, q + suffix)
  copied = {f[len(q):]: fs.size(f) for f in fs.find(q)} if sources.keys() != {''} else {'': fs.size(q)}
  if copied != sources:
    raise OSError(f'moving {src} to {dst}: the copy does not match the original ({len(copied)} of '
                  f'{len(sources)} objects)')
  fs.rm(p, recursive=True)


# ---------------------------------------------------------------------------------------------------------------
# Retries of the GCS client, counted (gcsfs retries 429/5xx/dropped connections itself, with backoff, and reports
# each retry on its logger; the data pipeline turns the count into a training metric).

_retries = 0
_retries_lock = threading.Lock()
_counting = False


class _RetryCounter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    global _retries
    if record.levelno <= logging.DEBUG:
      if 'retrying after exception' in str(record.msg):
        with _retries_lock:
          _retries += 1
      return False  # the client's debug chatter stays out of the logs, as it was before counting
    return True


def _count_gcs_retries() -> None:
  global _counting
  if _counting:
    return
  _counting = True
  logger = logging.getLogger('gcsfs')
  logger.addFilter(_RetryCounter())
  if logger.getEffectiveLevel() > logging.DEBUG:
    # The retry reports are debug records; gcsfs's child loggers keep their level (no filter sees their records).
    for child in ('gcsfs.credentials', 'gcsfs.zonal_file'):
      child_logger = logging.getLogger(child)
      if child_logger.level == logging.NOTSET:
        child_logger.setLevel(logger.getEffectiveLevel())
    logger.setLevel(logging.DEBUG)


def take_retry_count() -> int:
  """Transient-failure retries made by this process's GCS client since the previous call."""
  global _retries
  with _retries_lock:
    count, _retries = _retries, 0
  return count

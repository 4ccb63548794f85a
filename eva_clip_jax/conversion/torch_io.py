"""Reading and writing PyTorch weight files safely and tensor by tensor. The only module of the converter that
imports torch.

Files are read with `torch.load(weights_only=True)` (tensors and plain containers only: a pickle that would run
code is refused) or as safetensors. Reading streams: a zip-format .pt/.bin file is memory-mapped (`mmap=True`), a
.safetensors file is read by byte ranges, and `StateReader.read` copies out one tensor, or one slice of it, at a
time, so an 18B checkpoint never sits in host memory whole. Writes stream too (`write_state_dict`) and go to a
temporary file in the target directory that is renamed into place, so an interrupted conversion never leaves a
half-written file.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import json
import math
import mmap
import pickle
import struct
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from eva_clip_jax import storage
from eva_clip_jax.errors import InputError, MissingDependency

WRAPPER_KEYS = ('state_dict', 'model', 'module')
KEY_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel / DeepSpeed, torch.compile
DTYPES = ('float32', 'float16', 'bfloat16')
Index = tuple[slice, ...]


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependency('reading or writing PyTorch files needs torch: pip install -r requirements-dev.txt') from e
  return torch


def _unwrap(obj: Any) -> Mapping[str, Any]:
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
    if inner is None:
      return obj
    obj = inner
  raise InputError(f'expected a state dict (a mapping of names to tensors), found {type(obj).__name__}')


def _strip_prefixes(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in KEY_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key


class StateReader(Mapping[str, np.ndarray]):
  """A checkpoint's tensors by (prefix-stripped) name, read on demand: `reader[key]` is the whole tensor, `read(key,
  index)` a slice of it (torch's axis order), both float32 for floating tensors. Shapes come without reading data."""

  def __init__(self, shapes: dict[str, tuple[int, ...]], path: str):
    self._shapes, self.path = shapes, path

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def read(self, key: str, index: Index = ()) -> np.ndarray:
    raise NotImplementedError

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._shapes:
      raise KeyError(key)
    return self.read(key)

  def __contains__(self, key: object) -> bool:  # Mapping's own would read the tensor
    return key in self._shapes

  def __iter__(self) -> Iterator[str]:
    return iter(self._shapes)

  def __len__(self) -> int:
    return len(self._shapes)


def _release_pages(tensor) -> None:
  """Hands the memory-mapped pages under `tensor` back to the kernel (madvise DONTNEED): they were only read, so the
  file still holds them, and a later read faults them in again. Without this every page of the checkpoint once
  touched stays in the process's resident set, and counts against a container's memory limit, until the map closes."""
  if not sys.platform.startswith('linux'):
    return
  page = mmap.PAGESIZE
  start = tensor.untyped_storage().data_ptr()
  end = start + tensor.untyped_storage().nbytes()
  start -= start % page  # pages shared with a neighbouring tensor are dropped too: harmless, they are clean
  _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


_LIBC = []


def _libc():
  if not _LIBC:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _LIBC.append(libc)
  return _LIBC[0]


class _TorchReader(StateReader):

  def __init__(self, tensors: Mapping[str, Any], path: str, mapped: bool):
    super().__init__({k: tuple(v.shape) for k, v in tensors.items()}, path)
    self._tensors, self._mapped = tensors, mapped

  def read(self, key: str, index: Index = ()) -> np.ndarray:
    torch = _torch()
    tensor = self._tensors[key]
    part = tensor[index] if index else tensor
    out = part.to(torch.float32 if part.is_floating_point() else part.dtype, copy=True).numpy()
    if self._mapped:
      _release_pages(tensor)
    return out


# safetensors' dtype names -> numpy; BF16 through ml_dtypes (a JAX dependency), then widened like the rest.
_SAFETENSORS_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'I64': 'int64',
                       'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8', 'BOOL': 'bool'}


def _np_dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class _SafetensorsReader(StateReader):
  """Reads the rows a slice needs by byte range (a bucket's object too, without downloading it); no mapping."""

  def __init__(self, f, path: str):
    (length,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(length))
    header.pop('__metadata__', None)
    self._f, self._base, self._info = f, 8 + length, {}
    for key, info in header.items():
      self._info[_strip_prefixes(key)] = (_np_dtype(_SAFETENSORS_DTYPES[info['dtype']]), tuple(info['shape']),
                                          info['data_offsets'][0])
    super().__init__({k: v[1] for k, v in self._info.items()}, path)

  def read(self, key: str, index: Index = ()) -> np.ndarray:
    dtype, shape, offset = self._info[key]
    rows = index[0] if index and shape else slice(None)
    start, stop, step = rows.indices(shape[0]) if shape else (0, 1, 1)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    self._f.seek(self._base + offset + start * row_bytes)
    count = max(stop - start, 0)
    data = np.frombuffer(self._f.read(count * row_bytes), dtype).reshape((count,) + shape[1:] if shape else ())
    part = data[(slice(None, None, step),) + tuple(index[1:])] if index and shape else data
    return part.astype(np.float32) if np.issubdtype(part.dtype, np.floating) or dtype.name == 'bfloat16' \
        else np.array(part)


def _torch_tensors(path: str, local: str) -> tuple[dict[str, Any], bool]:
  torch = _torch()
  try:
    try:
      raw, mapped = torch.load(local, map_location='cpu', weights_only=True, mmap=True), True
    except RuntimeError as e:
      if 'mmap' not in str(e):
        raise
      # Files written before torch 1.6 (the legacy, non-zip format) cannot be mapped: read whole.
      raw, mapped = torch.load(local, map_location='cpu', weights_only=True, mmap=False), False
  except pickle.UnpicklingError as e:
    raise InputError(f'refusing to load {path}: it holds Python objects other than tensors, and loading them '
                     f'could run code (torch.load weights_only=True said: {str(e).splitlines()[0]})') from e
  tensors = {_strip_prefixes(k): v.detach() for k, v in _unwrap(raw).items()
             if isinstance(v, torch.Tensor)}  # counters and metadata stored beside the tensors are skipped
  return tensors, mapped


@contextlib.contextmanager
def open_state_dict(path: str) -> Iterator[StateReader]:
  """A `StateReader` over a .pt/.pth/.bin or .safetensors file, open for the block."""
  if not storage.isfile(path):
    raise FileNotFoundError(f'no checkpoint file at {path}')
  if path.endswith('.safetensors'):
    with storage.open_read(path, 'rb') as f:
      reader = _SafetensorsReader(f, path)
      if not reader:
        raise InputError(f'{path} contains no tensors')
      yield reader
    return
  with storage.local_copy(path) as local:  # a bucket's file is fetched once; torch.load takes file names
    tensors, mapped = _torch_tensors(path, local)
    if not tensors:
      raise InputError(f'{path} contains no tensors')
    yield _TorchReader(tensors, path, mapped)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A flat {name: float32/int numpy array} dict from a .pt/.pth/.bin or .safetensors file."""
  with open_state_dict(path) as reader:
    return {key: reader.read(key) for key in reader}


# What a streamed writer is given per tensor: its name, its shape, and a function that makes it (a numpy array),
# called once, when the tensor's turn comes.
Producer = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def _write_safetensors(tensors: list[Producer], dtype: str, f) -> None:
  """The safetensors format by hand (an 8-byte header length, a JSON header of dtypes, shapes and byte ranges, then
  the bytes), because its own writers take the whole dict: here the header follows from the shapes alone, and each
  tensor is made, written and dropped in turn."""
  name = {v: k for k, v in _SAFETENSORS_DTYPES.items()}[dtype]
  header, offset = {}, 0
  for key, shape, _ in tensors:
    nbytes = math.prod(shape) * _np_dtype(dtype).itemsize
    header[key] = {'dtype': name, 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)  # the data starts 8-byte aligned
  f.write(struct.pack('<Q', len(text)) + text)
  for key, shape, make in tensors:
    f.write(_made(key, shape, make, dtype).tobytes())


def _made(key: str, shape: tuple[int, ...], make: Callable[[], np.ndarray], dtype: str) -> np.ndarray:
  array = np.asarray(make())
  if array.shape != tuple(shape) or not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f'{key}: made {array.dtype}{array.shape}, declared a floating tensor of shape {tuple(shape)}')
  return np.ascontiguousarray(array.astype(_np_dtype(dtype), copy=False))


class _Stored:
  """A tensor already written as a zip record, pickled as torch pickles a tensor (`_rebuild_tensor_v2` of a
  persistent storage), so `torch.load(weights_only=True)` reads the file as one from `torch.save`."""

  def __init__(self, record: str, shape: tuple[int, ...], dtype: str):
    self.record, self.shape, self.dtype = record, tuple(shape), dtype

  def __reduce_ex__(self, protocol):
    torch = _torch()
    strides = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
    return (torch._utils._rebuild_tensor_v2,  # pylint: disable=protected-access
            (_StorageRef(self), 0, torch.Size(self.shape), strides, False, collections.OrderedDict()))


class _StorageRef:

  def __init__(self, stored: _Stored):
    self.stored = stored


class _Pickler(pickle.Pickler):

  def persistent_id(self, obj):
    if not isinstance(obj, _StorageRef):
      return None
    torch, s = _torch(), obj.stored
    storage_type = {'float32': torch.FloatStorage, 'float16': torch.HalfStorage,
                    'bfloat16': torch.BFloat16Storage}[s.dtype]
    return ('storage', storage_type, s.record, 'cpu', math.prod(s.shape))


def _write_torch_zip(tensors: list[Producer], dtype: str, tmp: str) -> None:
  """torch.save's zip format, one record per tensor as it is made (torch.save holds every tensor of its dict until
  it has pickled them all); the pickle that names the records is written last."""
  torch = _torch()
  stored = {}
  with torch.serialization._open_zipfile_writer(tmp) as zf:  # pylint: disable=protected-access
    for i, (key, shape, make) in enumerate(tensors):
      data = _made(key, shape, make, dtype).tobytes()
      zf.write_record(f'data/{i}', data, len(data))
      stored[key], data = _Stored(str(i), shape, dtype), None
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(stored)
    zf.write_record('data.pkl', buf.getvalue(), len(buf.getvalue()))
    zf.write_record('.format_version', '1', 1)
    zf.write_record('byteorder', sys.byteorder, len(sys.byteorder))


def write_state_dict(tensors: Iterable[Producer], path: str, dtype: str = 'float32') -> None:
  """Writes tensors as .safetensors, or in torch.save's zip format for any other suffix (.pt, .bin, .pth), making
  each only when it is written: host memory holds one tensor, not the dict. Floating tensors are stored as `dtype`."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, not {dtype!r}')
  tensors = list(tensors)
  if path.endswith('.safetensors'):
    with storage.atomic_write(path, 'wb') as f:  # whole or not at all, local or in a bucket
      _write_safetensors(tensors, dtype, f)
  else:
    with storage.atomic_file(path) as tmp:
      _write_torch_zip(tensors, dtype, tmp)


def save_state_dict(state: Mapping[str, np.ndarray], path: str, dtype: str = 'float32') -> None:
  """Writes a flat state dict (see `write_state_dict`)."""
  write_state_dict(((k, np.shape(v), lambda v=v: v) for k, v in state.items()), path, dtype)

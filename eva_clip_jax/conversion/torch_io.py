"""Reading and writing PyTorch weight files safely. The only module of the converter that imports torch.

Files are read with `torch.load(weights_only=True)` (tensors and plain containers only: a pickle that would run
code is refused) or with safetensors. Writes go to a temporary file in the target directory and are renamed
into place, so an interrupted conversion never leaves a half-written file.
"""

from __future__ import annotations

import pickle
from typing import Any, Mapping

import numpy as np

from eva_clip_jax import storage
from eva_clip_jax.errors import InputError

WRAPPER_KEYS = ('state_dict', 'model', 'module')
KEY_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel / DeepSpeed, torch.compile


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('reading or writing PyTorch files needs torch: pip install -r requirements-dev.txt') from e
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


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A flat {name: float32/int numpy array} dict from a .pt/.pth/.bin or .safetensors file."""
  if not storage.isfile(path):
    raise FileNotFoundError(f'no checkpoint file at {path}')
  torch = _torch()
  with storage.local_copy(path) as local:  # a bucket's file is fetched once; the readers take file names
    if path.endswith('.safetensors'):
      from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
      raw = load_file(local, device='cpu')
    else:
      try:
        raw = torch.load(local, map_location='cpu', weights_only=True, mmap=False)
      except pickle.UnpicklingError as e:
        raise InputError(f'refusing to load {path}: it holds Python objects other than tensors, and loading them '
                         f'could run code (torch.load weights_only=True said: {str(e).splitlines()[0]})') from e
  state = _unwrap(raw)
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      continue  # counters and metadata stored beside the tensors
    tensor = value.detach().cpu()
    out[_strip_prefixes(key)] = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
  if not out:
    raise InputError(f'{path} contains no tensors')
  return out


def save_state_dict(state: Mapping[str, np.ndarray], path: str, dtype: str = 'float32') -> None:
  """Writes a flat state dict as .safetensors, or with torch.save for any other suffix (.pt, .bin, .pth)."""
  torch = _torch()
  torch_dtype = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}[dtype]
  tensors = {}
  for key, value in state.items():
    tensor = torch.from_numpy(np.array(value, order="C"))  # a copy; keeps 0-d arrays 0-d
    tensors[key] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
  with storage.atomic_file(path) as tmp:  # whole or not at all, local or in a bucket
    if path.endswith('.safetensors'):
      from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
      save_file(tensors, tmp)
    else:
      torch.save(tensors, tmp)

"""Stops a run that would use the CPU on a host with a GPU or TPU it cannot see.

requirements.txt installs JAX for the CPU only. On a GPU node or a TPU VM, that JAX finds no accelerator and runs
everything on the host's cores, many times slower, with no error: the trainer and the evaluators call
`require_accelerator_in_use` first, which ends the command in one line naming the install that fixes it (README,
"Installing on a GPU host or a TPU VM"). Asking for the CPU (JAX_PLATFORMS=cpu) is always allowed.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import shutil

from eva_clip_jax.errors import InputError

JAX_VERSION = '0.10.2'  # requirements.txt's pin; the accelerator builds must match it
INSTALL = {'gpu': f'pip install "jax[cuda12]=={JAX_VERSION}"', 'tpu': f'pip install "jax[tpu]=={JAX_VERSION}"'}


class AcceleratorUnused(InputError):
  """The system shows an accelerator that JAX does not use: the install does not fit the host."""


def visible_accelerators(dev: str | os.PathLike = '/dev', path: str | None = None) -> dict[str, list[str]]:
  """The accelerators the operating system shows, whatever JAX sees: {'gpu' | 'tpu': [evidence, ...]}.

  GPU: NVIDIA's device files (/dev/nvidia0, /dev/nvidiactl) or nvidia-smi on `path` (default: $PATH; a container
  may have the tool without the files until a GPU is attached, or the files without the tool). TPU: /dev/accel*
  (v2-v4) or VFIO groups under /dev/vfio (v5e and later); /dev/vfio/vfio alone is the VFIO driver's control file,
  there on many hosts without a TPU, and is no evidence.
  """
  dev = pathlib.Path(dev)
  found: dict[str, list[str]] = {}
  smi = shutil.which('nvidia-smi', path=os.environ.get('PATH', os.defpath) if path is None else path)
  gpu = ([smi] if smi else []) + _entries(dev, 'nvidia*')
  tpu = _entries(dev, 'accel*') + [p for p in _entries(dev / 'vfio', '*') if not p.endswith('/vfio/vfio')]
  if gpu:
    found['gpu'] = gpu
  if tpu:
    found['tpu'] = tpu
  return found


def _entries(folder: pathlib.Path, pattern: str) -> list[str]:
  try:
    return sorted(str(p) for p in folder.glob(pattern))
  except OSError:  # unreadable: no evidence either way
    return []


def installed_plugins() -> dict[str, str]:
  """JAX's accelerator plugins installed in this environment: {'gpu' | 'tpu': distribution name}."""
  found = {}
  for distribution in importlib.metadata.distributions():
    name = (distribution.metadata['Name'] or '').lower().replace('_', '-')
    if re.fullmatch(r'jax-cuda\d+-plugin', name):
      found['gpu'] = name
    elif name == 'libtpu':
      found['tpu'] = name
  return found


def unused_accelerator_message(backend: str, requested_platforms: str | None, visible: dict[str, list[str]],
                               plugins: dict[str, str] | None = None) -> str | None:
  """Why running on JAX's `backend` would leave a `visible` accelerator idle, or None when it would not.

  requested_platforms: JAX_PLATFORMS (jax.config.jax_platforms); exactly 'cpu' is the user asking for the CPU.
  plugins: `installed_plugins()`; one for the accelerator means it is installed but failed to start.
  """
  requested = [p.strip() for p in (requested_platforms or '').split(',') if p.strip()]
  if backend != 'cpu' or not visible or requested == ['cpu']:
    return None
  kind = 'gpu' if 'gpu' in visible else 'tpu'
  plugin = (plugins or {}).get(kind)
  remedy = (f'{plugin} is installed but did not start (JAX logged why above)' if plugin else
            f'install JAX for it, {INSTALL[kind]}')
  return (f'this host has a {kind.upper()} ({", ".join(visible[kind][:3])}) but JAX runs on the CPU only: {remedy} '
          '(README: Installing on a GPU host or a TPU VM), or set JAX_PLATFORMS=cpu to run on the CPU anyway')


def require_accelerator_in_use(dev: str | os.PathLike = '/dev', path: str | None = None) -> None:
  """Raises AcceleratorUnused when the system shows a GPU or TPU and JAX's default backend is the CPU (JAX's
  backends are initialised here: call it after jax.distributed.initialize)."""
  import jax  # pylint: disable=g-import-not-at-top
  message = unused_accelerator_message(jax.default_backend(), jax.config.jax_platforms,
                                       visible_accelerators(dev, path), installed_plugins())
  if message:
    raise AcceleratorUnused(message)

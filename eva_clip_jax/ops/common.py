"""What the attention seam and its kernels share: the compile target and the mask value."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite rather than -inf: a row whose keys are all masked (in one kernel block) never computes inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

_PLATFORM_ALIASES = {'cuda': 'gpu', 'rocm': 'gpu'}


def compile_target(*arrays) -> tuple[str, str]:
  """(platform, device kind) of what the computation consuming `arrays` is compiled for; platform 'tpu', 'gpu'
  or 'cpu'.

  Under jit an input's abstract sharding names its mesh's device (`AbstractMesh.abstract_device`), through scans,
  remat, custom_vjp and shard_map; that is the only place a trace sees the target of an ahead-of-time compile for a
  TPU topology or a deviceless GPU. Concrete arrays name their devices. Otherwise: the ambient mesh, then the
  default backend.
  """
  for x in arrays:
    mesh = getattr(getattr(getattr(x, 'aval', None), 'sharding', None), 'mesh', None)
    device = getattr(mesh, 'abstract_device', None)
    if device is not None:
      return _PLATFORM_ALIASES.get(device.platform, device.platform), device.device_kind
    try:  # a concrete array; a tracer has no devices
      concrete = next(iter(x.devices()))
    except Exception:  # pylint: disable=broad-except
      continue
    return _PLATFORM_ALIASES.get(concrete.platform, concrete.platform), concrete.device_kind
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None) or jax.devices()[0]
  return _PLATFORM_ALIASES.get(device.platform, device.platform), device.device_kind


def compile_platform(*arrays) -> str:
  """'tpu', 'gpu' or 'cpu': the platform of `compile_target`."""
  return compile_target(*arrays)[0]

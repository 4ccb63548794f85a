"""Ahead-of-time planning of the train step and of zero-shot inference (as MaxText's train_compile.py): the devices
to compile for, the compile, its memory and cost estimate, and the search for the largest per-device batch that fits.
Flag-free, so that tests, benchmarks and `python -m eva_clip_jax.plan` (which holds the flags and the printing) can
all call it.

Nothing is allocated: the trainer's state is `ShapeDtypeStruct`s carrying their shardings, the batch likewise, and
`jax.jit(...).lower(...).compile()` runs XLA up to buffer assignment and code generation, whose
`memory_analysis()` gives the bytes of arguments, outputs, donated (aliased) buffers and temporaries of one device's
program. The parameter and optimizer-state bytes come from the shardings' shard shapes, independently of XLA.

What is compiled is XLA's program for the devices of the mesh. `target_devices` makes them for an accelerator this
machine does not have: TPU chips of a slice (`jax.experimental.topologies` with libtpu: the real TPU compiler) or
NVIDIA GPUs from an XLA GPU device description (the CUDA plugin's compiler, deviceless: no autotuning). XLA:CPU
devices remain the fallback when neither compiler package is installed (`requirements-accel.txt`); launch/README.md
says how their accounting differs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from eva_clip_jax.errors import InputError
from eva_clip_jax.models import get_model_spec
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib

# Buffer assignment runs on the optimised HLO, before LLVM; these options only make LLVM's work cheaper (about half
# of a CPU compile) and leave every buffer as it was (tests/test_plan.py compares with a default compile).
FAST_COMPILE_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
GIB = 2**30

# HBM per chip (one JAX device: v4 and v5p run as megacore, two TensorCores per device), GiB, from Cloud TPU docs.
TPU_HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
# XLA's GPU device descriptions (openxla/xla target_config specs, Apache-2.0), which also give the memory size.
GPU_SPECS = {'h100': 'h100_sxm.txtpb', 'h200': 'h200.txtpb', 'a100': 'a100_sxm_80.txtpb'}
_GPU_SPEC_DIR = pathlib.Path(__file__).resolve().parents[1] / 'assets' / 'gpu_targets'
# Untuned Triton GEMM tiles can fail to compile without a GPU to autotune on; cuBLAS takes the matmuls instead.
GPU_XLA_FLAGS = '--xla_gpu_enable_triton_gemm=false'


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, what they are, and their memory per device."""
  kind: str  # 'tpu', 'gpu' or 'cpu'
  name: str  # 'v5p:4x4x4', 'h100 1x8x8', 'cpu'
  devices: tuple
  memory_bytes: int | None  # None: unknown (CPU)


def gpu_spec(gpu: str) -> str:
  if gpu not in GPU_SPECS:
    raise InputError(f'unknown GPU {gpu!r}; known: {sorted(GPU_SPECS)}')
  return (_GPU_SPEC_DIR / GPU_SPECS[gpu]).read_text()


def target_memory_bytes(gpu: str) -> int:
  """Device memory of a GPU in GPU_SPECS, from its XLA description."""
  return _memory_from_spec(gpu_spec(gpu))


def _memory_from_spec(spec: str) -> int:
  for line in spec.splitlines():
    key, _, value = line.strip().partition(':')
    if key == 'device_memory_size':
      return int(value)
  raise ValueError('GPU spec without device_memory_size')


def target_devices(kind: str, topology: str = '', gpu: str = 'h100', num_devices: int = 0) -> Target:
  """Devices of a TPU slice ('v5p:4x4x4'), of `gpu`s ('1x8x8': hosts x slices x GPUs per host) or XLA:CPU's.

  Compiling for TPU needs `jax[tpu]` (libtpu), for GPU `jax-cuda12-plugin` and `jax-cuda12-pjrt` with
  JAX_PLATFORMS=cpu (so that the plugin does not look for a GPU); neither needs the hardware.
  """
  import jax
  from jax.experimental import topologies
  if kind == 'cpu':
    devices = jax.devices('cpu')
    if num_devices > len(devices):
      raise InputError(f'{num_devices} CPU devices asked for, {len(devices)} exist: set jax_num_cpu_devices first')
    return Target('cpu', 'cpu', tuple(devices[:num_devices or len(devices)]), None)
  if kind == 'tpu':
    generation = topology.partition(':')[0]
    if generation not in TPU_HBM_GIB or ':' not in topology:
      raise InputError(f"TPU topology must be GENERATION:CHIPS with a generation in {sorted(TPU_HBM_GIB)}, e.g. "
                       f"'v5p:4x4x4' or 'v5e:4x4'; got {topology!r}")
    # v4's default is one device per TensorCore; JAX on a v4 VM runs megacore (one device per chip).
    extra = {'chip_config_name': 'megacore'} if generation == 'v4' else {}
    # libtpu takes a host-wide lock file at load, so a second process (a parallel test worker, a planner beside
    # a benchmark) would fail to compile; compiling opens no chip, so several loads are safe.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
      topo = topologies.get_topology_desc(platform='tpu', topology_name=topology, **extra)
    except Exception as e:  # no libtpu, or a shape the generation does not have
      raise RuntimeError(f'cannot make TPU topology {topology!r} (is jax[tpu] installed? '
                         f'pip install -r requirements-accel.txt): {e}') from e
    return Target('tpu', topology, tuple(topo.devices), TPU_HBM_GIB[generation] * GIB)
  if kind == 'gpu':
    spec = gpu_spec(gpu)
    if GPU_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
      raise RuntimeError(f'deviceless GPU compiles need XLA_FLAGS={GPU_XLA_FLAGS} set before jax starts')
    try:
      topo = topologies.get_topology_desc(platform='cuda', target_config=spec, topology=topology or '1x1x8')
    except Exception as e:
      raise RuntimeError(f'cannot make a {gpu} topology {topology!r} (are jax-cuda12-plugin and jax-cuda12-pjrt '
                         f'installed, JAX_PLATFORMS=cpu? pip install -r requirements-accel.txt): {e}') from e
    return Target('gpu', f'{gpu} {topology or "1x1x8"}', tuple(topo.devices), _memory_from_spec(spec))
  raise InputError(f"target must be 'tpu', 'gpu' or 'cpu', got {kind!r}")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of one compiled train step."""
  strategy: str
  remat: str
  mesh: Mapping[str, int]
  batch_per_device: int
  params: int  # from the shardings' shard shapes
  opt_state: int
  other_state: int  # step, rng, loss scale, skip count
  batch: int
  argument: int  # from XLA's memory_analysis(); state + batch
  output: int
  alias: int  # outputs written into donated arguments (the new state over the old)
  temp: int  # activations, gradients, collectives' buffers
  compile_seconds: float

  @property
  def total(self) -> int:
    """Peak bytes the step needs on a device: live arguments, outputs that do not reuse them, temporaries."""
    return self.argument + self.output - self.alias + self.temp


def shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of a tree of sharded arrays or ShapeDtypeStructs."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree))


def abstract_batch(config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  spec = get_model_spec(config.model.name)
  sharding = sharding_lib.batch_sharding(mesh)
  size, batch = spec.vision.image_size, config.batch_size
  return {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=sharding),  # as the input yields
          'text': jax.ShapeDtypeStruct((batch, spec.text.context_length), jnp.int32, sharding=sharding)}


def compile_train_step(config, mesh: Mesh, batch_per_device: int, *,
                       compiler_options: Mapping[str, Any] | None = FAST_COMPILE_OPTIONS):
  """(compiled step, MemoryEstimate) for `config` with `batch_per_device` samples on each data-parallel device."""
  config = copy.deepcopy(config)
  config.batch_size = batch_per_device * sharding_lib.data_parallel_size(mesh)
  setup = step_lib.make_setup(config, mesh)
  batch = abstract_batch(config, mesh)
  start = time.perf_counter()
  lowered = step_lib.make_train_step(setup).lower(setup.abstract_state, batch)
  if mesh.devices.flat[0].platform != 'cpu':
    compiler_options = None  # the fast options are XLA:CPU's (LLVM); TPU and GPU compilers reject them
  compiled = lowered.compile(compiler_options=dict(compiler_options) if compiler_options else None)
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  state = setup.abstract_state
  estimate = MemoryEstimate(
      strategy=config.sharding.strategy, remat=config.model.remat, mesh=dict(mesh.shape),
      batch_per_device=batch_per_device, params=shard_bytes(state.params),
      opt_state=shard_bytes(state.opt_state),
      other_state=shard_bytes((state.step, state.loss_scale, state.rng)),
      batch=shard_bytes(batch), argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
      alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes, compile_seconds=seconds)
  return compiled, estimate


def compile_encode(config, mesh: Mesh, batch_per_device: int, *,
                   compiler_options: Mapping[str, Any] | None = FAST_COMPILE_OPTIONS):
  """(compiled, MemoryEstimate) of zero-shot inference: the image tower's forward on `batch_per_device` images per
  data-parallel device, as the evaluators compile it (`FeatureExtractor.encode_image`: the training shardings and
  activation pinning, normalised features). Parameters are stored in config.model.param_dtype: pass bfloat16 for
  inference, where no float32 master copy is needed. The text tower runs once per class list, on far less."""
  from eva_clip_jax.evaluation.features import FeatureExtractor  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.batch_size = batch_per_device * sharding_lib.data_parallel_size(mesh)
  setup = step_lib.make_setup(config, mesh)
  pinned = lambda: sharding_lib.activation_sharding(mesh)
  extractor = FeatureExtractor(setup.model, mesh, setup.shardings.params, config.batch_size, pinned)
  size = get_model_spec(config.model.name).vision.image_size
  images = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=extractor.batch_sharding)
  start = time.perf_counter()
  lowered = extractor.encode_image.lower(setup.abstract_state.params, images)
  if mesh.devices.flat[0].platform != 'cpu':
    compiler_options = None
  compiled = lowered.compile(compiler_options=dict(compiler_options) if compiler_options else None)
  stats = compiled.memory_analysis()
  estimate = MemoryEstimate(
      strategy=config.sharding.strategy, remat=config.model.remat, mesh=dict(mesh.shape),
      batch_per_device=batch_per_device, params=shard_bytes(setup.abstract_state.params), opt_state=0,
      other_state=0, batch=shard_bytes(images), argument=stats.argument_size_in_bytes,
      output=stats.output_size_in_bytes, alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes,
      compile_seconds=time.perf_counter() - start)
  return compiled, estimate


MODES = ('train', 'encode')  # what plan_row plans (--mode): compile_train_step or compile_encode


_EXHAUSTED = re.compile(r'RESOURCE_EXHAUSTED: Ran out of memory.*?\(([0-9.]+)([KMGT])\)', re.S)


def exhausted_bytes(error: Exception) -> int | None:
  """What a compile refused for want of memory says it needed (the TPU compiler stops at the chip's HBM:
  'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required ... (144.00G) exceeds available HBM
  (95.74G)'); 0 when it gives no size; None when `error` is not one."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  found = _EXHAUSTED.search(text)
  return int(float(found[1]) * 2**(10 * 'KMGT'.index(found[2]) + 10)) if found else 0


def _granule(batch: int) -> int:
  """Search resolution: 1/16 of the batch, a power of two (answers read 1536 or 1472, not 1517)."""
  return max(1, 2 ** int(math.log2(max(batch, 1))) // 16)


def _line_guess(measured: Mapping[int, int], a: int, b: int, budget: int) -> int | None:
  """Just short of where the line through the measurements at batches `a` and `b` meets the budget: memory grows
  a little faster than linearly (the contrastive logits), and a guess that fits narrows the bracket from below."""
  slope = (measured[b] - measured[a]) / (b - a)
  return int(a + 0.97 * (budget - measured[a]) / slope) if slope > 0 else None


def largest_batch(measure: Callable[[int], int], budget: int, *, start: int = 16, limit: int = 1 << 16,
                  max_measurements: int = 5, multiple: int = 1) -> tuple[int, dict[int, int]]:
  """The largest per-device batch whose `measure` (bytes; a compile each) stays within `budget`, and the measurements.

  Activation memory grows about linearly with the batch, so each guess is where the line through two measurements
  meets the budget (the bracket's ends once one batch has failed), rounded down to the resolution; bisection takes
  over when a guess leaves the bracket. With one measurement the line goes through the origin instead: the fixed
  part is not negative, so from a batch that fits that guess is short of the answer (from 2048 for B/16 on v5p, 4096
  rather than a blind 4x). Typically 3 or 4 compiles. Every batch measured is a multiple of `multiple` (the step's
  micro-batches: step.micro_batches): the search runs in units of it. Returns 0 when `multiple` samples do not fit.
  """
  units, measured = _largest_units(lambda n: measure(n * multiple), budget, start=max(1, -(-start // multiple)),
                                   limit=max(1, limit // multiple), max_measurements=max_measurements)
  return units * multiple, {n * multiple: total for n, total in measured.items()}


def _largest_units(measure: Callable[[int], int], budget: int, *, start: int, limit: int,
                   max_measurements: int) -> tuple[int, dict[int, int]]:
  measured: dict[int, int] = {}

  def fits(batch: int) -> bool:
    if batch not in measured:
      measured[batch] = measure(batch)
    return measured[batch] <= budget

  def through_origin(batch: int) -> int:
    return int(0.97 * batch * budget / max(measured[batch], 1))

  batch, hi = start, None  # hi, once known, does not fit
  while not fits(batch):
    if batch == 1:
      return 0, measured
    # Down the line through the last two batches that did not fit, or through the origin after the first.
    guess = _line_guess(measured, batch, hi, budget) if hi is not None else through_origin(batch)
    guess = min(batch - 1, guess if guess is not None and guess > 0 else batch // 2)
    hi, batch = batch, max(1, guess - guess % _granule(guess))
  lo = batch  # fits
  while len(measured) < max_measurements and lo < limit:
    step = _granule(lo)
    if hi is not None and hi - lo <= step:
      break
    # The line through the bracket, else through lo and the measurement before it, else through the origin.
    other = hi if hi is not None else max((b for b in measured if b < lo), default=None)
    guess = _line_guess(measured, lo, other, budget) if other is not None else through_origin(lo)
    guess = min(guess if guess is not None else 2 * lo, 64 * lo, limit)
    guess -= guess % _granule(guess)
    if guess <= lo:
      guess = lo + step
    if hi is not None and guess >= hi:
      guess = (lo + hi) // 2
      guess -= guess % step
      if guess <= lo:
        break
    if fits(guess):
      lo = guess
    else:
      hi = guess
  return lo, measured


# ------------------------------------------------------------------------------------ one row of the plan

HEADER = (f"{'strategy':8} {'remat':13} {'mesh':16} {'params':>7} {'opt':>7} {'fixed':>7} {'MiB/smp':>8} "
          f"{'batch/dev':>9} {'global':>8} {'temp':>7} {'total':>7} {'fits':>4} {'compiles':>8}")


def _gib(n: float) -> str:
  return f'{n / 2**30:7.2f}'


def plan_row(config, mesh_config: dict, strategy: str, remat: str, *, budget: int, batch_per_device: int = 0,
             start: int = 16, limit: int = 1 << 16, max_compiles: int = 5, devices=None, mode: str = 'train') -> dict:
  """One strategy x remat: the estimate at the planned batch, and the line fitted through the compiles.

  devices: what to compile for (`target_devices(...).devices`); default: this process's JAX devices.
  mode: 'train' (the train step) or 'encode' (zero-shot inference, `compile_encode`)."""
  if mode not in MODES:
    raise InputError(f'mode must be one of {MODES}, got {mode!r}')
  compile_fn = compile_encode if mode == 'encode' else compile_train_step
  config = copy.deepcopy(config)
  config.sharding.strategy, config.model.remat = strategy, remat
  mesh_config = sharding_lib.strategy_mesh(mesh_config, strategy)
  multiple = step_lib.micro_batches(config)  # per-device batches the accumulation can split
  if batch_per_device % multiple:
    raise InputError(f'--batch_per_device={batch_per_device} does not split into config.accum_steps={multiple} '
                     'micro-batches: pass a multiple of it')
  num_devices = math.prod(mesh_config.values())
  mesh = sharding_lib.make_mesh(mesh_config, devices=list(devices or jax.devices())[:num_devices])
  estimates: dict[int, MemoryEstimate] = {}
  refused: dict[int, int] = {}  # batches the compiler refused for want of memory: what it said they need

  def measure(batch: int) -> int:
    try:
      estimates[batch] = compile_fn(config, mesh, batch)[1]
    except Exception as e:  # a JaxRuntimeError from XLA; all but a refusal for want of memory is raised again
      needed = exhausted_bytes(e)
      if needed is None:
        raise
      refused[batch] = max(needed, budget + 1)  # over the device's memory, so over the budget
      return refused[batch]
    return estimates[batch].total

  if batch_per_device:
    measure(batch_per_device)
    chosen = batch_per_device
  else:
    chosen, _ = largest_batch(measure, budget, start=start, limit=limit, max_measurements=max_compiles,
                                     multiple=multiple)
  if not estimates:
    raise RuntimeError(f'{strategy}, remat {remat}: the compiler refused every batch tried for want of memory '
                       f'(needed GiB: {", ".join(f"{b}: {n / 2**30:.1f}" for b, n in sorted(refused.items()))})')
  at = estimates[chosen] if chosen else estimates[min(estimates)]  # nothing fits: show the smallest batch tried
  per_sample = fixed = None
  others = sorted((b for b in estimates if b != at.batch_per_device), key=lambda b: abs(b - at.batch_per_device))
  if others:
    other = estimates[others[0]]
    per_sample = (other.total - at.total) / (other.batch_per_device - at.batch_per_device)
    fixed = at.total - per_sample * at.batch_per_device
  return {**dataclasses.asdict(at), 'total': at.total, 'mesh': sharding_lib.format_mesh(mesh_config),
          'global_batch': at.batch_per_device * sharding_lib.data_parallel_size(mesh), 'fits': at.total <= budget,
          'largest': chosen if not batch_per_device else None, 'budget': budget, 'per_sample': per_sample,
          'fixed': fixed, 'compiles': len(estimates) + len(refused),
          'measured': dict(sorted({**refused, **{b: e.total for b, e in estimates.items()}}.items())),
          'compile_seconds': sum(e.compile_seconds for e in estimates.values())}


def format_row(row: dict) -> str:
  per_sample = f"{row['per_sample'] / 2**20:8.1f}" if row['per_sample'] is not None else f"{'-':>8}"
  fixed = _gib(row['fixed']) if row['fixed'] is not None else f"{'-':>7}"
  batch = row['batch_per_device'] if row['largest'] is None or row['largest'] else 0  # not one sample fits
  return (f"{row['strategy']:8} {row['remat']:13} {row['mesh']:16} {_gib(row['params'])} {_gib(row['opt_state'])} "
          f"{fixed} {per_sample} {batch!s:>9} {row['global_batch']:8d} {_gib(row['temp'])} {_gib(row['total'])} "
          f"{'yes' if row['fits'] else 'no':>4} {row['compiles']:3d} ({row['compile_seconds']:3.0f}s)")

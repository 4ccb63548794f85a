"""The memory planner: its compile of abstract inputs is the real step's, its byte counts add up, its batch search
finds the largest fitting batch, and it plans B/16, L/14 and bigE/14 without allocating them."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import eva_clip_jax as ec

from eva_clip_jax.models import count_params, create_model, get_model_spec
from eva_clip_jax.training import planning
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name: str):
  spec = importlib.util.spec_from_file_location(f'configs_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _live_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays())


def test_plan_of_tiny_is_the_compiled_train_step():
  config = _config('tiny')
  config.sharding.strategy = 'zero1'
  mesh = sharding_lib.make_mesh({'data': 8})
  live = _live_bytes()
  _, planned = planning.compile_train_step(config, mesh, 4)
  assert _live_bytes() - live < planned.params / 10  # no parameters (or anything their size) were allocated

  # The shard shapes of the state and batch account for every argument byte XLA assigned.
  assert planned.params + planned.opt_state + planned.other_state + planned.batch == planned.argument
  n_params = count_params(create_model('tiny', abstract=True))
  assert planned.params == 4 * n_params  # zero1: float32 parameters, replicated
  assert planned.opt_state < planned.params  # ... and the two moments sharded 8 ways

  # The step the training loop runs, on real arrays, compiled with XLA's default options: the same buffers.
  config.batch_size = 4 * 8
  setup = step_lib.make_setup(config, mesh)
  # Values do not change buffers: zeros placed like init_state's output (its compile would add 10 s here).
  state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), setup.abstract_state)
  spec = get_model_spec('tiny')
  rng = np.random.default_rng(0)
  size, length = spec.vision.image_size, spec.text.context_length
  batch = step_lib.device_batch({'image': rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8),  # as the input
                                 'text': rng.integers(1, 100, (32, length)).astype(np.int32)}, mesh)
  stats = step_lib.make_train_step(setup).lower(state, batch).compile().memory_analysis()
  assert (stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
          stats.temp_size_in_bytes) == (planned.argument, planned.output, planned.alias, planned.temp)


def test_encode_plan_is_the_evaluators_compiled_image_tower():
  """mode='encode' compiles what zero-shot scoring runs per batch: the extractor's image tower, parameters in
  config.model.param_dtype (bfloat16 halves them), no optimizer state; its buffers are the real extractor's."""
  from eva_clip_jax.evaluation.features import FeatureExtractor
  config = _config('tiny')
  config.model.param_dtype = 'bfloat16'
  mesh = sharding_lib.make_mesh({'data': 8})
  _, planned = planning.compile_encode(config, mesh, 4)
  counts = ec.param_counts(create_model('tiny', abstract=True))
  # bf16 (the float32 logit scale aside), replicated under the recipe's zero1; no optimizer state.
  assert planned.params == 2 * (counts['total'] - 1) + 4 and planned.opt_state == 0
  assert planned.argument == 2 * counts['visual'] + planned.batch  # XLA drops the text tower: not an argument
  config.batch_size = 32
  setup = step_lib.make_setup(config, mesh)
  params = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), setup.abstract_state.params)
  extractor = FeatureExtractor(setup.model, mesh, setup.shardings.params, 32,
                               lambda: sharding_lib.activation_sharding(mesh))
  images = np.zeros((32, 64, 64, 3), np.float32)
  stats = extractor.encode_image.lower(params, jax.device_put(images, extractor.batch_sharding)).compile(
  ).memory_analysis()
  assert (stats.argument_size_in_bytes, stats.temp_size_in_bytes) == (planned.argument, planned.temp)
  row = planning.plan_row(config, {'data': 8}, 'zero1', 'none', budget=2**30, batch_per_device=4, mode='encode')
  assert row['opt_state'] == 0 and row['total'] == planned.total


def test_fsdp_activations_stay_batch_sharded(capfd):
  """fsdp shards the weights, not the activations: bytes per sample equal zero1's (the model pins the residual
  stream to the batch axes; without that XLA spread the weights' sharding into it and fsdp needed 4.6x), and no
  activation is replicated to reach a weight's layout (XLA warns of that on stderr: the token embedding's gradient
  did it until the table was gathered where it is used)."""
  per_sample = {}
  for strategy, mesh_config in (('zero1', {'data': 8}), ('fsdp', {'fsdp': 8}), ('fsdp', {'data': 2, 'fsdp': 4})):
    config = _config('tiny')
    config.sharding.strategy = strategy
    mesh = sharding_lib.make_mesh(mesh_config)
    small, large = (planning.compile_train_step(config, mesh, b)[1].temp for b in (8, 16))
    per_sample[strategy, sharding_lib.format_mesh(mesh.shape)] = (large - small) / 8
  zero1 = per_sample['zero1', 'data:8']
  # Within 25%: the failure this guards against is the 4.6x of activations inheriting the weights' sharding. The
  # rest is XLA:CPU fusing differently per strategy: measured zero1 1.07-1.14 MB and fsdp 1.17-1.22 MB per sample
  # with uint8 input and 16-bit attention probabilities (with float32 input and scores both were 1.35 MB).
  # That gap is heap packing, not bytes fsdp keeps (analysed 2026-12-01, XLA dumps of batch 16): the temporaries'
  # batch-shaped values are the same shapes and dtypes under both (51.92 vs 51.93 MB summed, none of the global
  # batch), but fsdp's fixed temporaries (the gathered f32[49408, 64] token table, 12.6 MB, live beside the 12.6 MB
  # scatter-add buffer of its gradient) change where activations fit. From batch 16 on fsdp grows slower: MB per
  # sample 16->32 zero1 1.40, fsdp 1.25; 32->64 zero1 1.51, fsdp 1.41 (temp at 64: 108.0 vs 114.5 MB).
  assert all(value < 1.25 * zero1 for value in per_sample.values()), per_sample
  assert 'Involuntary full rematerialization' not in capfd.readouterr().err


@pytest.mark.parametrize('fixed,per_sample,quadratic,budget', [
    (1e9, 4e8, 0.0, 72e9),  # B/16-like: fits ~177 per device
    (16e6, 1.5e6, 150.0, 0.9e9),  # tiny-like: the contrastive logits grow with batch^2
    (2e9, 3e6, 0.0, 70e9),  # thousands per device
])
def test_search_finds_the_largest_batch_that_fits(fixed, per_sample, quadratic, budget):
  calls = []

  def cost(batch):
    return int(fixed + per_sample * batch + quadratic * batch * batch)

  def measure(batch):
    calls.append(batch)
    return cost(batch)

  found, measured = planning.largest_batch(measure, int(budget), max_measurements=6)
  edge = max(b for b in range(1, 1 << 16) if cost(b) <= budget)
  assert cost(found) <= budget
  assert edge - found <= planning._granule(edge)  # pylint: disable=protected-access
  assert len(set(calls)) == len(measured) <= 6


@pytest.mark.parametrize('fixed,per_sample,budget', [
    (1.5 * 2**30, 19.6 * 2**20, 85.5 * 2**30),  # B/16 on a v5p chip: thousands fit
    (1e9, 4e8, 72e9),  # 177 fit: the larger starts do not
])
@pytest.mark.parametrize('start', [256, 1024, 2048, 4096])
def test_search_needs_three_compiles_on_a_line(fixed, per_sample, budget, start):
  """One measurement already gives a guess (the line through the origin, up or down), so the third compile lands
  within the resolution of the edge, from below or above the answer (no blind 4x stride, no run of halvings)."""
  def cost(batch):
    return int(fixed + per_sample * batch)

  found, measured = planning.largest_batch(cost, int(budget), start=start, max_measurements=3)
  edge = max(b for b in range(1, 1 << 16) if cost(b) <= budget)
  assert len(measured) <= 3 and cost(found) <= budget
  assert edge - found <= planning._granule(edge), measured  # pylint: disable=protected-access


def test_a_batch_the_compiler_refuses_counts_as_not_fitting(monkeypatch):
  """A TPU compile over the chip's HBM raises (RESOURCE_EXHAUSTED); the search takes that batch as too large and
  goes on, and the row lists it with the size the compiler said it needed."""

  def compile_train_step(config, mesh, batch):
    total = 2**30 + batch * 2**20
    if total > 8 * 2**30:
      raise RuntimeError(f'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
                         f'temporaries ({total / 2**30:.2f}G) exceeds available HBM (8.00G).')
    return None, planning.MemoryEstimate('zero1', 'full', dict(mesh.shape), batch, 0, 0, 0, 0, 0, 0, 0, total, 1.0)

  monkeypatch.setattr(planning, 'compile_train_step', compile_train_step)
  row = planning.plan_row(_config('tiny'), {'data': 8}, 'zero1', 'full', budget=6 * 2**30, start=16384, max_compiles=4)
  assert row['largest'] == 5120 and row['fits'], row['measured']  # (6 GiB - 1 GiB) / 1 MiB = 5120
  assert row['measured'][16384] == 17 * 2**30 and row['compiles'] == len(row['measured'])
  with pytest.raises(RuntimeError, match='refused every batch'):
    planning.plan_row(_config('tiny'), {'data': 8}, 'zero1', 'full', budget=6 * 2**30, batch_per_device=16384)


def test_search_when_nothing_fits_or_everything_does():
  assert planning.largest_batch(lambda b: 10 + b, 5)[0] == 0
  assert planning.largest_batch(lambda b: 1 + b, 10, start=16)[0] == 9  # halving, then up again
  assert planning.largest_batch(lambda b: b, 10**9, limit=4096, max_measurements=8)[0] == 4096


@pytest.mark.parametrize('multiple', [3, 4, 6])
def test_search_steps_in_multiples_of_the_micro_batches(multiple):
  def cost(batch):
    return int(16e6 + 1.5e6 * batch + 150.0 * batch * batch)

  found, measured = planning.largest_batch(cost, int(0.9e9), max_measurements=6, multiple=multiple)
  assert all(b % multiple == 0 for b in measured) and found % multiple == 0 and cost(found) <= 0.9e9
  edge = max(b for b in range(multiple, 1 << 16, multiple) if cost(b) <= 0.9e9)
  assert edge - found <= multiple * planning._granule(edge // multiple)  # pylint: disable=protected-access
  # One sample would fit, `multiple` samples do not: nothing the step can split fits.
  found, measured = planning.largest_batch(lambda b: 10 + b, 12, multiple=4)
  assert found == 0 and min(measured) == 4 and all(b % 4 == 0 for b in measured), measured
  assert planning.largest_batch(lambda b: 10 + b, 12)[0] == 2


def test_plan_of_an_accumulating_config_compiles_only_batches_it_can_split():
  """accum_steps=3: the search's first batch, 16, becomes 18 (16 does not split into 3 micro-batches; the step
  would refuse it), and an explicit --batch_per_device that does not split is refused before compiling."""
  config = _config('tiny')
  config.accum_steps = 3
  row = planning.plan_row(config, {'data': 8}, 'zero1', 'none', budget=1 << 40, start=16, limit=20)
  assert row['measured'].keys() == {18} and row['largest'] == 18 and row['global_batch'] == 18 * 8
  with pytest.raises(ValueError, match='--batch_per_device=16 does not split into config.accum_steps=3'):
    planning.plan_row(config, {'data': 8}, 'zero1', 'none', budget=1 << 40, batch_per_device=16)


def test_mesh_specs():
  assert sharding_lib.parse_mesh('data:8,fsdp:4') == {'data': 8, 'fsdp': 4, 'tensor': 1}
  assert sharding_lib.strategy_mesh({'data': 64, 'fsdp': 1, 'tensor': 1}, 'fsdp') == {'data': 1, 'fsdp': 64, 'tensor': 1}
  assert sharding_lib.strategy_mesh({'data': 64, 'fsdp': 1, 'tensor': 1}, 'zero1')['data'] == 64
  assert sharding_lib.format_mesh({'data': 1, 'fsdp': 64, 'tensor': 1}) == 'fsdp:64'
  with pytest.raises(ValueError, match='bad mesh entry'):
    sharding_lib.parse_mesh('pipeline:4')


@pytest.mark.parametrize('name,mesh,strategy,remat', [
    ('b16', 'data:16', 'zero1', 'none'),
    ('l14', 'data:16', 'zero1', 'full'),
    ('e14', 'fsdp:16', 'fsdp', 'full'),
])
def test_big_models_are_planned_without_being_allocated(tmp_path, name, mesh, strategy, remat):
  out = tmp_path / 'plan.json'
  peak_file = tmp_path / 'peak'
  argv = ['plan', f'--config=configs/{name}.py', f'--mesh={mesh}', f'--strategies={strategy}', f'--remat={remat}',
          '--batch_per_device=8', f'--json={out}']
  # The child reports its own high-water mark (VmHWM of its address space) at exit. Not wait4's ru_maxrss: Linux
  # folds the parent's RSS at fork/vfork time into the child's, so that reads the pytest worker's size.
  runner = (f'import atexit, runpy, sys, pathlib; sys.argv = {argv!r}\n'
            'def report():\n'
            '  line = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]\n'
            f'  pathlib.Path({str(peak_file)!r}).write_text(str(int(line.split()[1]) * 1024))\n'
            'atexit.register(report)\n'
            'runpy.run_module("eva_clip_jax.plan", run_name="__main__")\n')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  process = subprocess.run([sys.executable, '-c', runner], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
  output, status = process.stdout.decode(), process.returncode
  assert status == 0, output[-3000:]
  row, = json.loads(out.read_text())
  assert row['params'] + row['opt_state'] + row['other_state'] + row['batch'] == row['argument']
  n_params = count_params(create_model(_config(name).model.name, abstract=True))
  devices = math.prod(sharding_lib.parse_mesh(mesh).values())
  if strategy == 'zero1':
    assert row['params'] == 4 * n_params
  else:
    assert row['params'] < 1.05 * 4 * n_params / devices  # fsdp: sharded 16 ways, but for small leaves
  # Allocated on 16 CPU devices the state alone would take argument x 16 bytes of host memory (11-56 GB).
  peak = int(peak_file.read_text())
  assert peak < min(3 * 2**30, row['argument'] * devices / 4), (peak, row)

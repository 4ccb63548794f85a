"""The real TPU and GPU compilers, on this CPU host: the flash-attention kernels and the tiny model's train step
compile (not interpret) for a TPU slice (libtpu, `jax.experimental.topologies`) and for 8 H100s (the CUDA plugin's
compiler, deviceless), and the attention backends pick their kernels from the compile target, not jax.devices().

Needs requirements-accel.txt; without it the tests skip, unless EVA_REQUIRE_ACCEL=1 (CI sets it) makes that a failure.
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_clip_jax import ops
from eva_clip_jax.ops.experimental import mosaic_attention
from eva_clip_jax.models import rope as rope_lib
from eva_clip_jax.training import planning
from eva_clip_jax import sharding as sharding_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRITON, MOSAIC, CUDNN, MOSAIC_GPU = '__gpu$xla.gpu.triton', 'tpu_custom_call', '__cudnn$fmha', 'mosaic_gpu_v2'


def _require(module: str, what: str):
  if importlib.util.find_spec(module) is None:
    if os.environ.get('EVA_REQUIRE_ACCEL') == '1':
      pytest.fail(f'{what} is not installed (pip install -r requirements-accel.txt)')
    pytest.skip(f'{what} is not installed (requirements-accel.txt)')


@pytest.fixture(scope='module')
def tpu():
  _require('libtpu', 'libtpu (jax[tpu])')
  return planning.target_devices('tpu', 'v5e:2x2')


@pytest.fixture(scope='module')
def h100():
  _require('jax_cuda12_plugin', 'jax-cuda12-plugin')
  return planning.target_devices('gpu', '1x1x8', 'h100')


def _custom_calls(compiled) -> list[str]:
  return re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())


def _kernel_step(target, head_dim, seq, *, causal=False, with_rope=True, backend='pallas_flash', batch=2):
  """Forward + backward of attention over [batch, seq, 2, head_dim] bf16 inputs on one device of `target`."""
  sharding = NamedSharding(jax.sharding.Mesh(target.devices[:1], ('data',)), P())
  spec = jax.ShapeDtypeStruct((batch, seq, 2, head_dim), jnp.bfloat16, sharding=sharding)
  rope = None
  if with_rope:  # the vision tower's shared tables for 1 + grid^2 tokens
    rope = tuple(jnp.asarray(t) for t in rope_lib.rope_2d_tables(head_dim, int(round((seq - 1) ** 0.5))))

  def loss(q, k, v):
    return jnp.sum(ops.dot_product_attention(q, k, v, causal=causal, rope=rope, backend=backend).astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()


# EVA's head dims: 64 (B/16, L/14), 88 (g/14), 112 (bigE/14); ViT lengths 1 + grid^2 (B/16 at 224: 197).
# The flash kernels ('pallas_flash': forward, dq, dk/dv: three calls) on TPU and GPU; on TPU head dim 64 also the
# whole-sequence kernel ('pallas_tpu': forward, backward: two). None is interpreted (an interpreted kernel has no
# custom call).
@pytest.mark.parametrize('head_dim,seq', [(64, 197), (88, 257), (112, 50)])
def test_attention_kernels_compile_for_tpu_and_sm90(tpu, h100, head_dim, seq):
  cases = [(tpu, 'pallas_flash', MOSAIC, 3), (h100, 'pallas_flash', TRITON, 3)]
  if head_dim == 64:
    cases.append((tpu, 'pallas_tpu', MOSAIC, 2))
  for target, backend, call, kernels in cases:
    # batch 8: the whole-sequence kernel's smallest per-device batch (its blocks' sublane dimension)
    calls = _custom_calls(_kernel_step(target, head_dim, seq, batch=8, backend=backend))
    assert calls.count(call) == kernels, (target.name, backend)


def test_causal_attention_kernels_compile(tpu, h100):
  for target, backend, call, kernels in ((tpu, 'pallas_tpu', MOSAIC, 2), (tpu, 'pallas_flash', MOSAIC, 3),
                                         (h100, 'pallas_flash', TRITON, 3)):
    calls = _custom_calls(_kernel_step(target, 64, 77, causal=True, with_rope=False, batch=8, backend=backend))
    assert calls.count(call) == kernels, (target.name, backend)


def test_whole_sequence_tpu_kernel_compiles_per_device_on_a_slice(tpu):
  # B/16's 50%-masked vision attention (99 tokens, 12 heads of 64, per-sample RoPE tables) and L/14's 257 tokens,
  # batch-sharded over the slice's 4 chips: the seam runs the kernel per device in a shard_map, one call each way.
  mesh = jax.sharding.Mesh(tpu.devices, ('data',))
  for seq, heads in ((99, 12), (257, 16)):
    spec = jax.ShapeDtypeStruct((32, seq, heads, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P('data')))
    grid = 14 if seq == 99 else 16
    cos, sin = (jnp.asarray(t) for t in rope_lib.rope_2d_tables(64, grid))
    keep = jnp.tile(jnp.arange(seq - 1), (32, 1))

    def loss(q, k, v, keep=keep, cos=cos, sin=sin):
      out = ops.dot_product_attention(q, k, v, rope=(cos[keep], sin[keep]), backend='pallas_tpu')
      return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    assert _custom_calls(compiled).count(MOSAIC) == 2
    # No score matrix in HBM: the temporaries stay below one float32 [8, heads, seq, seq] block per device.
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * 8 * heads * seq * seq


@pytest.mark.parametrize('head_dim,seq,causal', [(64, 197, False), (88, 257, False), (112, 50, False),
                                                 (64, 77, True)])
def test_cudnn_attention_compiles_for_h100(h100, head_dim, seq, causal):
  # cuDNN's fused attention, forward and backward, at odd ViT lengths (no mask) and the causal text tower.
  calls = _custom_calls(_kernel_step(h100, head_dim, seq, causal=causal, with_rope=False, backend='cudnn'))
  assert sum(c.startswith(CUDNN) for c in calls) >= 2, calls  # forward and backward fused-attention calls


def test_auto_is_cudnn_on_gpu_the_tpu_kernel_on_tpu_and_xla_elsewhere(tpu, h100):
  calls = _custom_calls(_kernel_step(h100, 64, 197, with_rope=False, backend='auto'))
  assert any(c.startswith(CUDNN) for c in calls), calls
  assert _custom_calls(_kernel_step(tpu, 64, 197, with_rope=False, backend='auto', batch=8)).count(MOSAIC) == 2
  assert not _custom_calls(_kernel_step(tpu, 88, 197, with_rope=False, backend='auto', batch=8))  # no packing: XLA
  assert not _custom_calls(_kernel_step(tpu, 64, 197, with_rope=False, backend='auto'))  # 2 sequences: XLA
  spec = jax.ShapeDtypeStruct((2, 197, 2, 64), jnp.float32)
  assert ops.attention.resolve('auto', jnp.zeros(spec.shape, jnp.bfloat16)).name == 'xla'  # CPU
  with pytest.raises(ValueError, match="compiled for 'tpu'"):
    _kernel_step(tpu, 64, 197, with_rope=False, backend='cudnn')


def _require_tokamax():
  # Not in requirements-accel.txt (issue 12: only once measured faster than cuDNN), so never a CI failure.
  if not mosaic_attention.tokamax_available():
    pytest.skip(f'tokamax is not installed ({mosaic_attention._INSTALL}); the mosaic backend is optional')


# The Mosaic GPU kernels cannot run here: Pallas' Mosaic GPU interpreter (jax 0.10.2) lacks `run_state`, which both
# jax's and tokamax's kernels use. So these tests check what compiles, not numerics (benchmarks/gpu_check.py does,
# against 'xla', on a GPU).
@pytest.mark.parametrize('head_dim,seq,causal,devices', [(64, 197, False, 1), (64, 99, False, 8), (88, 257, False, 1),
                                                         (64, 77, True, 1)])
def test_mosaic_attention_compiles_for_h100(h100, head_dim, seq, causal, devices):
  """tokamax's Mosaic GPU flash attention, forward and backward (dq, dk/dv), bf16, odd ViT lengths and causal text,
  per device in a shard_map on a mesh of 8."""
  _require_tokamax()
  mesh = jax.sharding.Mesh(h100.devices[:devices], ('data',))
  spec = jax.ShapeDtypeStruct((2 * devices, seq, 2, head_dim), jnp.bfloat16, sharding=NamedSharding(mesh, P('data')))
  loss = lambda q, k, v: jnp.sum(ops.dot_product_attention(q, k, v, causal=causal, backend='mosaic').astype(
      jnp.float32))
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
  assert _custom_calls(compiled).count(MOSAIC_GPU) == 3, _custom_calls(compiled)


def test_mosaic_backend_errors_name_the_problem(tpu, h100):
  q = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU.*compiled for 'cpu'"):
    ops.dot_product_attention(q, q, q, backend='mosaic')
  with pytest.raises(ValueError, match="compiled for 'tpu'"):
    _kernel_step(tpu, 64, 197, with_rope=False, backend='mosaic')
  a100 = planning.target_devices('gpu', '1x1x1', 'a100')
  with pytest.raises(ValueError, match='Hopper GPUs only'):
    _kernel_step(a100, 64, 197, with_rope=False, backend='mosaic')
  sharding = NamedSharding(jax.sharding.Mesh(h100.devices[:1], ('data',)), P())
  f32 = jax.ShapeDtypeStruct((2, 197, 2, 64), jnp.float32, sharding=sharding)
  with pytest.raises(ValueError, match='bfloat16 and float16 only'):
    jax.jit(lambda q: ops.dot_product_attention(q, q, q, backend='mosaic')).lower(f32)
  if not mosaic_attention.tokamax_available():  # CI: the message says how to get the kernel
    with pytest.raises(ValueError, match=r'tokamax is not installed: pip install tokamax==0\.0\.12'):
      _kernel_step(h100, 64, 197, with_rope=False, backend='mosaic')


def test_jax_mosaic_gpu_attention_takes_float16_only(h100):
  """Why 'mosaic' runs tokamax's kernel: jax's own Mosaic GPU flash attention (0.10.2) compiles for an H100 in
  float16, forward and backward, at lengths that are multiples of its blocks, and fails on bfloat16 (its shared
  memory is declared float16). It has no mask either, so EVA's 197 tokens cannot be padded exactly. When a jax
  upgrade makes bfloat16 work, this test fails: then 'mosaic' may not need tokamax."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  config = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, block_q_dkv=64,
                                       block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
  sharding = NamedSharding(jax.sharding.Mesh(h100.devices[:1], ('data',)), P())
  loss = lambda q, k, v: jnp.sum(attention_mgpu.attention(q, k, v, config).astype(jnp.float32))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  f16 = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float16, sharding=sharding)
  assert _custom_calls(grad.lower(f16, f16, f16).compile()).count(MOSAIC_GPU) == 3
  bf16 = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16, sharding=sharding)
  with pytest.raises(ValueError, match='Mixed input dtypes'):
    grad.lower(bf16, bf16, bf16)


def _tiny_config(attention: str):
  spec = importlib.util.spec_from_file_location('configs_tiny', ROOT / 'configs' / 'tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.attention, config.model.dtype = attention, 'bfloat16'
  config.sharding.strategy = 'zero1'
  return config


@pytest.mark.parametrize('attention', ['xla', 'pallas_flash'])
def test_tiny_train_step_compiles_for_a_tpu_slice(tpu, attention):
  mesh = sharding_lib.make_mesh({'data': len(tpu.devices)}, devices=tpu.devices)
  compiled, estimate = planning.compile_train_step(_tiny_config(attention), mesh, 4)
  assert 0 < estimate.total < 2**30
  kernels = _custom_calls(compiled).count(MOSAIC)
  # pallas_flash: fused-RoPE vision attention and causal text attention, forward + dq + dk/dv each, one per scan body
  # (the tiny model's head dim 32 and 2 heads do not fill the whole-sequence kernel's 128 lanes)
  assert kernels == (6 if attention == 'pallas_flash' else 0), kernels


@pytest.mark.parametrize('attention', ['xla', 'pallas_flash', 'cudnn', 'mosaic'])
def test_tiny_train_step_compiles_for_8_h100s(h100, attention):
  if attention == 'mosaic':
    _require_tokamax()
  mesh = sharding_lib.make_mesh({'data': 8}, devices=h100.devices)
  compiled, estimate = planning.compile_train_step(_tiny_config(attention), mesh, 4)
  assert 0 < estimate.total < 2**30
  calls = _custom_calls(compiled)
  assert calls.count(TRITON) == (6 if attention == 'pallas_flash' else 0), calls
  assert any(c.startswith(CUDNN) for c in calls) == (attention == 'cudnn'), calls
  # mosaic: vision and causal text attention, forward + dq + dk/dv each, one per scan body
  assert calls.count(MOSAIC_GPU) == (6 if attention == 'mosaic' else 0), calls


@pytest.mark.parametrize('target_args,kind', [(['--target=tpu', '--topology=v5e:2x2'], 'TPU v5 lite'),
                                              (['--target=gpu', '--gpu=h200', '--topology=1x1x2'], 'H200')])
def test_planner_command_line_compiles_for_the_target(tmp_path, target_args, kind):
  if 'tpu' in target_args[0]:
    _require('libtpu', 'libtpu (jax[tpu])')
  else:
    _require('jax_cuda12_plugin', 'jax-cuda12-plugin')
  out = tmp_path / 'plan.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # --target=gpu sets its flag itself (re-exec)
  proc = subprocess.run([sys.executable, '-m', 'eva_clip_jax.plan', '--config=configs/tiny.py', *target_args,
                         '--strategies=zero1', '--remat=none', '--batch_per_device=4', f'--json={out}'], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert kind in proc.stdout and 'XLA:CPU' not in proc.stdout, proc.stdout
  row, = json.loads(out.read_text())
  budget = (16 if kind == 'TPU v5 lite' else 151397597184 / 2**30) * 0.9 * 2**30
  assert row['budget'] == int(budget) and row['fits'] and row['params'] > 0


def test_bad_targets_are_clear_errors():
  with pytest.raises(ValueError, match='GENERATION:CHIPS'):
    planning.target_devices('tpu', 'v9:2x2')
  with pytest.raises(ValueError, match='unknown GPU'):
    planning.gpu_spec('b200')
  with pytest.raises(ValueError, match="'tpu', 'gpu' or 'cpu'"):
    planning.target_devices('npu')


def test_a_program_over_the_chips_memory_is_refused_with_its_size(tpu):
  """The TPU compiler stops at the chip's HBM (16 GiB on v5e): planning.exhausted_bytes reads what it needed, so the
  planner's search takes such a batch as one that does not fit (tests/test_plan.py) instead of crashing."""
  sharding = NamedSharding(jax.sharding.Mesh(tpu.devices[:1], ('x',)), P())
  x = jax.ShapeDtypeStruct((1 << 15, 1 << 15), jnp.float32, sharding=sharding)  # 4 GiB in, 5 x 4 GiB out
  with pytest.raises(Exception) as error:
    jax.jit(lambda a: [a * i + 1 for i in range(5)]).lower(x).compile()
  needed = planning.exhausted_bytes(error.value)
  assert 16 * 2**30 < needed <= 25 * 2**30, str(error.value)
  assert planning.exhausted_bytes(ValueError('bad shape')) is None


def test_xla_attention_stores_16_bit_probabilities_only(h100):
  # bf16 compute: the backward reuses the bf16 probabilities the second matmul keeps, not a float32 softmax output
  # (which stored every [batch, heads, q, k] score matrix twice, 6 bytes per element; ops.attention._softmax_to).
  # Three scanned layers, so that what the backward keeps is a stacked [3, batch, heads, q, k] residual.
  sharding = NamedSharding(jax.sharding.Mesh(h100.devices[:1], ('data',)), P())
  x = jax.ShapeDtypeStruct((2, 197, 2, 64), jnp.bfloat16, sharding=sharding)

  def loss(x):
    body = lambda h, _: (ops.dot_product_attention(h, h, h, backend='xla') * 1.01, None)
    return jnp.sum(jax.lax.scan(body, x, None, length=3)[0].astype(jnp.float32))

  text = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
  assert 'bf16[3,2,2,197,197]' in text and 'f32[3,2,2,197,197]' not in text


def test_tpu_estimate_benchmark_runs_on_the_tiny_model():
  """benchmarks/tpu_estimate.py at toy settings: one row of the TPU compiler's estimate, numbers that parse."""
  _require('libtpu', 'the TPU compiler (libtpu)')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, 'benchmarks/tpu_estimate.py', '--model=tiny', '--batch_per_chip=8',
                         '--masks=0.5', '--attention=xla', '--remat=none', '--topology=v5p:2x2x1'],
                        capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1], env=env,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split() for line in proc.stdout.splitlines() if line.startswith('tiny')]
  assert len(rows) == 1
  step_ms, samples, mfu = float(rows[0][4]), float(rows[0][5]), float(rows[0][6].rstrip('%'))
  assert step_ms > 0 and samples > 0 and 0 < mfu < 100
  # --blocks: one block per tower, and the vision block without attention or MLP; leaving a part out saves time
  proc = subprocess.run([sys.executable, 'benchmarks/tpu_estimate.py', '--model=tiny', '--batch_per_chip=8',
                         '--masks=0.5', '--attention=xla', '--blocks', '--topology=v5p:2x2x1'],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ms = {tuple(line.split()[:3]): float(line.split('tokens:')[1].split()[0]) for line in proc.stdout.splitlines()
        if line.startswith(('vision', 'text'))}
  assert set(ms) == {('vision', 'block', 'xla'), ('vision', 'no', 'attention'), ('vision', 'no', 'MLP'),
                     ('text', 'block', 'xla')}, ms
  assert 0 < ms[('vision', 'no', 'attention')] < ms[('vision', 'block', 'xla')]
  assert 0 < ms[('vision', 'no', 'MLP')] < ms[('vision', 'block', 'xla')]


def test_attention_benchmark_compiles_deviceless_for_h100():
  """benchmarks/attention.py --deviceless: what compiles for an H100 and its bytes, one small case."""
  _require('jax_cuda12_plugin', 'jax-cuda12-plugin')
  # This tree's package, whatever the interpreter has installed.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': planning.GPU_XLA_FLAGS, 'PYTHONPATH': str(ROOT)}
  proc = subprocess.run([sys.executable, 'benchmarks/attention.py', '--deviceless=h100', '--cases=B/16 50% masked',
                         '--batch_size=2', '--backends=cudnn,mosaic'], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [[c.strip() for c in line.split('|')[1:-1]] for line in proc.stdout.splitlines()
          if line.startswith('| B/16 50% masked |')]
  cudnn = [r for r in rows if r[1] == 'cudnn']
  assert [r[2] for r in cudnn] == ['fwd', 'fwd+bwd'] and all(r[3] == 'yes' and float(r[4]) > 0 for r in cudnn), rows
  assert 'fmhaSoftmaxBackward' in cudnn[1][6], rows
  mosaic = [r for r in rows if r[1] == 'mosaic']
  if mosaic_attention.tokamax_available():
    assert [r[3] for r in mosaic] == ['yes', 'yes'] and 'mosaic_gpu_v2' in mosaic[1][6], rows
  else:
    assert len(mosaic) == 1 and 'tokamax is not installed' in mosaic[0][3], rows

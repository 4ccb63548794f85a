"""The benchmarks (written for GPUs) run on CPU at toy settings and print tables that parse. No timing is asserted."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
  # No timing is checked, so XLA:CPU may skip LLVM's optimisations: the tiny train step compiles ~2x faster.
  flags = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
  proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _table(stdout, header_start):
  """Rows of the markdown table whose header starts with `header_start`, as lists of stripped cells."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      continue
    rows.append([cell.strip() for cell in line.strip('|').split('|')])
  return [cell.strip() for cell in lines[start].strip('|').split('|')], rows


def test_attention_benchmark_on_cpu():
  out = _run('attention.py', '--batch_size=1', '--iters=1', '--repeats=1', '--dtype=float32',
             '--cases=B/16 50% masked', '--backends=pallas_flash')  # per-sample RoPE tables, fused in the kernel
  header, rows = _table(out, '| case |')
  assert len(rows) == 2 * 2  # backends x (fwd, fwd+bwd)
  for row in rows:
    cell = dict(zip(header, row))
    assert float(cell['ms']) > 0 and float(cell['TFLOP/s']) > 0
    if cell['backend'] == 'pallas_flash':  # the interpreted kernel, fused RoPE included, agrees with XLA
      assert float(cell['err vs xla']) < 1e-4
  assert {r[header.index('pass')] for r in rows} == {'fwd', 'fwd+bwd'}


def test_train_step_benchmark_on_cpu():
  # One process for both frameworks (--noisolate) keeps this quick; the subprocess path is the same code.
  out = _run('train_step.py', '--model=tiny', '--batch_size=8', '--steps=1', '--warmup=1', '--dtype=float32',
             '--masks=0.5', '--noisolate')
  header, rows = _table(out, '| framework |')
  assert [r[0].split()[0] for r in rows] == ['jax', 'torch']
  for row in rows:
    cell = dict(zip(header, row))
    assert float(cell['samples/s']) > 0 and float(cell['step ms']) > 0 and float(cell['memory GiB']) > 0
    assert cell['MFU'].endswith('%') and 'measured matmul' in cell['peak']
  assert 'jax/torch samples/s ratio' in out


def test_encode_benchmark_on_cpu():
  out = _run('encode.py', '--model=tiny', '--batch_size=2', '--iters=1')
  lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(('jax ', 'torch '))}
  assert set(lines) == {'jax', 'torch'}
  for line in lines.values():
    assert float(line.split('images/s')[0].split()[-1]) > 0
  assert float(out.split('jax/torch throughput ratio:')[1].split()[0]) > 0
  compile_out = _run('encode.py', '--model=tiny', '--batch_size=1', '--compile_only')
  assert [line.split()[0] for line in compile_out.splitlines() if line.startswith('scan_layers')] == \
      ['scan_layers=True', 'scan_layers=False']


def test_host_overhead_benchmark_on_cpu():
  out = _run('host_overhead.py', '--interval=2', '--intervals=2', '--batch_size=8')
  header, rows = _table(out, '| loop ms/step |')
  assert len(rows) == 1
  cell = dict(zip(header, rows[0]))
  assert float(cell['loop ms/step']) > 0 and float(cell['jitted step ms/step']) > 0


def test_input_pipeline_benchmark_on_cpu():
  out = _run('input_pipeline.py', '--num_images=12', '--batch_size=4', '--batches=1', '--workers=0',
             '--stage_samples=4', '--repeats=1')
  rates, stage_table = (chunk for chunk in out.split('\n\n') if chunk.startswith('|'))  # two tables
  header, rows = _table(rates, '| pipeline |')
  assert [r[0].split()[0] for r in rows] == ['new', 'old', 'PIL']
  for row in rows:
    cell = dict(zip(header, row))
    assert float(cell['images/s']) > 0 and float(cell['images per CPU-second']) > 0
    assert cell['per worker vs PIL baseline'].endswith('x') and cell['per CPU-second vs PIL baseline'].endswith('x')
  header, rows = _table(stage_table, '| stage ')
  stages = {r[0]: [float(x) for x in r[1:]] for r in rows if not r[0].startswith('rest')}
  assert list(stages) == ['decode', 'crop+resize', 'normalise', 'tokenise', 'batching', 'total']
  assert stages['normalise'][1] == 0  # the new pipeline normalises on the device
  assert all(v > 0 for v in stages['decode'] + stages['total'])


def test_storage_io_benchmark_on_cpu():
  """Shards on local disk and in a bucket on a local GCS server (plus a delaying proxy), in one run."""
  out = _run('storage_io.py', '--num_images=16', '--batch_size=4', '--batches=1', '--latency_ms=0,5',
             '--read_repeats=1')
  header, rows = _table(out, '| shards |')
  assert [row[0] for row in rows] == ['local disk', 'gs:// (local server)', 'gs:// (local server)']
  for row in rows:
    cell = dict(zip(header, row))
    assert float(cell['raw read MB/s'].replace(',', '')) > 0
    assert float(cell['pipeline images/s (wall)'].replace(',', '')) > 0

r"""One GPU check that fits the time a GPU is lent (about 15 minutes, start-up included): run it first.

  python benchmarks/gpu_check.py                                 # one H100/H200: <= 9 minutes, into $OUT
  python benchmarks/gpu_check.py --dry-run --out=/tmp/gpu_check  # CPU, tiny model: the same code path (CI)

On the device tool's GPU machine, which has no registry and lacks some of what this imports, it runs with the wheels
of benchmarks/gpu_wheels.py (BENCHMARKS.md, "GPU", has the one command; tests/test_gpu_check.py runs the dry run
with only that machine's packages importable).

Sections, in this order by default (kernels, train, torch, attention: the train-step comparison is the result that
matters most); a section or row that would start past --budget_s is reported as skipped, never silently dropped:
  kernels    the attention tests natively (tests/test_attention.py, test_flash_attention.py, test_model_pallas.py,
             with JAX_PLATFORMS=cuda: the Triton kernel compiled by the GPU, cuDNN and, where tokamax is
             importable, 'mosaic' against XLA's attention).
  attention  attention alone at EVA's shapes (benchmarks/attention.py's cases): xla / cudnn / pallas / mosaic,
             forward and forward+backward, ms and TFLOP/s (model FLOPs), max |difference| from xla. 'mosaic'
             (tokamax's Mosaic GPU kernel, ops/mosaic_attention.py) runs on Hopper where tokamax is importable and
             is reported as skipped, with the reason, elsewhere: about 40 s more (5 cases x 2 compiles and 30 calls).
  train      the B/16 and L/14 train step (benchmarks/train_step.py's JAX worker: attention 'auto', bf16, AdamW)
             at 0% and 50% masking: samples/s, MFU, peak memory (`peak_bytes_in_use`) beside the planner's deviceless
             prediction for this GPU (benchmarks/gpu_predictions.json, made on a CPU host by --predict); then B/16
             at 50% masking with attention 'mosaic' where it can run and the budget is not spent (one more
             worker: about 60 s).
  torch      open_clip's PyTorch step on the same GPU (bf16 autocast, SDPA, fused AdamW), same models, batches,
             masks; skipped, and said so, when torch or open_clip is not installed (the GPU machine has no registry).
Writes gpu_check.json (everything) and gpu_check.md (one table) to --out. Uses only the working tree and what is
installed; no downloads. --predict (CPU host, requirements-accel.txt) refreshes gpu_predictions.json.
Both files are rewritten after every row, so a time-out or a crash keeps the rows before it; until the end, the
table's title says which section was running.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform as platform_lib
import re
import statistics
import subprocess
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

from absl import app, flags  # noqa: E402

_DRY = flags.DEFINE_bool('dry-run', False, 'CPU, tiny model, one step: the same code path, in seconds')
_OUT = flags.DEFINE_string('out', os.environ.get('OUT') or '/tmp/gpu_check',
                           'directory for gpu_check.json and gpu_check.md (default: $OUT, what the device tool '
                           'brings back, else /tmp/gpu_check)')
# The GPU is lent for 15 minutes of device time, start-up and transfers (about 3 of them) included, and one command
# runs at most 10. Past the budget no row starts, and every subprocess is stopped GRACE_S after it, so the check ends
# by about budget + GRACE_S: BENCHMARKS.md's command gives it 560 s, so a call that fails early can be run again.
_BUDGET = flags.DEFINE_float('budget_s', 480.0, 'wall-clock budget: no row starts past it, subprocesses stop soon '
                             'after it')
_SECTIONS = flags.DEFINE_list('sections', ['kernels', 'train', 'torch', 'attention'], 'what to run, in order')
_PREDICT = flags.DEFINE_bool('predict', False, 'CPU host: write the deviceless GPU predictions, then exit')

PREDICTIONS = ROOT / 'benchmarks' / 'gpu_predictions.json'
RESULT = 'RESULT '
GRACE_S = 30.0
# jax 0.11 (the GPU machine's) warns at every lowering of the GPU kernels' APIs: the Pallas Triton backend, and the
# Mosaic GPU forms tokamax 0.0.12 still calls. They say nothing about the run, and where warnings are errors
# (-W error, PYTHONWARNINGS=error, a pytest `filterwarnings = error`) they would end a row: every process of the
# check ignores exactly these (`warning_filters`); jax 0.10 has none of them.
JAX_GPU_DEPRECATIONS = (
    'The Pallas Triton backend is deprecated',
    'Using ``pl.pallas_call`` for Mosaic GPU kernels is deprecated',
    'The out_shape and scratch_shapes arguments to plgpu.kernel are deprecated',
    'Passing the index separately from the reference is deprecated',
)
# What each section imports that the GPU machine's image lacks: carried as wheels (benchmarks/gpu_wheels.txt).
NEEDS = {'train': ('ml_collections',), 'torch': ('torch', 'open_clip', 'timm')}
_USER_ENV = dict(os.environ)  # before this process changes its own allocator settings
_START = time.perf_counter()  # the budget's clock (reset by main)


def plan() -> dict:
  """What each section runs: the real sizes on a GPU, the tiny model on CPU."""
  if _DRY.value:
    return dict(models=[('tiny', 8)], masks=['0.5'], steps=1, warmup=1, dtype='float32', attention_batch=2,
                attention_cases=['tiny'], backends=['xla', 'cudnn', 'pallas_flash', 'mosaic'], iters=1, repeats=1,
                extra_steps=[('tiny', 8, '0.5', 'mosaic')],
                pytest_args=['-k', 'backend_registration or cudnn_matches_xla_on_gpu'])
  # Each train-step worker's cost is start-up + compile (tens of seconds); the timed steps are a second or two.
  return dict(models=[('EVA02-CLIP-B-16', 256), ('EVA02-CLIP-L-14', 128)], masks=['0', '0.5'], steps=8,
              warmup=2, dtype='bfloat16', attention_batch=128,
              attention_cases=['B/16', 'B/16 50% masked', 'L/14', 'L/14 50% masked', 'text B (causal)'],
              backends=['xla', 'cudnn', 'pallas_flash', 'mosaic'], iters=10, repeats=3,
              extra_steps=[('EVA02-CLIP-B-16', 256, '0.5', 'mosaic')],  # (model, batch, mask, attention)
              pytest_args=['--maxfail=5', '-k', 'not tpu_interpreter'])  # the Mosaic TPU interpreter: CPU CI's business


def _env(dry: bool) -> dict:
  env = dict(_USER_ENV)  # the workers preallocate as JAX does by default; only this process must not
  env['JAX_PLATFORMS'] = 'cpu' if dry else 'cuda'
  # This working tree's package, whatever else the interpreter has installed.
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
  # Last, so that they take precedence over the user's own (a later filter wins).
  env['PYTHONWARNINGS'] = ','.join(filter(None, [env.get('PYTHONWARNINGS'), *warning_filters()]))
  return env


def warning_filters() -> list[str]:
  """`JAX_GPU_DEPRECATIONS` as -W / PYTHONWARNINGS filters (a message there is a literal prefix)."""
  return [f'ignore:{message}:DeprecationWarning' for message in JAX_GPU_DEPRECATIONS]


def _remaining() -> float:
  return _BUDGET.value - (time.perf_counter() - _START)


def _timeout(limit: float) -> float:
  """A subprocess's time limit: its own, cut to the budget's remainder plus the grace."""
  return max(1.0, min(limit, _remaining() + GRACE_S))


def _missing(section: str) -> str | None:
  missing = [name for name in NEEDS.get(section, ()) if not _importable(name)]
  if missing:
    return (f'not installed: {", ".join(missing)} (the GPU machine has no registry: carry the wheels of '
            'benchmarks/gpu_wheels.py, BENCHMARKS.md "GPU")')
  return None


def environment() -> dict:
  import jax
  info = {'python': sys.version.split()[0], 'host': platform_lib.node(), 'jax': jax.__version__,
          'devices': [f'{d.device_kind} ({d.platform})' for d in jax.devices()],
          'date': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}
  # Versions as installed (the image's or the carried wheels'), without importing torch into this process.
  for key, distribution in (('jaxlib', 'jaxlib'), ('flax', 'flax'), ('optax', 'optax'),
                            ('orbax', 'orbax-checkpoint'), ('ml_collections', 'ml_collections'), ('torch', 'torch'),
                            ('open_clip', 'open_clip_torch'), ('timm', 'timm')):
    try:
      info[key] = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
      info[key] = 'missing'
  return info


def section_kernels(p: dict, emit) -> dict:
  del emit  # one result: pytest's summary
  tests = ['tests/test_attention.py', 'tests/test_flash_attention.py', 'tests/test_model_pallas.py']
  # pytest applies its own -W after PYTHONWARNINGS and the ini file's filters: these win over both.
  ignore = [arg for f in warning_filters() for arg in ('-W', f)]
  cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *ignore, *p['pytest_args'], *tests]
  shown = ' '.join(c for c in cmd[1:] if c not in ignore)  # the filters: warning_filters
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(_DRY.value), capture_output=True, text=True,
                          timeout=_timeout(300), check=False)
  except subprocess.TimeoutExpired as e:
    return {'command': shown, 'returncode': None, 'summary': f'timed out after {e.timeout:.0f} s',
            'failures': [], 'seconds': time.perf_counter() - start}
  lines = proc.stdout.strip().splitlines()
  return {'command': shown, 'returncode': proc.returncode, 'summary': lines[-1] if lines else '',
          'failures': [l for l in lines if l.startswith(('FAILED', 'ERROR'))][:20],
          'seconds': time.perf_counter() - start}


def section_attention(p: dict, emit) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import attention as bench  # benchmarks/attention.py: the cases, the kernels' call and their FLOPs
  cases = {c.name: c for c in bench.CASES}
  cases['tiny'] = bench.Case('tiny', 17, 2, 16, rope_grid=4)
  on_gpu = jax.devices()[0].platform == 'gpu'
  dtype = jnp.dtype(p['dtype'] if on_gpu else 'float32')
  for name in p['attention_cases']:
    case, batch = cases[name], p['attention_batch']
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, case.seq, case.heads, case.head_dim)
    q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    rope = bench.rope_tables(case, batch)
    reference = None
    for backend in p['backends']:
      if _remaining() <= 0:
        emit({'case': name, 'backend': backend, 'skipped': f'past the {_BUDGET.value:.0f} s budget'})
        continue
      if backend == 'cudnn' and not on_gpu:
        emit({'case': name, 'backend': backend, 'skipped': 'cuDNN needs an NVIDIA GPU'})
        continue
      if backend == 'mosaic' and mosaic_unavailable():
        emit({'case': name, 'backend': backend, 'skipped': mosaic_unavailable()})
        continue
      attend = bench.attention_fn(case, backend, rope)

      def forward_backward(q, k, v, cotangent, attend=attend):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp(cotangent)

      try:
        fns = {'fwd': (jax.jit(attend), (q, k, v)), 'fwd+bwd': (jax.jit(forward_backward), (q, k, v, cotangent))}
        outputs = {key: [np.asarray(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(fn(*args))]
                   for key, (fn, args) in fns.items()}
        for key, (fn, args) in fns.items():
          times = []
          for _ in range(p['repeats']):
            start = time.perf_counter()
            for _ in range(p['iters']):
              out = fn(*args)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - start) / p['iters'])
          seconds = statistics.median(times)
          flops = bench.case_flops(case, batch) * (3 if key == 'fwd+bwd' else 1)
          error = None if reference is None else max(
              float(np.abs(a - b).max()) for a, b in zip(outputs[key], reference[key]))
          emit({'case': name, 'backend': backend, 'pass': key, 'batch': batch, 'ms': seconds * 1e3,
                'tflops': flops / seconds / 1e12, 'err_vs_xla': error})
        reference = outputs if backend == 'xla' else reference
      except Exception as e:  # pylint: disable=broad-except
        emit({'case': name, 'backend': backend, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'})
  return {'dtype': str(dtype)}


def mosaic_unavailable() -> str | None:
  """Why the 'mosaic' attention backend cannot run in this process, or None."""
  import jax
  from eva_clip_jax.ops.experimental import mosaic_attention
  device = jax.devices()[0]
  if device.platform != 'gpu' or not str(getattr(device, 'compute_capability', '')).startswith(('9.', '10.')):
    return 'Mosaic GPU needs a Hopper or Blackwell GPU'
  if not mosaic_attention.tokamax_available():
    return f'tokamax is not installed ({mosaic_attention._INSTALL}; BENCHMARKS.md: carrying its wheels)'
  return None


def _worker(framework: str, model: str, batch: int, mask: str, p: dict, attention: str = 'auto') -> dict:
  cmd = [sys.executable, str(ROOT / 'benchmarks' / 'train_step.py'), f'--model={model}', f'--batch_size={batch}',
         f'--steps={p["steps"]}', f'--warmup={p["warmup"]}', f'--dtype={p["dtype"]}', f'--attention={attention}',
         f'--worker={framework}:{mask}']
  env = _env(_DRY.value)
  if framework == 'torch':  # nothing in the torch worker may take 75% of the GPU for JAX
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=_timeout(400),
                          check=False)
  except subprocess.TimeoutExpired as e:
    return {'error': f'timed out after {e.timeout:.0f} s (the budget)'}
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT):
      return dict(json.loads(line[len(RESULT):]), wall_s=time.perf_counter() - start)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ['no output']
  return {'error': f'exit {proc.returncode}: {" / ".join(t[:200] for t in tail)}'}


def _prediction_key(gpu: str, model: str, batch: int, mask: str) -> str:
  return f'{gpu}|{model}|{batch}|{float(mask):g}|auto|none|adamw|bfloat16'


def _gpu_name(device_kind: str) -> str | None:
  kind = device_kind.lower()
  return next((name for name in ('h200', 'h100', 'a100') if name in kind), None)


def section_train(p: dict, framework: str, emit) -> dict:
  from eva_clip_jax.training import flops as flops_lib
  missing = _missing('torch' if framework == 'torch' else 'train')
  if missing:
    return {'skipped': missing}
  predictions = json.loads(PREDICTIONS.read_text()) if PREDICTIONS.exists() else {}
  import jax
  gpu = _gpu_name(jax.devices()[0].device_kind)
  runs = [(model, batch, mask, 'auto') for model, batch in p['models'] for mask in p['masks']]
  if framework == 'jax':  # the torch step has no attention backends
    runs += p['extra_steps']
  for model, batch, mask, attention in runs:
    batch = _fitting_batch(predictions, gpu, model, batch, mask)
    row = {'framework': framework, 'model': model, 'batch': batch, 'mask': float(mask), 'attention': attention}
    if attention == 'mosaic' and mosaic_unavailable():
      emit({**row, 'skipped': mosaic_unavailable()})
      continue
    if _remaining() <= 0:
      emit({**row, 'skipped': f'past the {_BUDGET.value:.0f} s budget'})
      continue
    r = _worker(framework, model, batch, mask, p, attention)
    row.update(r)
    if 'step_s' in r:
      per_sample = flops_lib.train_flops_per_sample(model, patch_dropout=float(mask))['total']
      row['samples_per_s'] = batch / r['step_s']
      row['mfu'] = row['samples_per_s'] / r['devices'] * per_sample / r['peak_flops'] if r.get('peak_flops') else None
      predicted = predictions.get(_prediction_key(gpu, model, batch, mask)) if gpu and attention == 'auto' else None
      row['predicted_bytes'] = predicted['total'] if predicted else None
    emit(row)
  return {}


def _fitting_batch(predictions: dict, gpu: str | None, model: str, batch: int, mask: str) -> int:
  """`batch`, or half of it where the deviceless prediction says `batch` does not fit this GPU (L/14 unmasked at
  128 needs 98 GiB without remat: an H200's 141 GB hold it, an H100's 80 do not)."""
  if gpu is None:
    return batch
  from eva_clip_jax.training import planning
  limit = 0.9 * planning.target_memory_bytes(gpu)
  for candidate in (batch, batch // 2, batch // 4):
    predicted = predictions.get(_prediction_key(gpu, model, candidate, mask))
    if predicted is None or predicted['total'] <= limit:
      return candidate
  return batch // 4


def _importable(name: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(name) is not None


def markdown(report: dict) -> str:
  env = report['environment']
  running = f" (partial: written while section '{report['running']}' ran)" if report.get('running') else ''
  lines = [f"# gpu_check {'(dry run, CPU, tiny model)' if report['dry_run'] else ''}{running}",
           f"{env['date']}; {', '.join(sorted(set(env['devices'])))}; jax {env['jax']}, torch {env['torch']}, "
           f"open_clip {env['open_clip']}; total {report['seconds']:.0f} s", '']
  failed = [f"Section {name} failed: {section['error']}" for name, section in report['sections'].items()
            if 'error' in section]
  lines += failed + ([''] if failed else [])
  k = report['sections'].get('kernels')
  if k:
    lines += [f"Kernel tests: {k.get('summary', k.get('skipped', ''))} (`{k.get('command', '')}`)", '']
  lines += ['| what | case | backend / framework | mask | batch | ms | TFLOP/s or samples/s | MFU | memory GiB '
            '(predicted) | note |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in report['sections'].get('attention', {}).get('rows', []):
    note = r.get('skipped') or r.get('error') or (f"err vs xla {r['err_vs_xla']:.1e}" if r.get('err_vs_xla') is not
                                                   None else '')
    if 'ms' in r:
      lines.append(f"| attention {r['pass']} | {r['case']} | {r['backend']} | | {r['batch']} | {r['ms']:.3f} | "
                   f"{r['tflops']:.1f} TFLOP/s | | | {note} |")
    else:
      lines.append(f"| attention | {r['case']} | {r['backend']} | | | | | | | {note} |")
  for name in ('train', 'torch'):
    section = report['sections'].get(name, {})
    if 'skipped' in section:
      lines.append(f'| train step | | {name} | | | | | | | skipped: {section["skipped"]} |')
    for r in section.get('rows', []):
      label = r['framework'] + (f" ({r['attention']})" if r.get('attention', 'auto') != 'auto' else '')
      if 'error' in r or 'skipped' in r:
        note = f"failed: {r['error'][:150]}" if 'error' in r else f"skipped: {r['skipped']}"
        lines.append(f"| train step | {r['model']} | {label} | {r['mask']:.0%} | {r['batch']} | | | | | {note} |")
        continue
      predicted = f" ({r['predicted_bytes'] / 2**30:.2f})" if r.get('predicted_bytes') else ''
      mfu = f"{r['mfu']:.1%}" if r.get('mfu') is not None else 'n/a'
      lines.append(f"| train step | {r['model']} | {label} {r.get('version', '')} | {r['mask']:.0%} | "
                   f"{r['batch']} | {r['step_s'] * 1e3:.1f} | {r['samples_per_s']:.1f} samples/s | {mfu} | "
                   f"{r['memory_bytes'] / 2**30:.2f}{predicted} | {r.get('memory_source', '')} |")
  skipped = report.get('skipped_sections')
  if skipped:
    lines += ['', f'Skipped past the {report["budget_s"]:.0f} s budget: {", ".join(skipped)}']
  return '\n'.join(lines) + '\n'


def predict() -> None:
  """Deviceless GPU compiles of the train step gpu_check runs, per GPU: the planner's per-device total."""
  import copy
  import jax
  jax.config.update('jax_platforms', 'cpu')
  from eva_clip_jax.recipe import clip_recipe
  from eva_clip_jax.training import planning
  from eva_clip_jax import sharding as sharding_lib
  predictions = json.loads(PREDICTIONS.read_text()) if PREDICTIONS.exists() else {}
  p = plan()
  for gpu in ('h100', 'h200'):
    target = planning.target_devices('gpu', '1x1x1', gpu)
    mesh = sharding_lib.make_mesh({'data': 1}, devices=target.devices)
    for model, full_batch in p['models']:
      for mask, batch in ((m, b) for m in p['masks'] for b in (full_batch, full_batch // 2)):
        if _prediction_key(gpu, model, batch, mask) in predictions:
          continue  # delete the file to recompute everything
        # The same config as benchmarks/train_step.py's JAX worker builds.
        config = clip_recipe(model=model, visual_lr=2e-4, text_lr=2e-5, visual_layer_decay=0.75,
                             text_layer_decay=0.75, batch_size=batch, samples_seen=batch * 1000,
                             patch_dropout=float(mask))
        config = copy.deepcopy(config)
        config.model.update(dict(dtype='bfloat16', attention='auto', remat='none',
                                 drop_path_rate=0.0))
        config.optimizer.name = 'adamw'
        _, estimate = planning.compile_train_step(config, mesh, batch)
        key = _prediction_key(gpu, model, batch, mask)
        predictions[key] = {'total': estimate.total, 'temp': estimate.temp, 'argument': estimate.argument,
                            'jax': jax.__version__, 'compile_seconds': round(estimate.compile_seconds, 1)}
        print(f'{key}: {estimate.total / 2**30:.2f} GiB ({estimate.compile_seconds:.0f} s)', flush=True)
        PREDICTIONS.write_text(json.dumps(predictions, indent=1, sort_keys=True) + '\n')


def main(argv):
  del argv
  if _PREDICT.value:
    predict()
    return
  if _DRY.value:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  else:  # this process times attention on the GPU; the train-step workers after it need the memory
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  for message in JAX_GPU_DEPRECATIONS:  # this process lowers the attention kernels itself
    warnings.filterwarnings('ignore', message=re.escape(message), category=DeprecationWarning)
  global _START
  start = _START = time.perf_counter()
  p = plan()
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  report = {'dry_run': _DRY.value, 'budget_s': _BUDGET.value, 'plan': {k: v for k, v in p.items()},
            'environment': environment(), 'sections': {}, 'skipped_sections': [], 'running': None, 'seconds': 0.0}

  def save():
    report['seconds'] = time.perf_counter() - start
    write(out, report)

  runners = {'kernels': lambda emit: section_kernels(p, emit), 'attention': lambda emit: section_attention(p, emit),
             'train': lambda emit: section_train(p, 'jax', emit), 'torch': lambda emit: section_train(p, 'torch', emit)}
  for name in _SECTIONS.value:
    if _remaining() <= 0:
      report['skipped_sections'].append(name)
      continue
    section_start = time.perf_counter()
    section = report['sections'][name] = {'rows': []}
    report['running'] = name
    save()  # what ran where, before anything can crash

    def emit(row, rows=section['rows']):
      rows.append(row)
      save()

    try:
      section.update(runners[name](emit))
    except Exception as e:  # pylint: disable=broad-except
      section['error'] = f'{type(e).__name__}: {e}'[:500]
    section['seconds'] = time.perf_counter() - section_start
    print(f'# {name}: {section["seconds"]:.0f} s', flush=True)
  report['running'] = None
  save()
  print(markdown(report))


def write(out: pathlib.Path, report: dict) -> None:
  """gpu_check.json and gpu_check.md, each replaced whole (a kill mid-write leaves the previous version)."""
  for name, text in (('gpu_check.json', json.dumps(report, indent=1, default=str) + '\n'),
                     ('gpu_check.md', markdown(report))):
    partial = out / f'.{name}.partial'
    partial.write_text(text)
    partial.replace(out / name)


if __name__ == '__main__':
  app.run(main)

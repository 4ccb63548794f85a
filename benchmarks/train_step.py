r"""The full training step, JAX and open_clip's PyTorch EVA02 side by side: samples/s, MFU and peak memory.

  python benchmarks/train_step.py --model=EVA02-CLIP-B-16 --batch_size=256            # GPU, bf16, 0% and 50% masks
  python benchmarks/train_step.py --model=tiny --batch_size=8 --steps=3 --dtype=float32  # CPU smoke test

Each (framework, mask) runs in its own subprocess, so that peak memory is per configuration and neither framework
holds GPU memory while the other runs. Both sides train the same architecture on one synthetic batch (random
images and tokens, reused every step) with the same masking (the JAX model's `patch_dropout`; timm's
`PatchDropoutWithIndices` on open_clip's trunk, which keeps the same max(1, int(N (1 - p))) patches and gathers
their RoPE tables), no drop path, AdamW and gradient clipping at norm 5:
  jax    the project's sharded train step (`training.step`: loss, grads, optimizer, loss scaling in one jit),
         data-parallel over all local devices, bfloat16 compute with float32 parameters.
  torch  open_clip + timm (SDPA attention), `torch.autocast` bfloat16, fused AdamW on GPU, ClipLoss;
         --torch_compile compiles the model.
MFU: model FLOPs (`training.flops.train_flops_per_sample`, 3x forward, masked tokens not counted) per device
over the device's datasheet peak for the dtype (`flops.peak_flops_per_device`); where the table has no entry
(CPUs) over a measured matmul peak (`flops.measure_peak_flops`), and the table says which. Peak memory: JAX's
`peak_bytes_in_use` and torch's `max_memory_allocated` on GPU; on CPU the compiled step's memory analysis
(arguments + outputs + temporaries - donated aliases) for JAX and the process's max RSS for torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

# pylint: disable=g-import-not-at-top
# Frameworks are imported inside the workers: each subprocess loads (and touches the GPU with) one of them only.

_MODEL = flags.DEFINE_string('model', 'EVA02-CLIP-B-16', 'model name (registry)')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'global batch size')
_MASKS = flags.DEFINE_list('masks', ['0', '0.5'], 'patch-dropout ratios to run')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed steps')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed steps first (compilation, allocator warm-up)')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'compute dtype, both frameworks')
_ATTENTION = flags.DEFINE_string('attention', 'xla', 'JAX attention backend (xla, cudnn, pallas_tpu, auto, ...)')
_REMAT = flags.DEFINE_string('remat', 'none', 'JAX per-block remat policy')
_OPTIMIZER = flags.DEFINE_string('optimizer', 'adamw', "JAX optimizer ('adamw' matches torch; 'lamb' is the "
                                 "paper's)")
_FRAMEWORKS = flags.DEFINE_list('frameworks', ['jax', 'torch'], 'which sides to run')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', False, 'torch.compile the PyTorch model')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'peak TFLOP/s per device for MFU (0: datasheet, else measured)')
_ISOLATE = flags.DEFINE_bool('isolate', True, 'run each configuration in a subprocess (per-config peak memory)')
_WORKER = flags.DEFINE_string('worker', '', 'internal: run one configuration, "framework:mask", print RESULT')

RESULT = 'RESULT '


def _synthetic(spec, batch: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  size = spec.vision.image_size
  return {'image': rng.standard_normal((batch, size, size, 3), dtype=np.float32),
          'text': rng.integers(1, spec.text.vocab_size - 1, (batch, spec.text.context_length)).astype(np.int32)}


def run_jax(mask: float) -> dict:
  import jax
  from eva_clip_jax.models import get_model_spec
  from eva_clip_jax.recipe import clip_recipe
  from eva_clip_jax import sharding
  from eva_clip_jax.training import flops, step

  spec = get_model_spec(_MODEL.value)
  batch = _BATCH.value
  config = clip_recipe(model=spec.name, visual_lr=2e-4, text_lr=2e-5, visual_layer_decay=0.75, text_layer_decay=0.75,
                       batch_size=batch, samples_seen=batch * 1000, patch_dropout=mask)
  config.model.update(dict(dtype=_DTYPE.value, attention=_ATTENTION.value, remat=_REMAT.value,
                           drop_path_rate=0.0))
  config.optimizer.name = _OPTIMIZER.value
  mesh = sharding.make_mesh(dict(data=-1))
  setup = step.make_setup(config, mesh)
  state = step.init_state(setup)
  data = step.device_batch(_synthetic(spec, batch), mesh)
  start = time.perf_counter()
  train_step = step.make_train_step(setup).lower(state, data).compile()
  for _ in range(_WARMUP.value):
    state, metrics = train_step(state, data)
  jax.block_until_ready((state, metrics))
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = train_step(state, data)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / _STEPS.value

  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform == 'gpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    memory, memory_source = stats['peak_bytes_in_use'], 'peak_bytes_in_use'
  else:
    m = train_step.memory_analysis()
    memory = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    memory_source = 'compiled memory_analysis'
  peak, peak_source = _PEAK.value * 1e12, 'flag'
  if not peak:
    peak, peak_source = flops.peak_flops_per_device(device, _DTYPE.value), 'datasheet'
  if not peak:
    peak = flops.measure_peak_flops(_DTYPE.value, n=4096 if device.platform != 'cpu' else 1024)
    peak_source = 'measured matmul'
  return dict(framework='jax', version=jax.__version__, device=f'{device.device_kind} ({device.platform})',
              devices=jax.device_count(), step_s=seconds, warmup_s=warmup_s, memory_bytes=int(memory),
              memory_source=memory_source, peak_flops=peak, peak_source=peak_source,
              loss=float(metrics['loss']))


def run_torch(mask: float) -> dict:
  import numpy as np
  import open_clip
  import torch
  from timm.layers import PatchDropoutWithIndices

  from eva_clip_jax.conversion.torch_reference import OPEN_CLIP_NAMES, timm_vision_trunk
  from eva_clip_jax.models import get_model_spec

  spec = get_model_spec(_MODEL.value)
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  if spec.name in OPEN_CLIP_NAMES:
    model = open_clip.create_model(OPEN_CLIP_NAMES[spec.name], pretrained=None)
  else:  # reduced shapes (tiny): torch_reference's model, minus its throwaway B/16 trunk (seconds on a CPU)
    t = spec.text
    model = open_clip.CustomTextCLIP(
        spec.embed_dim, dict(image_size=spec.vision.image_size, timm_model_name='eva02_tiny_patch14_224',
                             timm_pool='token', timm_proj=None),
        dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.num_heads,
             layers=t.depth))
    model.visual.trunk = timm_vision_trunk(spec)
  trunk = model.visual.trunk
  # open_clip's force_patch_dropout sets timm's patch_drop_rate, which builds exactly this module.
  trunk.patch_drop = PatchDropoutWithIndices(mask, num_prefix_tokens=trunk.num_prefix_tokens) if mask else None
  model = model.to(device).train()
  forward = torch.compile(model) if _TORCH_COMPILE.value else model
  loss_fn = open_clip.ClipLoss()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05,
                                fused=cuda)
  data = _synthetic(spec, _BATCH.value)
  images = torch.from_numpy(np.ascontiguousarray(data['image'].transpose(0, 3, 1, 2))).to(device)
  text = torch.from_numpy(data['text'].astype(np.int64)).to(device)
  bf16 = _DTYPE.value == 'bfloat16'

  def train_step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      image_features, text_features, logit_scale = forward(images, text)[:3]
      loss = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for _ in range(_WARMUP.value):
    train_step()
  sync()
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    loss = train_step()
  sync()
  seconds = (time.perf_counter() - start) / _STEPS.value
  if cuda:
    memory, memory_source = torch.cuda.max_memory_allocated(), 'max_memory_allocated'
    name = torch.cuda.get_device_name()
  else:
    import resource
    memory, memory_source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process max RSS'
    name = f'cpu, {torch.get_num_threads()} threads'
  return dict(framework='torch' + ('+compile' if _TORCH_COMPILE.value else ''), version=torch.__version__,
              device=name, devices=1, step_s=seconds, warmup_s=warmup_s, memory_bytes=int(memory),
              memory_source=memory_source, loss=float(loss.detach()))


def _worker(spec: str) -> dict:
  framework, mask = spec.split(':')
  result = (run_jax if framework == 'jax' else run_torch)(float(mask))
  return dict(result, mask=float(mask))


def _run_isolated(framework: str, mask: str) -> dict:
  argv = [a for a in sys.argv[1:] if not a.startswith('--worker')]
  cmd = [sys.executable, os.path.abspath(__file__), *argv, f'--worker={framework}:{mask}']
  # Should anything in a torch worker start JAX's GPU client, it must not preallocate 75% of the GPU.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false') if framework != 'jax' else None
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
  return dict(framework=framework, mask=float(mask), error=f'exit {proc.returncode}: {tail[0][:160]}')


def main(argv):
  del argv
  if _WORKER.value:
    print(RESULT + json.dumps(_worker(_WORKER.value)), flush=True)
    return
  from eva_clip_jax.models import get_model_spec
  from eva_clip_jax.training import flops

  if not _ISOLATE.value:  # both frameworks in this process: JAX must leave GPU memory to torch
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  spec = get_model_spec(_MODEL.value)
  batch = _BATCH.value
  print(f'# train step: {spec.name}, global batch {batch}, {_DTYPE.value}, {_STEPS.value} timed steps after '
        f'{_WARMUP.value}; jax: attention={_ATTENTION.value} remat={_REMAT.value} '
        f'optimizer={_OPTIMIZER.value}; torch: AdamW'
        f'{", torch.compile" if _TORCH_COMPILE.value else ""}')
  print('| framework | mask | samples/s | step ms | MFU | peak | memory GiB | memory source | compile + warm-up s '
        '| device |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  peak = None  # the JAX worker's device peak, reused for torch (the same device)
  for mask in _MASKS.value:
    by_framework = {}
    for framework in _FRAMEWORKS.value:
      r = _run_isolated(framework, mask) if _ISOLATE.value else _worker(f'{framework}:{mask}')
      if 'error' in r:
        print(f'| {framework} | {float(mask):.0%} | failed: {r["error"]} | | | | | | | |', flush=True)
        continue
      peak = (r['peak_flops'], r['peak_source']) if 'peak_flops' in r else peak
      samples_per_s = batch / r['step_s']
      train_flops = flops.train_flops_per_sample(spec, patch_dropout=float(mask))['total']
      utilisation = f'{samples_per_s / r["devices"] * train_flops / peak[0]:.1%}' if peak else 'n/a'
      peak_text = f'{peak[0] / 1e12:.1f} TFLOP/s {peak[1]}' if peak else 'n/a'
      by_framework[r['framework']] = samples_per_s
      print(f'| {r["framework"]} {r["version"]} | {float(mask):.0%} | {samples_per_s:.2f} | {r["step_s"] * 1e3:.1f} | '
            f'{utilisation} | {peak_text} | {r["memory_bytes"] / 2**30:.2f} | {r["memory_source"]} | '
            f'{r["warmup_s"]:.1f} | {r["device"]} x{r["devices"]} |', flush=True)
    torch_name = next((name for name in by_framework if name.startswith('torch')), None)
    if 'jax' in by_framework and torch_name:
      print(f'# mask {float(mask):.0%}: jax/{torch_name} samples/s ratio '
            f'{by_framework["jax"] / by_framework[torch_name]:.2f}', flush=True)


if __name__ == '__main__':
  app.run(main)

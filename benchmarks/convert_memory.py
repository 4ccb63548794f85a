r"""Peak host memory (RSS) and wall time of loading an EVA-CLIP-8B-style PyTorch checkpoint three ways, each in a
fresh process with 8 fake CPU devices:

  naive      the whole-dict path this replaced: torch.load of the file, a numpy params dict, a randomly initialised
             model, assign_params, device_put onto the fsdp x tensor shardings
  streaming  create_model(spec, pretrained=file): an abstract model, the file read tensor by tensor, one device
  sharded    conversion.load_sharded over a fsdp:4 x tensor:2 mesh: each device's slices read from the mapped file

  python benchmarks/convert_memory.py                                  # depth 4, width 1024: a 294 MB file
  python benchmarks/convert_memory.py --depth=1 --width=256 --text_width=64   # smoke test

'over baseline' is the peak minus the RSS after imports and device start-up; 'result' is the bytes of the loaded
parameters on all 8 devices (in one process here; over several hosts each holds its own share).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_DEPTH = flags.DEFINE_integer('depth', 4, 'vision blocks')
_WIDTH = flags.DEFINE_integer('width', 1024, 'vision width (head dim 128, MLP 5x, as EVA-CLIP-8B)')
_TEXT_WIDTH = flags.DEFINE_integer('text_width', 256, 'text width (2 blocks)')
_SRC = flags.DEFINE_string('src', None, 'an EVA-layout .pt file of that shape (default: write a random one)')
_MODE = flags.DEFINE_enum('mode', None, ['naive', 'streaming', 'sharded'], 'internal: measure one mode')
MODES = ('naive', 'streaming', 'sharded')


def small_spec(depth: int, width: int, text_width: int):
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  return ec.models.replace_spec(ec.get_model_spec('EVA-CLIP-8B'), name='eva-clip-8b-small', embed_dim=64,
                                vision__depth=depth, vision__width=width, vision__num_heads=width // 128,
                                vision__mlp_dim=5 * width, vision__image_size=56, text__depth=2,
                                text__width=text_width, text__num_heads=text_width // 64)


def write_random(spec, path: str) -> None:
  """A random EVA-layout file, tensor by tensor (text tower at the top level, as the 8B reference model has it)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.conversion import layouts, torch_io  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.models.paths import flatten  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  shapes = flatten(nnx.to_pure_dict(nnx.state(ec.create_model(spec, abstract=True), nnx.Param)))
  rng = np.random.default_rng(0)
  tensors = []
  for entry in layouts.entries(spec, 'eva', text_prefix=''):
    theirs = layouts.theirs_shape(entry, shapes['/'.join(entry.ours)].shape)
    tensors += [(key, theirs, lambda s=theirs: rng.standard_normal(s, np.float32)) for key in layouts.entry_keys(entry)]
  torch_io.write_state_dict(tensors, path)


def rules():
  from eva_clip_jax.recipe import clip_recipe  # pylint: disable=g-import-not-at-top
  return clip_recipe(model='tiny', visual_lr=0, text_lr=0, visual_layer_decay=1, text_layer_decay=1, batch_size=1,
                     samples_seen=1).sharding.axis_rules


def measure(mode: str, spec, src: str) -> dict:
  """Runs in the child: loads `src` one way; RSS after start-up, peak RSS, wall time, bytes held by the result."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top  (imported by every mode, before the baseline)
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.conversion import api  # pylint: disable=g-import-not-at-top
  from eva_clip_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  axis_rules = rules()
  jax.block_until_ready(jax.device_put(0.0))  # the CPU client is up before the baseline
  baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  if mode == 'naive':
    state = {k: v.float().numpy() for k, v in torch.load(src, weights_only=True).items()}
    model = ec.models.create_model(spec)
    api.assign_params(model, api.state_dict_to_params(state, spec))
    targets = api.param_targets(model, mesh, axis_rules)
    params = jax.device_put(api.model_params(model), jax.tree.map(lambda t: t.sharding, targets))
    del state, model
  elif mode == 'streaming':
    params = api.model_params(ec.create_model(spec, pretrained=src))
  else:
    params = api.model_params(api.load_sharded(spec, src, mesh, axis_rules))
  jax.block_until_ready(params)
  wall = time.perf_counter() - start
  held = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
  return dict(mode=mode, baseline_kib=baseline, peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              result_bytes=held, file_bytes=os.path.getsize(src), wall_s=wall)


def run_mode(mode: str, src: str, depth: int, width: int, text_width: int) -> dict:
  """One mode in a fresh process (peak RSS is per process), as a dict."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--mode={mode}', f'--src={src}', f'--depth={depth}',
                        f'--width={width}', f'--text_width={text_width}'], capture_output=True, text=True, env=env,
                       check=False)
  if out.returncode:
    raise RuntimeError(f'{mode} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  spec = small_spec(_DEPTH.value, _WIDTH.value, _TEXT_WIDTH.value)
  if _MODE.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_num_cpu_devices', 8)
    print(json.dumps(measure(_MODE.value, spec, _SRC.value)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    src = _SRC.value or os.path.join(tmp, 'eva_clip_8b_small.pt')
    if not _SRC.value:
      write_random(spec, src)
    rows = [run_mode(m, src, _DEPTH.value, _WIDTH.value, _TEXT_WIDTH.value) for m in MODES]
  mib = lambda kib: kib / 1024
  print(f'file: {rows[0]["file_bytes"] / 2**20:.0f} MiB (vision depth {_DEPTH.value}, width {_WIDTH.value})\n')
  print('| mode | peak RSS MiB | over baseline MiB | result MiB | wall s |')
  print('|---|---:|---:|---:|---:|')
  for r in rows:
    print(f'| {r["mode"]} | {mib(r["peak_kib"]):.0f} | {mib(r["peak_kib"] - r["baseline_kib"]):.0f} | '
          f'{r["result_bytes"] / 2**20:.0f} | {r["wall_s"]:.1f} |')


if __name__ == '__main__':
  app.run(main)

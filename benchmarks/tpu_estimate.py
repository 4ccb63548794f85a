r"""The TPU compiler's estimate of the train step's speed, from ahead-of-time compiles on a CPU host (no TPU).

  python benchmarks/tpu_estimate.py --check_matmul
  python benchmarks/tpu_estimate.py --blocks --model=EVA02-CLIP-B-16 --masks=0.5 --attention=xla,pallas_tpu
  python benchmarks/tpu_estimate.py --model=EVA02-CLIP-B-16 --batch_per_chip=256 --masks=0,0.5 \
      --attention=xla,pallas_tpu --remat=none,full --json=/tmp/b16.json

What is estimated: XLA's cost analysis of the compiled (optimised, partitioned) program for one chip: `flops` and
`optimal_seconds`, the compiler's own roofline time of the program's ops. --check_matmul says what that time means
on one large bf16 matmul, where FLOPs / the chip's datasheet peak is the answer by hand. It is an estimate, not a
measurement: no TPU ran anything.

The scan under-count: XLA counts a while loop's body once, so a model whose towers run as a `lax.scan` reports one
layer per tower. Here the layers are unrolled instead (scan_layers=False) and, because unrolling all of them makes
the compile slow, the towers are compiled at depths (1, 1), (2, 1) and (1, 2) and extrapolated linearly: one more
vision layer costs c(2, 1) - c(1, 1), exactly, since the layers are identical (equal depths, as B/16's 12 and 12:
(1, 1) and (2, 2) only). Everything else (embeddings, loss,
LAMB over the real parameter count's structure per layer, the gradient reduce-scatter of zero1) is in c(1, 1).
MFU = analytic model FLOPs (training.flops, 3x forward) x samples/s / the chip's datasheet bf16 peak.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import app, flags  # noqa: E402

_CHECK = flags.DEFINE_bool('check_matmul', False, "compare optimal_seconds with FLOPs / peak on one matmul")
_ATTENTION_ONLY = flags.DEFINE_bool('attention_only', False, 'attention forward+backward alone, xla vs pallas_tpu')
_BLOCKS = flags.DEFINE_bool('blocks', False, "one vision and one text block, forward+backward, per --attention (and "
                            "with the vision block's attention or MLP left out: where the time goes)")
_TOPOLOGY = flags.DEFINE_string('topology', 'v5p:2x2x1', 'the TPU slice compiled for (the step is data parallel)')
_MODEL = flags.DEFINE_string('model', 'EVA02-CLIP-B-16', 'model name')
_BATCH = flags.DEFINE_integer('batch_per_chip', 256, 'samples per chip')
_MASKS = flags.DEFINE_list('masks', ['0', '0.5'], 'patch dropout rates')
_ATTENTION = flags.DEFINE_list('attention', ['xla', 'pallas_tpu'], 'attention backends')
_REMAT = flags.DEFINE_list('remat', ['none', 'full'], 'remat policies')
_STRATEGY = flags.DEFINE_string('strategy', 'zero1', 'sharding strategy')
_JSON = flags.DEFINE_string('json', None, 'append the rows to this JSON file')


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if float(cost['optimal_seconds']) <= 0:  # seen for v5e slices: -3, a sentinel, not a time
    raise ValueError(f"the TPU compiler gave no time estimate (optimal_seconds = {cost['optimal_seconds']}); "
                     'try a v5p, v4 or v6e topology')
  return {'flops': float(cost['flops']), 'seconds': float(cost['optimal_seconds']),
          'bytes': float(cost.get('bytes accessed', 0.0))}


def check_matmul(n: int = 8192) -> list[dict]:
  """optimal_seconds of one [n, n] x [n, n] bf16 matmul on one chip of each generation, against FLOPs / peak."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from eva_clip_jax.training import flops as flops_lib
  from eva_clip_jax.training import planning
  rows = []
  for topology in ('v4:2x2x1', 'v5e:2x2', 'v5p:2x2x1', 'v6e:2x2'):
    target = planning.target_devices('tpu', topology)
    sharding = NamedSharding(Mesh(target.devices[:1], ('x',)), P())
    for shape in ((n, n, n), (2 * n, n, n)):
      m, k, out = shape
      a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=sharding)
      b = jax.ShapeDtypeStruct((k, out), jnp.bfloat16, sharding=sharding)
      cost = _cost(jax.jit(jnp.matmul).lower(a, b).compile())
      peak = flops_lib.peak_flops_per_device(target.devices[0])
      rows.append({'topology': topology, 'device_kind': target.devices[0].device_kind, 'shape': shape,
                   'flops': cost['flops'], 'by_hand': 2 * m * k * out, 'optimal_seconds': cost['seconds'],
                   'flops_over_peak': 2 * m * k * out / peak, 'implied_tflops': cost['flops'] / cost['seconds'] / 1e12,
                   'peak_tflops': peak / 1e12})
      r = rows[-1]
      print(f"{topology:10} {r['device_kind']:14} {m}x{k}x{out}: flops {r['flops']:.4g} (by hand {r['by_hand']:.4g}), "
            f"optimal_seconds {r['optimal_seconds'] * 1e3:.3f} ms, FLOPs/peak {r['flops_over_peak'] * 1e3:.3f} ms, "
            f"implied {r['implied_tflops']:.0f} TFLOP/s vs datasheet {r['peak_tflops']:.0f}", flush=True)
  return rows


def attention_only(topology: str, batch: int = 32) -> list[dict]:
  """Forward + backward of attention alone at EVA-02's shapes (RoPE fused for pallas_tpu, rotated first for xla)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from eva_clip_jax import ops
  from eva_clip_jax.models import rope as rope_lib
  from eva_clip_jax.training import planning
  target = planning.target_devices('tpu', topology)
  sharding = NamedSharding(Mesh(target.devices[:1], ('x',)), P())
  rows = []
  for name, seq, heads, grid in (('B/16', 197, 12, 14), ('B/16 50% masked', 99, 12, 14), ('L/14', 257, 16, 16),
                                 ('L/14 50% masked', 129, 16, 16)):
    spec = jax.ShapeDtypeStruct((batch, seq, heads, 64), jnp.bfloat16, sharding=sharding)
    cos, sin = (jnp.asarray(t) for t in rope_lib.rope_2d_tables(64, grid))
    cos, sin = cos[:seq - 1], sin[:seq - 1]  # masked: the first kept rows (the cost does not depend on which)
    for backend in ('xla', 'pallas_tpu'):
      def loss(q, k, v, backend=backend):
        out = ops.dot_product_attention(q, k, v, rope=(cos, sin), backend=backend)
        return jnp.sum(out.astype(jnp.float32))
      cost = _cost(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile())
      model = 3 * 4 * batch * heads * seq * seq * 64
      rows.append({'case': name, 'backend': backend, 'batch': batch, **cost, 'model_flops': model})
      print(f"{name:16} {backend:10} optimal {cost['seconds'] * 1e3:7.3f} ms, flops {cost['flops']:.3g} "
            f"({cost['flops'] / model:.2f}x model), bytes {cost['bytes']:.3g}", flush=True)
  return rows


def blocks(model: str, topology: str, batch: int, mask: float, attentions: list[str]) -> list[dict]:
  """Forward + backward of one block of each tower on one chip, and of the vision block without its attention (q
  and k unused, so RoPE goes too) or without its MLP: the estimate's split of a layer's time."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from eva_clip_jax.models import get_model_spec
  from eva_clip_jax.models import rope as rope_lib
  from eva_clip_jax.models import text as text_lib
  from eva_clip_jax.models import vision as vision_lib
  from eva_clip_jax.models.common import ModelOptions
  from eva_clip_jax.training import planning
  target = planning.target_devices('tpu', topology)
  sharding = NamedSharding(Mesh(target.devices[:1], ('x',)), P())
  spec = get_model_spec(model)
  keep = vision_lib.num_kept_patches(spec.vision.num_patches, mask)
  grid = spec.vision.image_size // spec.vision.patch_size
  cos, sin = (jnp.asarray(t) for t in rope_lib.rope_2d_tables(spec.vision.head_dim, grid))
  rows = []
  for attention in attentions:
    opts = ModelOptions(dtype='bfloat16', attention=attention)
    for tower, part in (('vision', 'block'), ('vision', 'no attention'), ('vision', 'no MLP'), ('text', 'block')):
      if tower == 'vision':
        block, seq, width = vision_lib.EvaBlock(spec.vision, opts, rngs=nnx.Rngs(0)), keep + 1, spec.vision.width
      else:
        block, seq, width = text_lib.TextBlock(spec.text, opts, rngs=nnx.Rngs(0)), spec.text.context_length, \
            spec.text.width
      graphdef, params = nnx.split(block)

      def loss(params, x, keep_idx, tower=tower, part=part, graphdef=graphdef):
        module = nnx.merge(graphdef, params)
        if tower == 'text':
          return jnp.sum(module(x).astype(jnp.float32) ** 2)
        rope = (cos[keep_idx], sin[keep_idx]) if spec.vision.rope else None
        attend = lambda h: x if part == 'no attention' else module._branch(  # pylint: disable=protected-access
            h, lambda g: module.attn(g, rope), module.norm1, module.gamma_1, 0.0, None)
        y = attend(x)
        if part != 'no MLP':
          y = module._branch(y, module.mlp, module.norm2, module.gamma_2, 0.0, None)  # pylint: disable=protected-access
        return jnp.sum(y.astype(jnp.float32) ** 2)

      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params)
      x = jax.ShapeDtypeStruct((batch, seq, width), jnp.bfloat16, sharding=sharding)
      idx = jax.ShapeDtypeStruct((batch, keep), jnp.int32, sharding=sharding)
      cost = _cost(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(abstract, x, idx).compile())
      rows.append({'tower': tower, 'part': part, 'attention': attention, 'batch': batch, 'tokens': seq, **cost})
      print(f"{tower:6} {part:12} {attention:10} {seq:4d} tokens: {cost['seconds'] * 1e3:7.3f} ms, "
            f"{cost['bytes'] / 1e9:6.2f} GB, {cost['flops'] / 1e12:6.3f} TFLOP", flush=True)
  return rows


@dataclasses.dataclass
class Row:
  model: str
  topology: str
  batch_per_chip: int
  mask: float
  attention: str
  remat: str
  flops: float  # per chip per step, scan-corrected
  seconds: float  # optimal_seconds, scan-corrected
  bytes_accessed: float  # HBM traffic XLA's cost model counts, scan-corrected
  samples_per_second_per_chip: float
  mfu: float
  hlo_over_model_flops: float
  compile_seconds: float


def _register(spec):
  from eva_clip_jax.models import registry
  registry.MODELS[spec.name] = spec  # this process only: the depth variants are not models anyone trains


def estimate(model: str, topology: str, batch: int, mask: float, attention: str, remat: str,
             strategy: str) -> Row:
  from eva_clip_jax.models import get_model_spec, replace_spec
  from eva_clip_jax.recipe import clip_recipe
  from eva_clip_jax.training import flops as flops_lib
  from eva_clip_jax.training import planning
  from eva_clip_jax import sharding as sharding_lib
  target = planning.target_devices('tpu', topology)
  mesh = sharding_lib.make_mesh({'data': len(target.devices)}, devices=target.devices)
  spec = get_model_spec(model)
  costs, start = {}, time.perf_counter()
  # Equal tower depths (B/16: 12 and 12) need one compile fewer: c(2, 2) - c(1, 1) is one layer of each.
  same = spec.vision.depth == spec.text.depth
  for depths in ((1, 1), (2, 2)) if same else ((1, 1), (2, 1), (1, 2)):
    variant = replace_spec(spec, name=f'{spec.name}-v{depths[0]}t{depths[1]}', vision__depth=depths[0],
                           text__depth=depths[1])
    _register(variant)
    config = clip_recipe(model=variant.name, visual_lr=1e-3, text_lr=1e-3,
                         visual_layer_decay=0.75, text_layer_decay=0.75, batch_size=batch * len(target.devices),
                         samples_seen=1e6)
    config = copy.deepcopy(config)
    config.model.update(attention=attention, remat=remat, patch_dropout=mask, scan_layers=False, dtype='bfloat16')
    config.sharding.strategy = strategy
    compiled, estimate = planning.compile_train_step(config, mesh, batch)
    costs[depths] = _cost(compiled)
    print(f'#   depths {depths}: compiled in {estimate.compile_seconds:.0f} s, {costs[depths]}', flush=True)
  base = costs[(1, 1)]
  if same:
    total = {key: base[key] + (spec.vision.depth - 1) * (costs[(2, 2)][key] - base[key]) for key in base}
  else:
    v2, t2 = costs[(2, 1)], costs[(1, 2)]
    total = {key: base[key] + (spec.vision.depth - 1) * (v2[key] - base[key]) + (spec.text.depth - 1) * (
        t2[key] - base[key]) for key in base}
  model_flops = flops_lib.train_flops_per_sample(spec, patch_dropout=mask)['total'] * batch
  peak = flops_lib.peak_flops_per_device(target.devices[0])
  samples = batch / total['seconds']
  return Row(model=model, topology=topology, batch_per_chip=batch, mask=mask, attention=attention, remat=remat,
             flops=total['flops'], seconds=total['seconds'], bytes_accessed=total['bytes'],
             samples_per_second_per_chip=samples, mfu=model_flops / total['seconds'] / peak,
             hlo_over_model_flops=total['flops'] / model_flops, compile_seconds=time.perf_counter() - start)


def main(argv):
  del argv
  import jax
  jax.config.update('jax_platforms', 'cpu')
  if _CHECK.value:
    rows = check_matmul()
  elif _ATTENTION_ONLY.value:
    rows = attention_only(_TOPOLOGY.value)
  elif _BLOCKS.value:
    rows = blocks(_MODEL.value, _TOPOLOGY.value, _BATCH.value, float(_MASKS.value[-1]), _ATTENTION.value)
  else:
    rows = []
    print(f"{'model':16} {'mask':>4} {'attention':12} {'remat':5} {'step ms':>8} {'smp/s/chip':>10} "
          f"{'MFU':>6} {'HLO/model FLOPs':>15} {'compile s':>9}   (compiler estimate, not a measurement)")
    for mask in map(float, _MASKS.value):
      for attention in _ATTENTION.value:
        for remat in _REMAT.value:
          row = estimate(_MODEL.value, _TOPOLOGY.value, _BATCH.value, mask, attention, remat, _STRATEGY.value)
          rows.append(dataclasses.asdict(row))
          print(f'{row.model[-8:]:16} {row.mask:4.1f} {row.attention:12} {row.remat:5} '
                f'{row.seconds * 1e3:8.1f} {row.samples_per_second_per_chip:10.0f} {row.mfu:6.1%} '
                f'{row.hlo_over_model_flops:15.2f} {row.compile_seconds:9.0f}', flush=True)
  if _JSON.value:
    old = json.load(open(_JSON.value)) if os.path.exists(_JSON.value) else []
    with open(_JSON.value, 'w') as f:
      json.dump(old + rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)

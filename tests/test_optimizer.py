"""The EVA-CLIP optimizer: the parameter table, LAMB against a per-tensor NumPy transcription of DeepSpeed's
FusedLamb kernel, AdamW and clipping against torch, the schedule against the reference formula, B-16 shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import eva_clip_jax as ec
from eva_clip_jax.models.paths import path_name
from eva_clip_jax.recipe import clip_recipe
from eva_clip_jax.training import optimizer as opt_lib


def _config(name='lamb', *, warmup=2, total=10, clip=1.0, decay='cosine', end_lr=0.0):
  config = clip_recipe(model='tiny', visual_lr=1e-2, text_lr=2e-2, base_lr=5e-2, visual_layer_decay=0.5,
                       text_layer_decay=0.8, batch_size=1, samples_seen=total, warmup_steps=warmup)
  config.weight_decay.update(dict(visual=0.05, text=0.1, base=0.2))
  config.optimizer.update(dict(name=name, grad_clip_norm=clip))
  config.schedule.update(dict(decay=decay, end_lr=end_lr))
  return config


def _ref_lr(peak, step, warmup, total, end=0.0):
  """EVA-CLIP training/scheduler.py, with an end rate."""
  if step < warmup:
    return peak * (step + 1) / warmup
  frac = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  return end + 0.5 * (1 + math.cos(math.pi * frac)) * (peak - end)


# Worked out by hand for the tiny model (depth 2 in both towers) with layer decay visual 0.5, text 0.8 and weight
# decay visual 0.05, text 0.1, base 0.2: name -> (layer ids, lr scales, weight decay). Scale = decay^(3 - id).
BLOCK_V, BLOCK_T = ([1, 2], [0.25, 0.5]), ([1, 2], [0.64, 0.8])
TINY_TABLE = {
    'logit_scale': (0, 1.0, 0.0),
    'visual/patch_embed/kernel': (0, 0.125, 0.05),  # rank 4
    'visual/patch_embed/bias': (0, 0.125, 0.0),
    'visual/cls_token': (0, 0.125, 0.0),  # no_weight_decay, though rank 3
    'visual/pos_embed': (0, 0.125, 0.0),
    'visual/norm/scale': (3, 1.0, 0.0),
    'visual/norm/bias': (3, 1.0, 0.0),
    'visual/head/kernel': (3, 1.0, 0.05),
    'visual/head/bias': (3, 1.0, 0.0),
    'text/token_embedding/embedding': (0, 0.512, 0.1),  # rank 2: decayed
    'text/positional_embedding': (0, 0.512, 0.0),
    'text/ln_final/scale': (3, 1.0, 0.0),
    'text/ln_final/bias': (3, 1.0, 0.0),
    'text/text_projection': (3, 1.0, 0.1),
}
for _name in ('attn/k_proj/kernel', 'attn/q_proj/kernel', 'attn/v_proj/kernel', 'attn/proj/kernel',
              'mlp/w1/kernel', 'mlp/w2/kernel', 'mlp/w3/kernel'):
  TINY_TABLE[f'visual/blocks/{_name}'] = (*BLOCK_V, 0.05)
for _name in ('attn/q_bias', 'attn/v_bias', 'attn/proj/bias', 'attn/inner_attn_ln/scale', 'attn/inner_attn_ln/bias',
              'mlp/w1/bias', 'mlp/w2/bias', 'mlp/w3/bias', 'mlp/ffn_ln/scale', 'mlp/ffn_ln/bias', 'norm1/scale',
              'norm1/bias', 'norm2/scale', 'norm2/bias'):
  TINY_TABLE[f'visual/blocks/{_name}'] = (*BLOCK_V, 0.0)  # [depth, D]: rank 1 per layer
for _name in ('attn/in_proj/kernel', 'attn/out_proj/kernel', 'mlp/c_fc/kernel', 'mlp/c_proj/kernel'):
  TINY_TABLE[f'text/blocks/{_name}'] = (*BLOCK_T, 0.1)
for _name in ('attn/in_proj/bias', 'attn/out_proj/bias', 'mlp/c_fc/bias', 'mlp/c_proj/bias', 'ln_1/scale', 'ln_1/bias',
              'ln_2/scale', 'ln_2/bias'):
  TINY_TABLE[f'text/blocks/{_name}'] = (*BLOCK_T, 0.0)


def _abstract_params(name):
  model = ec.create_model(name, abstract=True)
  return nnx.state(model, nnx.Param).to_pure_dict(), model.spec


def test_tiny_parameter_table():
  params, spec = _abstract_params('tiny')
  assert (spec.vision.depth, spec.text.depth) == (2, 2)
  groups = opt_lib.param_groups(params, visual_depth=2, text_depth=2, config=_config())
  assert set(groups) == set(TINY_TABLE)
  for name, (ids, scales, wd) in TINY_TABLE.items():
    rule = groups[name]
    assert rule.tower == ('base' if name == 'logit_scale' else name.split('/')[0]), name
    assert rule.stacked == ('/blocks/' in name), name
    np.testing.assert_array_equal(rule.layer_ids, ids, err_msg=name)
    np.testing.assert_allclose(rule.lr_scale, scales, rtol=1e-12, err_msg=name)
    assert rule.weight_decay == wd, name


# A small tree for the update rules: visual depth 2, text depth 3. Hand-written rules per tensor (stacked leaves
# listed per layer): name -> (tower, lr scale of each layer, weight decay).
SMALL_RULES = {
    'logit_scale': ('base', [1.0], 0.0),
    'visual/blocks/attn/q_proj/kernel': ('visual', [0.25, 0.5], 0.05),  # layer 0 all zeros: trust 1 there only
    'visual/blocks/attn/q_bias': ('visual', [0.25, 0.5], 0.0),
    'visual/patch_embed/kernel': ('visual', [0.125], 0.05),
    'visual/pos_embed': ('visual', [0.125], 0.0),  # large: trust clamped to 10
    'visual/head/kernel': ('visual', [1.0], 0.05),  # tiny: trust clamped to 0.01
    'visual/head/bias': ('visual', [1.0], 0.0),  # zeros: trust 1
    'text/blocks/mlp/c_fc/kernel': ('text', [0.512, 0.64, 0.8], 0.1),
    'text/token_embedding/embedding': ('text', [0.4096], 0.1),
    'text/ln_final/scale': ('text', [1.0], 0.0),
}


def _small_params(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  q_proj = normal(2, 4, 3)
  q_proj[0] = 0
  flat = {
      'logit_scale': np.float32(2.5),
      'visual/blocks/attn/q_proj/kernel': q_proj,
      'visual/blocks/attn/q_bias': 0.1 * normal(2, 3),
      'visual/patch_embed/kernel': normal(2, 2, 3, 4),
      'visual/pos_embed': 100 * normal(1, 5, 4),
      'visual/head/kernel': 1e-6 * normal(4, 2),
      'visual/head/bias': np.zeros(2, np.float32),
      'text/blocks/mlp/c_fc/kernel': normal(3, 4, 5),
      'text/token_embedding/embedding': normal(10, 4),
      'text/ln_final/scale': np.ones(4, np.float32),
  }
  return flat, [{k: normal(*np.shape(v)) for k, v in flat.items()} for _ in range(3)]


def _nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = np.asarray(value)
  return tree


def _flat(tree):
  return {path_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _run_jax(config, flat_params, flat_grads, visual_depth=2, text_depth=3):
  params = _nest(flat_params)
  opt = opt_lib.make_optimizer(config, params, visual_depth=visual_depth, text_depth=text_depth).tx
  state = jax.jit(opt.init)(params)
  update = jax.jit(opt.update)
  history = []
  for grads in flat_grads:
    updates, state = update(_nest(grads), state, params)
    # optax.apply_updates in NumPy: float32 p + u, without compiling an eager add per leaf.
    params = jax.tree.map(lambda p, u: np.asarray(p) + np.asarray(u), params, updates)
    history.append((_flat(params), _flat(updates)))
  return history


def _tensors(flat):
  """(name, layer, tower, lr scale, wd, tensor) for every original tensor: stacked leaves split into layers."""
  out = []
  for name, (tower, scales, wd) in SMALL_RULES.items():
    if name not in flat:
      continue
    layers = list(flat[name]) if '/blocks/' in name else [flat[name]]
    out += [(name, i, tower, np.float32(scales[i]), np.float32(wd), layer) for i, layer in enumerate(layers)]
  return out


def _ref_run(config, flat_params, flat_grads, step_fn):
  """Per-tensor loop with torch-style global clipping; `step_fn(p, g, m, v, lr, wd, t)` -> (p change, m, v)."""
  peaks = {t: config.lr[t] for t in ('visual', 'text', 'base')}
  tensors = _tensors(flat_params)
  params = [np.array(x[-1], np.float32) for x in tensors]
  ms, vs = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
  history = []
  deltas = [None] * len(params)
  for step, grads in enumerate(flat_grads):
    gs = [np.array(x[-1], np.float32) for x in _tensors(grads)]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs))
    factor = min(1.0, config.optimizer.grad_clip_norm / (norm + 1e-6))
    assert factor < 1  # the test grads are large enough to be clipped
    for i, (name, layer, tower, scale, wd, _) in enumerate(tensors):
      lr = np.float32(scale * _ref_lr(peaks[tower], step, config.schedule.warmup_steps, config.total_steps))
      deltas[i], ms[i], vs[i] = step_fn(params[i], np.float32(factor) * gs[i], ms[i], vs[i], lr, wd, step + 1)
      params[i] = params[i] + deltas[i]
    history.append((_restack(tensors, params), _restack(tensors, deltas)))
  return history


def _restack(tensors, values):
  out = {}
  for (name, *_), value in zip(tensors, values):
    out.setdefault(name, []).append(value)
  return {k: np.stack(v) if '/blocks/' in k else v[0] for k, v in out.items()}


TRUSTS = []


def _deepspeed_lamb(p, g, m, v, lr, wd, t, b1=0.9, b2=0.98, eps=1e-6):
  """fused_lamb_cuda_kernel.cu, mode 1 (eps outside the sqrt), bias correction on, min/max coeff 0.01 / 10."""
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  update = m / (np.sqrt(v) + eps) + wd * p
  w_norm, u_norm = np.sqrt(np.sum(p * p)), np.sqrt(np.sum(update * update))
  coeff = 1.0
  if w_norm != 0 and u_norm != 0:
    coeff = min(max(w_norm / u_norm, 0.01), 10.0)
  TRUSTS.append(coeff)
  step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
  return -np.float32(step_size * coeff) * update, m, v  # the kernel's p - step_size * coeff * update


def test_lamb_matches_deepspeed_per_tensor():
  config = _config('lamb')
  params, grads = _small_params()
  TRUSTS.clear()
  expected = _ref_run(config, params, grads, _deepspeed_lamb)
  got = _run_jax(config, params, grads)
  # The test exercises both clamps and the zero-norm case (head/bias and q_proj layer 0 at step 1).
  assert 10.0 in TRUSTS and 0.01 in TRUSTS and TRUSTS[:len(_tensors(params))].count(1.0) >= 2
  for step, ((want, want_update), (have, have_update)) in enumerate(zip(expected, got)):
    for name in SMALL_RULES:
      np.testing.assert_allclose(have[name], want[name], rtol=1e-6, atol=1e-6, err_msg=f'{name} step {step}')
      np.testing.assert_allclose(have_update[name], want_update[name], rtol=1e-5,
                                 atol=1e-6 * np.abs(want_update[name]).max(), err_msg=f'{name} step {step} (update)')


def _torch_adamw_run(config, flat_params, flat_grads):
  """torch.optim.AdamW with the reference's param groups, lr = scale * schedule(step), clip_grad_norm_."""
  peaks = {t: config.lr[t] for t in ('visual', 'text', 'base')}
  tensors = _tensors(flat_params)
  leaves = [torch.tensor(x[-1], requires_grad=True) for x in tensors]
  groups = [dict(params=[p], weight_decay=float(wd), lr_scale=float(scale), tower=tower)
            for p, (_, _, tower, scale, wd, _) in zip(leaves, tensors)]
  opt = torch.optim.AdamW(groups, lr=0.0, betas=(config.optimizer.b1, config.optimizer.b2), eps=config.optimizer.eps,
                          foreach=False)
  history = []
  for step, grads in enumerate(flat_grads):
    for p, x in zip(leaves, _tensors(grads)):
      p.grad = torch.tensor(x[-1])
    torch.nn.utils.clip_grad_norm_(leaves, config.optimizer.grad_clip_norm)
    for group in opt.param_groups:
      group['lr'] = group['lr_scale'] * _ref_lr(peaks[group['tower']], step, config.schedule.warmup_steps,
                                                config.total_steps)
    opt.step()
    out = {}
    for (name, *_), p in zip(tensors, leaves):
      out.setdefault(name, []).append(p.detach().numpy().copy())
    history.append({k: np.stack(v) if '/blocks/' in k else v[0] for k, v in out.items()})
  return history


def test_adamw_matches_torch():
  config = _config('adamw')
  params, grads = _small_params(1)
  names = ('logit_scale', 'visual/blocks/attn/q_proj/kernel', 'visual/head/bias', 'text/token_embedding/embedding')
  params = {k: params[k] for k in names}
  grads = [{k: g[k] for k in names} for g in grads]
  expected = _torch_adamw_run(config, params, grads)
  got = [p for p, _ in _run_jax(config, params, grads)]
  for step, (want, have) in enumerate(zip(expected, got)):
    for name in names:
      np.testing.assert_allclose(have[name], want[name], rtol=1e-6, atol=1e-6, err_msg=f'{name} step {step}')
      moved = want[name] - params[name]
      np.testing.assert_allclose(have[name] - params[name], moved, rtol=1e-3, atol=1e-3 * np.abs(moved).max() + 1e-9,
                                 err_msg=f'{name} step {step} (update)')


def test_optax_lamb_matches_optax():
  """Unstacked leaves, one rate, no clipping, no layer decay: exactly optax.lamb with a decay mask."""
  config = _config('optax_lamb', warmup=0, clip=0.0, decay='constant')
  config.lr.update(dict(visual=1e-2, text=1e-2, base=1e-2))
  config.layer_decay.update(dict(visual=1.0, text=1.0))
  config.weight_decay.update(dict(visual=0.1, text=0.1, base=0.1))
  params, grads = _small_params(2)
  params = {k: v for k, v in params.items() if '/blocks/' not in k}
  grads = [{k: g[k] for k in params} for g in grads]
  got = [p for p, _ in _run_jax(config, params, grads)]
  mask = _nest({k: not (np.ndim(v) <= 1 or k.endswith('bias') or k.endswith('pos_embed') or k == 'logit_scale')
                for k, v in params.items()})
  mask = jax.tree.map(lambda x: bool(x), mask)
  reference = optax.lamb(1e-2, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, mask=mask)
  tree = _nest(params)
  state = jax.jit(reference.init)(tree)
  update = jax.jit(reference.update)
  for step, g in enumerate(grads):
    updates, state = update(_nest(g), state, tree)
    tree = jax.tree.map(lambda p, u: p + np.asarray(u), tree, updates)
    for name, value in _flat(tree).items():
      np.testing.assert_allclose(got[step][name], value, rtol=1e-6, atol=1e-7, err_msg=f'{name} step {step}')


def test_schedule_matches_reference():
  config = _config(warmup=10, total=110, end_lr=1e-4)
  schedules = opt_lib.make_schedules(config)
  for step in (0, 9, 10, 60, 109, 110, 500):
    for tower in ('visual', 'text', 'base'):
      want = _ref_lr(config.lr[tower], step, 10, 110, 1e-4)
      assert float(jax.jit(schedules[tower])(step)) == pytest.approx(want, rel=1e-6), (tower, step)
  assert float(schedules['visual'](110)) == pytest.approx(1e-4)
  assert float(schedules['text'](9)) == pytest.approx(2e-2)
  tree = {'visual': {'head': {'kernel': np.zeros((2, 2), np.float32)}}}
  returned = opt_lib.make_optimizer(config, tree, visual_depth=2, text_depth=3).schedules  # what the step logs
  assert [float(returned['visual'](s)) for s in (0, 60)] == [float(schedules['visual'](s)) for s in (0, 60)]
  constant = opt_lib.make_schedules(_config(warmup=10, total=110, decay='constant'))['base']
  assert [float(constant(s)) for s in (4, 10, 100)] == pytest.approx([2.5e-2, 5e-2, 5e-2])


def test_step_argument_drives_the_schedule():
  config = _config('lamb', warmup=4, total=20, clip=0.0)
  rng = np.random.default_rng(3)
  tree = {'visual': {'head': {'kernel': rng.normal(size=(4, 3)).astype(np.float32)}}}
  grads = {'visual': {'head': {'kernel': rng.normal(size=(4, 3)).astype(np.float32)}}}
  opt = opt_lib.make_optimizer(config, tree, visual_depth=2, text_depth=3).tx
  state = jax.jit(opt.init)(tree)
  update = jax.jit(opt.update)
  at_count, _ = update(grads, state, tree)  # count 0: the rate at step 0
  at_step, _ = update(grads, state, tree, step=7)
  ratio = _ref_lr(1e-2, 7, 4, 20) / _ref_lr(1e-2, 0, 4, 20)
  np.testing.assert_allclose(at_step['visual']['head']['kernel'], ratio * at_count['visual']['head']['kernel'],
                             rtol=1e-5)


# Norms near 4 and near 4e-4: the small one makes torch's 1e-6 in max_norm / (norm + 1e-6) visible in float32.
@pytest.mark.parametrize('size,max_norm', [(1.0, 0.5), (1.0, 100.0), (1e-4, 1e-4)])
def test_clipping_matches_torch(size, max_norm):
  rng = np.random.default_rng(4)
  grads = {'a': size * rng.normal(size=(3, 4)).astype(np.float32),
           'b': {'c': size * rng.normal(size=(5,)).astype(np.float32)}}
  leaves = [torch.tensor(grads['a']), torch.tensor(grads['b']['c'])]
  params = [torch.zeros_like(x, requires_grad=True) for x in leaves]
  for p, g in zip(params, leaves):
    p.grad = g.clone()
  norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
  clipped, got_norm = jax.jit(opt_lib.clip_by_global_norm, static_argnums=1)(jax.tree.map(jnp.asarray, grads),
                                                                             max_norm)
  assert float(got_norm) == pytest.approx(float(norm), rel=1e-6)
  np.testing.assert_allclose(clipped['a'], params[0].grad.numpy(), rtol=1e-6)
  np.testing.assert_allclose(clipped['b']['c'], params[1].grad.numpy(), rtol=1e-6)


def test_clamp_logit_scale():
  params = {'logit_scale': jnp.float32(5.0), 'visual': {'w': jnp.ones(2)}}
  assert float(opt_lib.clamp_logit_scale(params)['logit_scale']) == pytest.approx(math.log(100))
  assert float(opt_lib.clamp_logit_scale({**params, 'logit_scale': jnp.float32(-1.0)})['logit_scale']) == 0.0
  assert opt_lib.clamp_logit_scale(params)['visual'] is params['visual']


@pytest.mark.parametrize('name', opt_lib.UPDATE_FNS)
def test_b16_shapes_under_jit(name):
  """init + update traced (not run) on EVA02-CLIP-B-16's abstract parameters; moments map like the parameters."""
  params, spec = _abstract_params('EVA02-CLIP-B-16')
  config = _config(name)
  opt = opt_lib.make_optimizer(config, params, visual_depth=spec.vision.depth, text_depth=spec.text.depth).tx
  state = jax.eval_shape(opt.init, params)
  updates, new_state = jax.eval_shape(jax.jit(opt.update), params, state, params)
  same = lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype)  # noqa: E731
  assert all(jax.tree.leaves(jax.tree.map(same, updates, params)))
  assert all(jax.tree.leaves(jax.tree.map(same, new_state.mu, params)))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  marked = optax.tree_map_params(opt, lambda _: 'param', state, transform_non_params=lambda _: 'other')
  assert marked.count == 'other' and set(jax.tree.leaves(marked.mu)) == {'param'}
  groups = opt_lib.param_groups(params, visual_depth=12, text_depth=12, config=config)
  np.testing.assert_allclose(groups['visual/blocks/attn/q_proj/kernel'].lr_scale, 0.5 ** np.arange(12, 0, -1))


def test_rejects_unknown_names_and_depth_mismatch():
  params, _ = _abstract_params('tiny')
  with pytest.raises(ValueError, match='unknown optimizer'):
    opt_lib.make_optimizer(_config('sgd'), params, visual_depth=2, text_depth=2)
  with pytest.raises(ValueError, match='depth'):
    opt_lib.param_groups(params, visual_depth=3, text_depth=2, config=_config())
  with pytest.raises(ValueError, match='decay'):
    opt_lib.make_schedules(_config(decay='linear'))

"""The EVA-CLIP optimizer: per-parameter learning-rate scales and weight decay, per-tower schedules, and LAMB as
DeepSpeed's FusedLamb ran it (or AdamW), as one `optax.GradientTransformation`.

Parameter groups are keyed by '/'-joined parameter paths ('visual/blocks/attn/q_proj/kernel', `models.paths`). Every
leaf under a tower's 'blocks' is stacked: its leading axis is the layer, so its layer ids and learning-rate scales
are arrays along that axis, and LAMB takes its norms per layer, as the reference did on each layer's own tensor.

Locked towers (open_clip's --lock-image / --lock-text, `config.lock_towers`): a parameter's group says how many of its
leading rows are frozen (`ParamGroup.frozen`): all of a locked leaf, the first layers of a stacked leaf whose last
blocks stay unlocked. The optimizer works on the trainable view of the parameters (`trainable_view`): a frozen
leaf is an empty array there, a partly frozen stacked leaf its trainable layers, so frozen parameters have no
moments, no gradient and no update; `merge_trainable` puts the view back into the whole parameters.

Sources: baaivision/EVA EVA-CLIP/rei/training/{optim,scheduler}.py (groups, layer ids, schedule) and DeepSpeed's
csrc/lamb/fused_lamb_cuda_kernel.cu (the update). One difference remains: the reference ran LAMB under ZeRO stage 1,
which hands the optimizer flat per-group partitions; the trust ratios here are per parameter tensor, as LAMB means.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eva_clip_jax.errors import InputError
from eva_clip_jax.models.paths import path_name

TOWERS = ('visual', 'text')
# Parameters the reference treats by name (a whole path component): (embedding, decay). embedding: layer id 0, the
# reference's get_num_layer_for_transformer; decay False: in the towers' or the model's no_weight_decay() sets.
# Everything else: blocks by layer, the rest of a tower (final norm, head) its last group; decay unless the tensor is
# a vector (rank <= 1 per layer) or a '*bias'.
NAMED_PARAMS = {
    'patch_embed': (True, True), 'conv1': (True, True), 'token_embedding': (True, True), 'mask_token': (True, True),
    'pos_embed': (True, False), 'positional_embedding': (True, False), 'cls_token': (True, False),
    'logit_scale': (False, False),
}


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """How one parameter is trained (the reference's parameter groups). For stacked leaves `layer_ids` and
  `lr_scale` have one entry per layer; the 'base' tower (logit_scale, anything outside the towers) has layer id 0
  and scale 1."""
  tower: str
  shape: tuple[int, ...]
  layer_ids: np.ndarray | int
  lr_scale: np.ndarray | float
  weight_decay: float
  stacked: bool
  frozen: int = 0  # leading rows (layers of a stacked leaf) that are locked; 'all' rows: see `fully_frozen`

  @property
  def fully_frozen(self) -> bool:
    return self.frozen > 0 and self.frozen >= (self.shape[0] if self.stacked else 1)


def _frozen_rows(tower: str, ids, stacked: bool, depths: dict, lock) -> int:
  """How many leading rows of a leaf a locked tower freezes: the tower's layer groups (ids 0 .. depth + 1) below
  the last `unlocked_groups` are locked."""
  if tower == 'base' or not lock or not lock.get(tower, False):
    return 0
  unlocked = int(lock.get(f'{tower}_unlocked_groups', 0))
  if unlocked < 0:
    raise InputError(f'config.lock_towers.{tower}_unlocked_groups must be >= 0, got {unlocked}')
  first_unlocked = depths[tower] + 2 - unlocked
  locked = np.atleast_1d(ids) < first_unlocked
  return int(locked.sum()) if stacked else int(locked[0])


def param_groups(params: Any, *, visual_depth: int, text_depth: int, config) -> dict[str, ParamGroup]:
  """One group per leaf of `params` (arrays or ShapeDtypeStructs), in tree order."""
  depths = {'visual': visual_depth, 'text': text_depth}
  lock = config.get('lock_towers')
  groups = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name, shape = path_name(path), tuple(leaf.shape)
    keys = name.split('/')
    tower = keys[0] if keys[0] in TOWERS and len(keys) > 1 else 'base'
    stacked = tower != 'base' and keys[1] == 'blocks'
    named = [NAMED_PARAMS[k] for k in keys if k in NAMED_PARAMS]
    embedding, decay = named[0] if named else (False, True)
    if tower == 'base':
      ids, scale = 0, 1.0
    else:
      depth = depths[tower]
      if stacked:
        if not shape or shape[0] != depth:
          raise ValueError(f'{name}: stacked leaf of shape {shape} does not lead with the {tower} depth {depth}')
        ids = np.arange(1, depth + 1)
      else:
        ids = 0 if embedding else depth + 1
      # The reference's LayerDecayValueAssigner: decay^(L + 1 - id), so the tower's last group trains at 1x.
      scale = float(config.layer_decay[tower]) ** (depth + 1 - ids)  # an array for stacked ids, else a float
    rank = len(shape) - int(stacked)  # a stacked [L, D] bias is one rank-1 tensor per layer
    decay = decay and rank > 1 and not keys[-1].endswith('bias')
    groups[name] = ParamGroup(tower=tower, shape=shape, layer_ids=ids, lr_scale=scale,
                              weight_decay=float(config.weight_decay[tower]) if decay else 0.0, stacked=stacked,
                              frozen=_frozen_rows(tower, ids, stacked, depths, lock))
  return groups


def trainable_view(params: Any, groups: dict[str, ParamGroup]) -> Any:
  """`params` as the optimizer sees them: a locked leaf is an empty (0,) array, a partly locked stacked leaf its
  trainable layers, every other leaf itself (no copy). The tree keeps the parameters' structure."""
  def view(path, p):
    group = groups[path_name(path)]
    if group.fully_frozen:
      return jnp.zeros((0,), p.dtype)
    return p[group.frozen:] if group.frozen else p
  return jax.tree_util.tree_map_with_path(view, params)


def _view_shape(group: ParamGroup, shape: tuple[int, ...]) -> tuple[int, ...]:
  """A leaf's shape in the trainable view, from shapes alone (init also runs on ShapeDtypeStructs)."""
  if group.fully_frozen:
    return (0,)
  return (shape[0] - group.frozen, *shape[1:]) if group.frozen else tuple(shape)


def merge_trainable(params: Any, view: Any, groups: dict[str, ParamGroup]) -> Any:
  """The whole parameters: `view`'s trainable parts with the locked parts of `params` (no gradient flows into
  these even when `params` is being differentiated)."""
  def merge(path, p, v):
    group = groups[path_name(path)]
    if group.fully_frozen:
      return jax.lax.stop_gradient(p)
    if group.frozen:
      return jnp.concatenate([jax.lax.stop_gradient(p[:group.frozen]), v.astype(p.dtype)], axis=0)
    return v
  return jax.tree_util.tree_map_with_path(merge, params, view)


def _short(values, fmt: str) -> str:
  values = np.atleast_1d(values)
  if len(values) > 4:
    return f'{values[0]:{fmt}} .. {values[-1]:{fmt}}'
  return ', '.join(f'{v:{fmt}}' for v in values)


def describe_group(group: ParamGroup) -> tuple[str, str, str, str]:
  """(tower, layer ids, lr scale, weight decay) as short strings, for the start-up parameter table."""
  layer = '-' if group.tower == 'base' else _short(group.layer_ids, 'd')
  if group.fully_frozen:
    return group.tower, layer, 'locked', f'{group.weight_decay:g}'
  scale = _short(group.lr_scale, '.4g') + (f' (layers < {group.frozen} locked)' if group.frozen else '')
  return group.tower, layer, scale, f'{group.weight_decay:g}'


def _schedule(peak: float, warmup: int, total: int, decay: str, end: float) -> Callable[[Any], jax.Array]:
  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1) / max(warmup, 1)
    if decay == 'constant':
      after = jnp.full_like(step, peak)
    else:
      # 0.5 * (1 + cos(pi e / es)) written as sin(pi (es - e) / (2 es))^2: the same value, but float32 keeps its
      # relative precision to the last step instead of cancelling in 1 + cos(~pi).
      left = jnp.clip((total - step) / max(total - warmup, 1), 0.0, 1.0)
      after = end + jnp.square(jnp.sin(0.5 * jnp.pi * left)) * (peak - end)
    return jnp.where(step < warmup, warm, after)
  return lr


def make_schedules(config) -> dict[str, Callable[[Any], jax.Array]]:
  """Per-tower peak-rate schedules (step -> lr), the reference's warmup_cosine_lr with an optional floor."""
  decay = config.schedule.decay
  if decay not in ('cosine', 'constant'):
    raise InputError(f"unknown schedule decay {decay!r}; use 'cosine' or 'constant'")
  return {tower: _schedule(float(config.lr[tower]), int(config.schedule.warmup_steps), int(config.total_steps),
                           decay, float(config.schedule.get('end_lr', 0.0)))
          for tower in ('visual', 'text', 'base')}


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all leaves together, accumulated in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
  """torch.nn.utils.clip_grad_norm_ (and DeepSpeed's gradient_clipping): scales by max_norm / (norm + 1e-6) when
  that is below 1. Returns the clipped gradients and the norm before clipping."""
  norm = global_norm(grads)
  factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
  return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads), norm


def clamp_logit_scale(params: dict, max_value: float = math.log(100)) -> dict:
  """The reference clamps logit_scale to [0, ln 100] after every step."""
  return {**params, 'logit_scale': jnp.clip(params['logit_scale'], 0.0, max_value)}


class OptState(NamedTuple):
  count: jax.Array  # updates applied so far (skipped steps restore the old state, so they do not count)
  mu: Any
  nu: Any


def _norm(x: jax.Array, stacked: bool) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(int(stacked), x.ndim)), keepdims=True))


def _lamb(p, m, v, *, lr, scale, wd, stacked, bc1, bc2, hp):
  """DeepSpeed FusedLamb: eps outside the square root of the uncorrected v, bias correction on the step size, trust
  ratio ||p|| / ||u|| clamped, for every tensor (weight decay or not)."""
  u = m / (jnp.sqrt(v) + hp['eps']) + wd * p
  w_norm, u_norm = _norm(p, stacked), _norm(u, stacked)
  trust = jnp.clip(w_norm / jnp.where(u_norm > 0, u_norm, 1.0), hp['min_trust'], hp['max_trust'])
  trust = jnp.where((w_norm > 0) & (u_norm > 0), trust, 1.0)
  return -(lr * jnp.sqrt(bc2) / bc1 * scale * trust) * u


def _adamw(p, m, v, *, lr, scale, wd, stacked, bc1, bc2, hp):
  """torch.optim.AdamW: decoupled decay p *= 1 - lr * wd, then the bias-corrected Adam step."""
  lr = lr * scale
  return -(lr * wd) * p - (lr / bc1) * m / (jnp.sqrt(v) / jnp.sqrt(bc2) + hp['eps'])


def _optax_lamb(p, m, v, *, lr, scale, wd, stacked, bc1, bc2, hp):
  """optax.lamb: bias-corrected Adam direction plus decay, unclamped trust ratio. Like optax, the norms are over the
  whole leaf, so a stacked leaf counts as one tensor (unlike 'lamb', which is per layer)."""
  u = (m / bc1) / (jnp.sqrt(v / bc2) + hp['eps']) + wd * p
  w_norm, u_norm = _norm(p, False), _norm(u, False)
  trust = jnp.where((w_norm > 0) & (u_norm > 0), w_norm / jnp.where(u_norm > 0, u_norm, 1.0), 1.0)
  return -(lr * scale * trust) * u


UPDATE_FNS = {'lamb': _lamb, 'adamw': _adamw, 'optax_lamb': _optax_lamb}  # config.optimizer.name -> update


class Optimizer(NamedTuple):
  """What `make_optimizer` builds: the transformation, the per-tower schedules it follows (for logging) and the
  parameter groups it applies (for the start-up table)."""
  tx: optax.GradientTransformationExtraArgs
  schedules: dict[str, Callable[[Any], jax.Array]]
  groups: dict[str, ParamGroup]


def make_optimizer(config, params: Any, *, visual_depth: int, text_depth: int) -> Optimizer:
  """The recipe's optimizer for `params` (arrays or ShapeDtypeStructs; only names and shapes are read).

  `tx.update(grads, state, params, step=None)` clips the gradients, then returns updates to add to the parameters.
  The schedules read `step` when given (the reference indexes them by iteration, skipped fp16 steps included) and
  the count of applied updates otherwise. With locked parameters (`config.lock_towers`), `init`, `update`, the gradients
  and the parameters it is given are all `trainable_view`s; without, the view is the parameters themselves.
  """
  opt = config.optimizer
  if opt.name not in UPDATE_FNS:
    raise InputError(f'unknown optimizer {opt.name!r}; use one of {tuple(UPDATE_FNS)}')
  update_fn = UPDATE_FNS[opt.name]
  groups = param_groups(params, visual_depth=visual_depth, text_depth=text_depth, config=config)
  schedules = make_schedules(config)
  hp = dict(b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps), min_trust=float(opt.get('min_trust', 0.01)),
            max_trust=float(opt.get('max_trust', 10.0)))
  max_norm = opt.get('grad_clip_norm', None)

  def init(params):
    # Moments of the trainable view: none for locked parameters. tree_map keeps this valid for
    # optax.tree_map_params, which calls init on a leafless placeholder.
    zeros = lambda path, p: jnp.zeros(_view_shape(groups[path_name(path)], jnp.shape(p)), jnp.float32)  # noqa
    moments = lambda: jax.tree_util.tree_map_with_path(zeros, params)  # noqa: E731
    return OptState(jnp.zeros([], jnp.int32), moments(), moments())

  def update(grads, state, params=None, *, step=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('the EVA-CLIP optimizer needs the parameters (weight decay, trust ratios)')
    if max_norm:
      grads, _ = clip_by_global_norm(grads, float(max_norm))
    count = state.count + 1
    t = count.astype(jnp.float32)
    bc1, bc2 = 1 - hp['b1'] ** t, 1 - hp['b2'] ** t  # bias corrections
    lrs = {tower: fn(state.count if step is None else step) for tower, fn in schedules.items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
    ps, ms, vs = (treedef.flatten_up_to(tree) for tree in (params, state.mu, state.nu))
    updates, mus, nus = [], [], []
    for (path, g), p, m, v in zip(leaves, ps, ms, vs):
      group = groups[path_name(path)]
      if group.fully_frozen:  # an empty leaf of the trainable view
        updates.append(g)
        mus.append(m)
        nus.append(v)
        continue
      g, p32 = g.astype(jnp.float32), p.astype(jnp.float32)
      m = hp['b1'] * m + (1 - hp['b1']) * g
      v = hp['b2'] * v + (1 - hp['b2']) * g * g
      scale = np.asarray(group.lr_scale, np.float32)
      scale = scale[group.frozen:] if group.stacked else scale  # the trainable layers of a partly locked leaf
      scale = scale.reshape(scale.shape + (1,) * (p.ndim - scale.ndim))  # per layer along a stacked leaf's axis 0
      u = update_fn(p32, m, v, lr=lrs[group.tower], scale=scale, wd=group.weight_decay, stacked=group.stacked,
                    bc1=bc1, bc2=bc2, hp=hp)
      updates.append(u.astype(p.dtype))
      mus.append(m)
      nus.append(v)
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
    return unflat(updates), OptState(count, unflat(mus), unflat(nus))

  return Optimizer(optax.GradientTransformationExtraArgs(init, update), schedules, groups)

"""The training setup (model graph, optimizer, shardings) and the jitted train step, over one mesh."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_clip_jax import transforms
from eva_clip_jax.errors import InputError
from eva_clip_jax.models import create_model
from eva_clip_jax.models.factory import model_from_params
from eva_clip_jax.models.paths import flat_paths
from eva_clip_jax.training import accumulate
from eva_clip_jax.training import loss_scale as loss_scale_lib
from eva_clip_jax.training import optimizer as optimizer_lib
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training.loss import sharded_clip_loss
from eva_clip_jax.training.state import TrainState

BATCH_KEYS = ('image', 'text')  # what the step consumes; labels and skip counts stay on the host


@dataclasses.dataclass
class TrainSetup:
  """What the step needs besides the state: the model's graph, the optimizer and the state's layout on the mesh."""
  config: Any
  mesh: Mesh
  graphdef: Any
  param_template: nnx.State  # abstract parameters with their metadata, to rebuild the model from a pure dict
  optimizer: optimizer_lib.Optimizer
  logical_axes: dict[str, tuple[str | None, ...]]  # {parameter path: logical axis names}
  shardings: TrainState  # of NamedShardings
  abstract_state: TrainState  # of ShapeDtypeStructs carrying those shardings

  def model(self, params: Any) -> nnx.Module:
    """The model holding `params` (a pure dict); usable inside jit."""
    return model_from_params(self.graphdef, self.param_template, params)

  def parameter_table(self) -> str:
    """One row per parameter: shape, logical axes -> mesh axes, layer, LR scale and weight decay."""
    rows = [('parameter', 'shape', 'logical axes', 'mesh axes', 'tower', 'layer', 'lr scale', 'wd')]
    params = self.abstract_state.params
    for path, sharding in zip(flat_paths(params), jax.tree.leaves(self.shardings.params)):
      group = self.optimizer.groups[path]
      axes = ', '.join(str(a) for a in self.logical_axes[path])
      spec = ', '.join(str(a) for a in sharding.spec) or '-'
      rows.append((path, str(group.shape), axes, spec, *optimizer_lib.describe_group(group)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def model_kwargs(config) -> dict:
  """create_model's arguments from the config (the model is mesh-free: the step pins its activations where it traces
  it, `sharding.activation_sharding`)."""
  m = config.model
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
              scan_layers=m.scan_layers, drop_path_rate=m.drop_path_rate, patch_dropout=m.patch_dropout)


def init_loss_scale(config) -> loss_scale_lib.LossScaleState:
  return loss_scale_lib.init_loss_scale(config.model.dtype == 'float16', **config.loss_scale)


def make_setup(config, mesh: Mesh) -> TrainSetup:
  abstract_model = create_model(config.model.name, seed=config.seed, abstract=True, **model_kwargs(config))
  graphdef, param_template = nnx.split(abstract_model, nnx.Param)
  abstract_params = param_template.to_pure_dict()
  spec = abstract_model.spec
  optimizer = optimizer_lib.make_optimizer(config, abstract_params, visual_depth=spec.vision.depth,
                                           text_depth=spec.text.depth)
  strategy = config.sharding.strategy
  logical_axes = sharding_lib.logical_axes(param_template)
  param_sh = sharding_lib.param_shardings(abstract_params, logical_axes, mesh, strategy, config.sharding.axis_rules)
  if strategy == 'fsdp':
    sharding_lib.check_fsdp_sharding(param_sh, abstract_params, mesh,
                                     max_replicated_fraction=config.sharding.max_replicated_fraction)
  problem = sharding_lib.tensor_heads_problem(mesh, {'image': spec.vision.num_heads, 'text': spec.text.num_heads})
  if problem:
    logging.warning('%s', problem)
  moment_sh = _moment_shardings(param_sh, abstract_params, optimizer, mesh, strategy)
  abstract = jax.eval_shape(lambda: TrainState.create(params=abstract_params, tx=optimizer.tx,
                                                      loss_scale=init_loss_scale(config), seed=config.seed + 1))
  shardings = abstract.shardings(params=param_sh, moments=moment_sh, tx=optimizer.tx, mesh=mesh)
  return TrainSetup(config, mesh, graphdef, param_template, optimizer, logical_axes, shardings,
                    abstract.with_shardings(shardings))


def _moment_shardings(param_sh: Any, abstract_params: Any, optimizer: optimizer_lib.Optimizer, mesh: Mesh,
                      strategy: str) -> Any:
  """Shardings of the optimizer moments, which are shaped like the trainable view of the parameters: a locked
  leaf's (empty) moments are replicated, a partly locked stacked leaf's keep its layout but for the layer axis."""
  view = jax.eval_shape(lambda p: optimizer_lib.trainable_view(p, optimizer.groups), abstract_params)

  def base(sharding: NamedSharding, v, p) -> NamedSharding:
    if v.shape == p.shape:
      return sharding
    return NamedSharding(mesh, P(None, *sharding.spec[1:]) if v.size else P())

  moment_sh = sharding_lib.optimizer_state_shardings(jax.tree.map(base, param_sh, view, abstract_params), view,
                                                     mesh, strategy)
  return jax.tree.map(lambda sh, v: sh if v.size else NamedSharding(mesh, P()), moment_sh, view)


def init_state(setup: TrainSetup, params: Any | None = None) -> TrainState:
  """A fresh, sharded state. `params` (a pure dict on the host, e.g. from EVA/CLIP initial weights) replaces the
  random initialisation."""
  config = setup.config

  def init(params):
    if params is None:
      params = _random_params(config)
    return TrainState.create(params=params, tx=setup.optimizer.tx, loss_scale=init_loss_scale(config),
                             seed=config.seed + 1)

  if params is not None:
    params = jax.device_put(params, setup.shardings.params)
    return jax.jit(init, out_shardings=setup.shardings)(params)
  return jax.jit(lambda: init(None), out_shardings=setup.shardings)()


def _random_params(config) -> dict:
  model = create_model(config.model.name, seed=config.seed, **model_kwargs(config))
  return nnx.state(model, nnx.Param).to_pure_dict()


def random_params(setup: TrainSetup) -> dict:
  """The seed's random parameters, made on the devices in their shardings (no host copy): what `init_state` starts
  from without initial weights."""
  return jax.jit(functools.partial(_random_params, setup.config), out_shardings=setup.shardings.params)()


def micro_batches(config) -> int:
  """config.accum_steps (absent or 0: 1). Each micro-batch takes an equal share of every data-parallel device's rows
  (accumulate.split_micro_batches), so a per-device batch must be a multiple of it: the one divisibility the step
  needs beyond the data-parallel split itself (tests/test_plan.py's search respects it)."""
  steps = int(config.get('accum_steps', 1) or 1)
  if steps < 1:
    raise InputError(f'accum_steps must be at least 1, got {steps}')
  return steps


def make_train_step(setup: TrainSetup) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The jitted step: (state, batch) -> (state, metrics). The state is donated.

  A step whose gradients are not finite (float16 overflow, or a bad batch under any dtype) changes neither the
  parameters nor the optimizer state; it is counted in `loss_scale.skipped`. Locked parameters (`config.lock_towers`) are
  left out of differentiation and of the optimizer (`optimizer.trainable_view`). `config.accum_steps` > 1 runs the
  batch as that many micro-batches with the whole batch's loss and gradients (`accumulate.py`).
  """
  config, mesh = setup.config, setup.mesh
  tx, schedules, groups = setup.optimizer.tx, setup.optimizer.schedules, setup.optimizer.groups
  label_smoothing = float(config.get('label_smoothing', 0.0))
  accum_steps = micro_batches(config)
  dp = sharding_lib.data_parallel_size(mesh)
  if config.batch_size % (accum_steps * dp):
    raise InputError(f'batch_size {config.batch_size} does not split into accum_steps={accum_steps} micro-batches '
                     f'over the {dp} data-parallel devices')

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    scale = state.loss_scale.scale
    view = optimizer_lib.trainable_view(state.params, groups)

    def encode(view, images, text, rng):
      # uint8 from the input pipeline, normalised here (per micro-batch under accumulation: 4x fewer bytes held)
      images = transforms.normalize_images(images)
      model = setup.model(optimizer_lib.merge_trainable(state.params, view, groups))
      with sharding_lib.activation_sharding(mesh):  # the residual stream batch-sharded, as the data
        return model(images, text, train=True, rng=rng)

    def feature_loss(image_features, text_features, logit_scale):
      loss = sharded_clip_loss(image_features, text_features, logit_scale, mesh=mesh,
                               batch_axes=sharding_lib.BATCH_AXES, label_smoothing=label_smoothing)
      return loss * scale

    if accum_steps == 1:
      def loss_fn(view):
        image_features, text_features, logit_scale = encode(view, batch['image'], batch['text'], rng)
        return feature_loss(image_features, text_features, logit_scale), logit_scale

      (scaled_loss, logit_scale), grads = jax.value_and_grad(loss_fn, has_aux=True)(view)
    else:
      scaled_loss, logit_scale, grads = accumulate.accumulated_value_and_grad(
          encode, feature_loss, view, batch, rng, accum_steps=accum_steps, mesh=mesh,
          batch_axes=sharding_lib.BATCH_AXES)
    loss = scaled_loss / scale
    grads = jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
    finite = loss_scale_lib.all_finite(grads)
    updates, opt_state = tx.update(grads, state.opt_state, view, step=state.step)
    params = optimizer_lib.merge_trainable(state.params, optax.apply_updates(view, updates), groups)
    params = optimizer_lib.clamp_logit_scale(params)
    params, opt_state = loss_scale_lib.select_tree(finite, (params, opt_state), (state.params, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              loss_scale=loss_scale_lib.update_loss_scale(state.loss_scale, finite))
    metrics = {
        'loss': loss, 'logit_scale': logit_scale, 'grad_norm': optimizer_lib.global_norm(grads),
        'loss_scale': scale, 'skipped_steps': new_state.loss_scale.skipped,
        **{f'lr/{tower}': fn(state.step) for tower, fn in schedules.items()},
    }
    return new_state, metrics

  batch_sh = sharding_lib.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(setup.shardings, {k: batch_sh for k in BATCH_KEYS}),
                 out_shardings=(setup.shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


def device_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's slice of the batch as global arrays sharded over the data-parallel devices."""
  sharding: NamedSharding = sharding_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in BATCH_KEYS}

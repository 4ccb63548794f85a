"""The train state and the jitted train step, sharded over one mesh.

The state is a plain pytree (a dict) so that orbax, `jax.jit` shardings and the tests all see the same thing:
  step         int32, the number of optimizer steps taken (skipped fp16 steps included)
  params       the model's parameters as a pure nested dict (`nnx.State.to_pure_dict()` layout)
  opt_state    the optimizer's state (moments shaped like the parameters)
  loss_scale   dynamic loss-scaling state (float16); scale 1 and inert otherwise
  rng          raw key data; step i uses fold_in(rng, i), so a resumed run draws the same masks
  skipped      int32, steps skipped for non-finite gradients
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from eva_clip_jax import transforms
from eva_clip_jax.models import create_model
from eva_clip_jax.training import loss_scale as loss_scale_lib
from eva_clip_jax.training import optimizer as optimizer_lib
from eva_clip_jax.training import sharding as sharding_lib
from eva_clip_jax.training.loss import sharded_clip_loss

BATCH_KEYS = ('image', 'text')  # what the step consumes; labels and skip counts stay on the host


@dataclasses.dataclass
class Trainer:
  """Everything the step needs that is not in the state: the model's graph, optimizer, mesh and shardings."""
  config: Any
  mesh: Mesh
  graphdef: Any
  param_template: Any  # an abstract nnx.State of the parameters, to rebuild the model from a pure dict
  tx: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict

  def model(self, params: Any) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self.param_template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def model_kwargs(config, mesh: Mesh | None = None) -> dict:
  """create_model's arguments from the config; with a mesh, activations between blocks are pinned batch-sharded."""
  m = config.model
  kwargs = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
                scan_layers=m.scan_layers, drop_path_rate=m.drop_path_rate, patch_dropout=m.patch_dropout,
                mlp_pad_multiple=m.get('mlp_pad_multiple', 0))
  if mesh is not None and sharding_lib.data_parallel_size(mesh) > 1:
    kwargs['activation_sharding'] = sharding_lib.batch_sharding(mesh)
  return kwargs


def make_trainer(config, mesh: Mesh) -> Trainer:
  abstract_model = create_model(config.model.name, seed=config.seed, abstract=True, **model_kwargs(config, mesh))
  graphdef, param_template = nnx.split(abstract_model, nnx.Param)
  abstract_params = param_template.to_pure_dict()
  spec = abstract_model.spec
  tx = optimizer_lib.make_optimizer(config, abstract_params, visual_depth=spec.vision.depth,
                                    text_depth=spec.text.depth)
  strategy, rules = config.sharding.strategy, config.sharding.rules
  param_sh = sharding_lib.param_shardings(abstract_params, mesh, strategy, rules)
  moment_sh = sharding_lib.optimizer_state_shardings(param_sh, abstract_params, mesh, strategy)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding_lib.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, moment_sh,
                                 transform_non_params=lambda _: replicated)
  abstract_state = {
      'step': jax.ShapeDtypeStruct((), jnp.int32),
      'params': abstract_params,
      'opt_state': abstract_opt,
      'loss_scale': jax.eval_shape(lambda: init_loss_scale(config)),
      'rng': jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
      'skipped': jax.ShapeDtypeStruct((), jnp.int32),
  }
  state_sh = {
      'step': replicated, 'params': param_sh, 'opt_state': opt_sh,
      'loss_scale': jax.tree.map(lambda _: replicated, abstract_state['loss_scale']),
      'rng': replicated, 'skipped': replicated,
  }
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)
  return Trainer(config, mesh, graphdef, param_template, tx, state_sh, abstract_state)


def init_loss_scale(config):
  fp16 = config.model.dtype == 'float16'
  ls = config.get('loss_scale', {})
  return loss_scale_lib.init_loss_scale(fp16, initial_power=ls.get('initial_power', 16),
                                        window=ls.get('window', 1000), hysteresis=ls.get('hysteresis', 2),
                                        min_scale=ls.get('min_scale', 1.0))


def init_state(trainer: Trainer, params: Any | None = None) -> dict:
  """A fresh, sharded state. `params` (a pure dict on the host, e.g. from EVA/CLIP initial weights) replaces the
  random initialisation."""
  config = trainer.config

  def init(params):
    if params is None:
      model = create_model(config.model.name, seed=config.seed, **model_kwargs(config))
      params = nnx.state(model, nnx.Param).to_pure_dict()
    return {
        'step': jnp.zeros((), jnp.int32),
        'params': params,
        'opt_state': trainer.tx.init(params),
        'loss_scale': init_loss_scale(config),
        'rng': jax.random.key_data(jax.random.key(config.seed + 1)),
        'skipped': jnp.zeros((), jnp.int32),
    }

  if params is not None:
    params = jax.device_put(params, trainer.state_shardings['params'])
    return jax.jit(init, out_shardings=trainer.state_shardings)(params)
  return jax.jit(lambda: init(None), out_shardings=trainer.state_shardings)()


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(trainer: Trainer, *, inject_nonfinite_at: Sequence[int] = ()) -> Callable:
  """The jitted step: (state, batch) -> (state, metrics). The state is donated.

  inject_nonfinite_at: for tests, make the gradients of these steps non-finite (to exercise fp16 skipping).
  """
  config, mesh = trainer.config, trainer.mesh
  batch_sh = sharding_lib.batch_sharding(mesh)
  label_smoothing = float(config.get('label_smoothing', 0.0))

  def step_fn(state, batch):
    batch = {**batch, 'image': transforms.normalize_images(batch['image'])}  # uint8 from the input pipeline
    step = state['step']
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
    scale = state['loss_scale'].scale

    def loss_fn(params):
      model = trainer.model(params)
      image_features, text_features, logit_scale = model(batch['image'], batch['text'], train=True, rng=rng)
      loss = sharded_clip_loss(image_features, text_features, logit_scale, mesh=mesh,
                               batch_axes=sharding_lib.BATCH_AXES, label_smoothing=label_smoothing)
      return loss * scale, (loss, logit_scale)

    grads, (loss, logit_scale) = jax.grad(loss_fn, has_aux=True)(state['params'])
    grads = jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
    if inject_nonfinite_at:
      poison = jnp.where(jnp.isin(step, jnp.asarray(inject_nonfinite_at)), jnp.inf, 0.0)
      grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
    finite = loss_scale_lib.all_finite(grads)
    updates, opt_state = trainer.tx.update(grads, state['opt_state'], state['params'], step=step)
    params = optimizer_lib.clamp_logit_scale(optax.apply_updates(state['params'], updates))
    params, opt_state = loss_scale_lib.select_tree(finite, (params, opt_state),
                                                   (state['params'], state['opt_state']))
    new_state = {
        'step': step + 1,
        'params': params,
        'opt_state': opt_state,
        'loss_scale': loss_scale_lib.update_loss_scale(state['loss_scale'], finite),
        'rng': state['rng'],
        'skipped': state['skipped'] + (1 - finite.astype(jnp.int32)),
    }
    lrs = optimizer_lib.current_lrs(config, step)
    metrics = {
        'loss': loss, 'logit_scale': logit_scale, 'grad_norm': _global_norm(grads),
        'loss_scale': scale, 'skipped_steps': new_state['skipped'],
        **{f'lr/{tower}': lr for tower, lr in lrs.items()},
    }
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(trainer.state_shardings, {k: batch_sh for k in BATCH_KEYS}),
                 out_shardings=(trainer.state_shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


def device_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's slice of the batch as global arrays sharded over the data-parallel devices."""
  sharding: NamedSharding = sharding_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in BATCH_KEYS}

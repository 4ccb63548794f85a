"""The model the evaluation commands score, built as training builds it: the config's mesh, the training setup's
model function and parameter shardings (so the towers compile as the in-training evaluators' do), and
config.pretrained's weights, or the seeded random initialisation, put onto those shardings.

It lives in training/ because it is the training setup; evaluation/ never imports training/ (it is handed the
model function, mesh and shardings). Shared by `python -m eva_clip_jax.evaluate` and
`python -m eva_clip_jax.extract_features`; it defines no flags, so both can import it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from eva_clip_jax.evaluation.features import BoundExtractor, FeatureExtractor
from eva_clip_jax.models import create_model
from eva_clip_jax import sharding as sharding_lib
from eva_clip_jax.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class EvalModel:
  mesh: Mesh
  model_fn: Callable[[Any], nnx.Module]  # params -> the model, traceable inside jit (TrainSetup.model)
  param_shardings: Any
  params: Any

  def extractor(self, batch_size: int | None = None) -> BoundExtractor:
    pinned = functools.partial(sharding_lib.activation_sharding, self.mesh)  # as the train step traces the towers
    return FeatureExtractor(self.model_fn, self.mesh, self.param_shardings, batch_size, pinned).bind(self.params)


def load_params(config, param_shardings) -> Any:
  """config.pretrained's weights (a PyTorch checkpoint or a converted directory) read by the conversion API straight
  into the parameter shardings, each process reading only its devices' slices; or the seeded random initialisation,
  laid out as training lays it out and put onto those shardings."""
  pretrained = config.get('pretrained')
  model = create_model(config.model.name, seed=config.seed, abstract=bool(pretrained), **step_lib.model_kwargs(config))
  if pretrained:
    from eva_clip_jax.conversion import api  # pylint: disable=g-import-not-at-top  (torch only for PyTorch files)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           nnx.state(model, nnx.Param).to_pure_dict(), param_shardings)
    return api.read_sharded(pretrained, model.spec, targets)
  return jax.device_put(nnx.state(model, nnx.Param).to_pure_dict(), param_shardings)


def build_eval_model(config) -> EvalModel:
  mesh = sharding_lib.make_mesh(config.mesh)
  setup = step_lib.make_setup(config, mesh)
  return EvalModel(mesh, setup.model, setup.shardings.params, load_params(config, setup.shardings.params))

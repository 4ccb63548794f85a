"""`create_model` and friends: the open_clip-style entry points."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from eva_clip_jax.models.clip import CLIP
from eva_clip_jax.models.common import ModelOptions
from eva_clip_jax.models.registry import ModelSpec, get_model_spec
from eva_clip_jax.ops.attention import validate_backend


def create_model(name: str | ModelSpec, *, seed: int = 0, dtype: Any = 'float32', param_dtype: Any = 'float32',
                 attention: str = 'xla', remat: str = 'none', scan_layers: bool = True,
                 drop_path_rate: float = 0.0, patch_dropout: float = 0.0, abstract: bool = False) -> CLIP:
  """Builds an EVA-CLIP model with freshly initialised parameters.

  Args:
    name: a name from `list_models()` (or the paper's short name), or a `ModelSpec` for custom shapes.
    seed: parameter initialisation seed.
    dtype / param_dtype: compute and storage dtypes ('float32', 'bfloat16', 'float16').
    attention: attention backend ('auto', 'xla', 'cudnn', 'pallas_tpu', or another of `ops.available_backends()`).
    remat: per-block rematerialisation policy ('none', 'full', 'dots', 'dots_no_batch').
    scan_layers: run each tower's blocks with a rolled scan (fast compiles) or unrolled.
    drop_path_rate: stochastic depth, linearly increasing over the vision blocks (training only).
    patch_dropout: fraction of patch tokens dropped per sample in training (the paper's 0.5 masking).
    abstract: return a model whose parameters are `jax.ShapeDtypeStruct`s (no memory), via `nnx.eval_shape`.
  """
  spec = name if isinstance(name, ModelSpec) else get_model_spec(name)
  opts = ModelOptions(dtype=dtype, param_dtype=param_dtype, attention=validate_backend(attention), remat=remat,
                      scan_layers=scan_layers)

  def build() -> CLIP:
    return CLIP(spec, opts, drop_path_rate=drop_path_rate, patch_dropout=patch_dropout, rngs=nnx.Rngs(seed))

  return nnx.eval_shape(build) if abstract else build()


def count_params(model: nnx.Module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_counts(model: CLIP) -> dict[str, int]:
  """Parameters per tower and in total; `logit_scale` is counted in the total only."""
  visual, text = count_params(model.visual), count_params(model.text)
  return {'visual': visual, 'text': text, 'total': count_params(model)}


def replace_spec(spec: ModelSpec, **changes: Any) -> ModelSpec:
  """A copy of `spec` with fields of the spec, its `vision` or its `text` replaced (`vision__depth=2`)."""
  top, vision, text = {}, {}, {}
  for key, value in changes.items():
    if key.startswith('vision__'):
      vision[key[len('vision__'):]] = value
    elif key.startswith('text__'):
      text[key[len('text__'):]] = value
    else:
      top[key] = value
  return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, **vision),
                             text=dataclasses.replace(spec.text, **text), **top)


def model_from_params(graphdef: Any, template: nnx.State, params: Any, *rest: nnx.State) -> CLIP:
  """The model whose parameters are `params`, a pure dict of arrays (as jit, checkpoints and shardings see them).

  Jitted code takes the parameters as a plain pytree, so that they enter with their own (training) shardings and
  nothing is copied, while the towers are methods of an nnx.Module. `template` (the model's nnx.State of Params,
  abstract or not) carries the structure and metadata (logical axes) the pure dict lacks; it is copied first because
  replace_by_pure_dict writes in place. `rest`: any other state to merge (a standalone model's non-Param variables).
  Traceable inside jit.
  """
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state, *rest)

"""eva-clip-jax: EVA-CLIP in JAX/Flax, with an open_clip-style API.

  model = eva_clip_jax.create_model('EVA02-CLIP-B-16')
  tokenizer = eva_clip_jax.get_tokenizer('EVA02-CLIP-B-16')
  preprocess = eva_clip_jax.image_transform(224, is_train=False)

The models need only jax and flax; the tokenizer (ftfy, regex) and the image transforms (Pillow) are imported
on first use.
"""

import importlib

from eva_clip_jax import models
from eva_clip_jax.models import (CLIP, MODELS, ModelOptions, ModelSpec, TextSpec, VisionSpec, count_params,
                                 get_model_spec, list_models, param_counts)

__version__ = '0.1.0'

_LAZY = {
    'SimpleTokenizer': 'eva_clip_jax.tokenizer', 'get_tokenizer': 'eva_clip_jax.tokenizer',
    'tokenize': 'eva_clip_jax.tokenizer', 'image_transform': 'eva_clip_jax.transforms',
    'OPENAI_MEAN': 'eva_clip_jax.transforms', 'OPENAI_STD': 'eva_clip_jax.transforms',
    'list_pretrained': 'eva_clip_jax.pretrained', 'register_pretrained': 'eva_clip_jax.pretrained',
    'Pretrained': 'eva_clip_jax.pretrained',
}


def create_model(name, *, pretrained: str | None = None, mesh=None, axis_rules=None, strategy: str = 'fsdp',
                 **kwargs) -> CLIP:
  """`eva_clip_jax.models.create_model(name, **kwargs)`, or the model with the weights of `pretrained`.

  pretrained: a released tag from `list_pretrained()` ('merged2b_s4b_b131k', or the EVA file's name
  'EVA02_CLIP_L_psz14_s4B'; downloaded once into the Hugging Face cache), a PyTorch file in the EVA or open_clip
  layout (.pt/.bin/.safetensors), a directory written by `python -m eva_clip_jax.convert`, or 'hf-hub:org/repo'.
  Reading PyTorch files needs torch; a converted directory needs only orbax. The weights are read tensor by tensor
  into a model that was never randomly initialised (`conversion.load_sharded`).
  mesh, axis_rules, strategy: with pretrained, each parameter is built sharded over `mesh` by the logical-axis rules
  (config.sharding.axis_rules), every process reading only its devices' slices of the file; else on one device.
  """
  if not pretrained:
    return models.create_model(name, **kwargs)
  if kwargs.get('abstract'):
    raise ValueError('abstract=True builds shapes only; it cannot load pretrained weights')
  from eva_clip_jax.conversion import api  # pylint: disable=g-import-not-at-top
  return api.load_sharded(name, pretrained, mesh, axis_rules, strategy=strategy, **kwargs)


create_model.__doc__ += '\n\nModel arguments:\n' + (models.create_model.__doc__ or '')


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['CLIP', 'MODELS', 'ModelOptions', 'ModelSpec', 'TextSpec', 'VisionSpec', 'count_params',
           'create_model', 'get_model_spec', 'list_models', 'param_counts', *_LAZY]

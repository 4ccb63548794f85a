"""EVA-CLIP models in Flax NNX. Imports only jax, flax and numpy."""

from eva_clip_jax.models.clip import CLIP, l2_normalize
from eva_clip_jax.models.common import ModelOptions
from eva_clip_jax.models.factory import count_params, create_model, param_counts, replace_spec
from eva_clip_jax.models.registry import MODELS, ModelSpec, TextSpec, VisionSpec, get_model_spec, list_models

__all__ = ['CLIP', 'MODELS', 'ModelOptions', 'ModelSpec', 'TextSpec', 'VisionSpec', 'count_params', 'create_model',
           'get_model_spec', 'l2_normalize', 'list_models', 'param_counts', 'replace_spec']

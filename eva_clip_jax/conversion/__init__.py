"""PyTorch <-> JAX parameter mappings. The mappings work on plain dicts of numpy arrays; only the file-reading
entry points (added with the converter) import torch."""

from eva_clip_jax.conversion.params import assign_params, model_params
from eva_clip_jax.conversion.timm_layout import params_from_open_clip

__all__ = ['assign_params', 'model_params', 'params_from_open_clip']

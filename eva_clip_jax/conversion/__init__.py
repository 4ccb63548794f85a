"""PyTorch <-> JAX checkpoint conversion.

The key tables (`layouts`) and resizing (`resize`) are numpy-only; reading and writing PyTorch files
(`torch_io`) and the reference models (`torch_reference`) import torch when used.
"""

from eva_clip_jax.conversion.api import (convert_file, detect_layout, export_file, init_from_config, init_towers,
                                         load_pretrained, load_sharded, param_targets, params_to_state_dict,
                                         read_params, read_sharded, read_towers, state_dict_to_params)
from eva_clip_jax.conversion.params import assign_params, model_params

__all__ = ['assign_params', 'convert_file', 'detect_layout', 'export_file', 'init_from_config', 'init_towers',
           'load_pretrained', 'load_sharded', 'model_params', 'param_targets', 'params_to_state_dict', 'read_params',
           'read_sharded', 'read_towers', 'state_dict_to_params']

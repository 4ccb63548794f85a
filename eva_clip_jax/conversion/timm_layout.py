"""open_clip / timm state dicts (`visual.trunk.*` in timm's Eva naming, `text.*`) -> this library's parameters.

Torch Linear weights are [out, in]; ours are [in, out]. Per-block tensors are stacked on a leading depth axis.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from eva_clip_jax.models.registry import ModelSpec


def _linear(sd, prefix, bias=True):
  out = {'kernel': sd[f'{prefix}.weight'].T}
  if bias:
    out['bias'] = sd[f'{prefix}.bias']
  return out


def _norm(sd, prefix):
  return {'scale': sd[f'{prefix}.weight'], 'bias': sd[f'{prefix}.bias']}


def _stack(blocks: list[dict[str, Any]]) -> dict[str, Any]:
  first = blocks[0]
  return {k: _stack([b[k] for b in blocks]) if isinstance(v, dict) else np.stack([b[k] for b in blocks])
          for k, v in first.items()}


def _vision_block(sd, p, spec) -> dict[str, Any]:
  attn: dict[str, Any] = {'proj': _linear(sd, f'{p}.attn.proj')}
  if spec.vision.qkv == 'separate':
    attn['q_proj'] = _linear(sd, f'{p}.attn.q_proj', bias=False)
    attn['k_proj'] = _linear(sd, f'{p}.attn.k_proj', bias=False)
    attn['v_proj'] = _linear(sd, f'{p}.attn.v_proj', bias=False)
    attn['q_bias'], attn['v_bias'] = sd[f'{p}.attn.q_proj.bias'], sd[f'{p}.attn.v_proj.bias']
  else:
    attn['qkv'] = _linear(sd, f'{p}.attn.qkv', bias=False)
    attn['q_bias'], attn['v_bias'] = sd[f'{p}.attn.q_bias'], sd[f'{p}.attn.v_bias']
  if spec.vision.subln:
    attn['inner_attn_ln'] = _norm(sd, f'{p}.attn.norm')
  if spec.vision.mlp == 'swiglu':
    mlp = {'w1': _linear(sd, f'{p}.mlp.fc1_g'), 'w2': _linear(sd, f'{p}.mlp.fc1_x'),
           'w3': _linear(sd, f'{p}.mlp.fc2')}
  else:
    mlp = {'fc1': _linear(sd, f'{p}.mlp.fc1'), 'fc2': _linear(sd, f'{p}.mlp.fc2')}
  if spec.vision.subln:
    mlp['ffn_ln'] = _norm(sd, f'{p}.mlp.norm')
  block = {'norm1': _norm(sd, f'{p}.norm1'), 'attn': attn, 'norm2': _norm(sd, f'{p}.norm2'), 'mlp': mlp}
  if spec.vision.layer_scale_init:
    block['gamma_1'], block['gamma_2'] = sd[f'{p}.gamma_1'], sd[f'{p}.gamma_2']
  return block


def _text_block(sd, p) -> dict[str, Any]:
  return {
      'ln_1': _norm(sd, f'{p}.ln_1'),
      'attn': {'in_proj': {'kernel': sd[f'{p}.attn.in_proj_weight'].T, 'bias': sd[f'{p}.attn.in_proj_bias']},
               'out_proj': _linear(sd, f'{p}.attn.out_proj')},
      'ln_2': _norm(sd, f'{p}.ln_2'),
      'mlp': {'c_fc': _linear(sd, f'{p}.mlp.c_fc'), 'c_proj': _linear(sd, f'{p}.mlp.c_proj')},
  }


def params_from_open_clip(state_dict: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
  """Maps an open_clip EVA state dict (arrays convertible by np.asarray) to a nested parameter dict."""
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  missing = [k for k in ('visual.trunk.cls_token', 'logit_scale') if k not in sd]
  if missing:
    raise KeyError(f'not an open_clip EVA state dict: no {missing}')
  v = 'visual.trunk'
  # open_clip's CLIP keeps the text tower at the top level, CustomTextCLIP under `text.`.
  t = 'text.' if 'text.token_embedding.weight' in sd else ''
  visual = {
      'patch_embed': {'kernel': sd[f'{v}.patch_embed.proj.weight'].transpose(2, 3, 1, 0),
                      'bias': sd[f'{v}.patch_embed.proj.bias']},
      'cls_token': sd[f'{v}.cls_token'],
      'pos_embed': sd[f'{v}.pos_embed'],
      'blocks': _stack([_vision_block(sd, f'{v}.blocks.{i}', spec) for i in range(spec.vision.depth)]),
      'norm': _norm(sd, f'{v}.norm'),
      'head': _linear(sd, f'{v}.head'),
  }
  text = {
      'token_embedding': {'embedding': sd[f'{t}token_embedding.weight']},
      'positional_embedding': sd[f'{t}positional_embedding'],
      'blocks': _stack([_text_block(sd, f'{t}transformer.resblocks.{i}') for i in range(spec.text.depth)]),
      'ln_final': _norm(sd, f'{t}ln_final'),
      'text_projection': sd[f'{t}text_projection'],
  }
  return {'visual': visual, 'text': text, 'logit_scale': sd['logit_scale']}

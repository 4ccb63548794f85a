"""PyTorch reference models (open_clip + timm) for parity tests and side-by-side benchmarks.

Imports torch, timm and open_clip: only the tests, the benchmark and the converter use this module.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from timm.models.eva import Eva

from eva_clip_jax.models.registry import ModelSpec

OPEN_CLIP_NAMES = {
    'EVA01-CLIP-g-14': 'EVA01-g-14', 'EVA01-CLIP-g-14-plus': 'EVA01-g-14-plus', 'EVA02-CLIP-B-16': 'EVA02-B-16',
    'EVA02-CLIP-L-14': 'EVA02-L-14', 'EVA02-CLIP-L-14-336': 'EVA02-L-14-336',
    'EVA02-CLIP-bigE-14': 'EVA02-E-14', 'EVA02-CLIP-bigE-14-plus': 'EVA02-E-14-plus',
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
  """Overwrites every parameter with random values, so no zero bias or unit LayerNorm hides a mapping bug."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if name.endswith('logit_scale'):
        param.fill_(np.log(1 / 0.07))
      elif param.ndim == 1 and ('norm' in name or 'ln' in name):
        param.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * noise)
      else:
        param.copy_(0.05 * noise)


def timm_vision_trunk(spec: ModelSpec) -> Eva:
  """A timm Eva with the spec's (possibly reduced) shape, configured as open_clip configures EVA-CLIP's."""
  v = spec.vision
  return Eva(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
             num_heads=v.num_heads, mlp_ratio=v.mlp_dim / v.width, qkv_fused=v.qkv == 'fused',
             swiglu_mlp=v.mlp == 'swiglu', scale_mlp=v.subln, scale_attn_inner=v.subln, use_rot_pos_emb=v.rope,
             ref_feat_shape=(v.pt_seq_len, v.pt_seq_len) if v.rope else None, use_post_norm=v.postnorm,
             init_values=v.layer_scale_init, num_classes=spec.embed_dim, global_pool='token')


def open_clip_model(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
  """open_clip's model for `spec`: the registered config for a full-size model, else a CustomTextCLIP with a
  timm trunk of the spec's reduced shape."""
  if spec.name in OPEN_CLIP_NAMES:
    model = open_clip.create_model(OPEN_CLIP_NAMES[spec.name], pretrained=None)
  else:
    t = spec.text
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.num_heads,
                    layers=t.depth)
    vision_cfg = dict(image_size=spec.vision.image_size, timm_model_name='eva02_base_patch16_clip_224',
                      timm_pool='token', timm_proj=None)
    model = open_clip.CustomTextCLIP(spec.embed_dim, vision_cfg, text_cfg)
    model.visual.trunk = timm_vision_trunk(spec)
  randomize_(model, seed)
  return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def torch_features(model: torch.nn.Module, images_nhwc: np.ndarray, text: np.ndarray):
  """(image embeddings, text embeddings, logits_per_image) from the PyTorch model, unnormalised embeddings."""
  with torch.no_grad():
    images = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    tokens = torch.from_numpy(text.astype(np.int64))
    image_features = model.encode_image(images)
    text_features = model.encode_text(tokens)
    img_n = torch.nn.functional.normalize(image_features, dim=-1)
    txt_n = torch.nn.functional.normalize(text_features, dim=-1)
    logits = model.logit_scale.exp() * img_n @ txt_n.T
  return image_features.numpy(), text_features.numpy(), logits.numpy()

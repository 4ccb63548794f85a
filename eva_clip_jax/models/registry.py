"""The one table of architecture facts for every model this library knows.

Model names follow the EVA repository (`EVA02-CLIP-B-16`, ...). Configs name a model; they never restate
its shape. Training-time knobs (drop path, patch dropout, dtypes, remat) are not architecture facts and are
passed to `create_model` instead.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from eva_clip_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class VisionSpec:
  """An EVA vision transformer.

  Block switches, as in the EVA repository:
    qkv: 'separate' (EVA-02: q_proj/k_proj/v_proj) or 'fused' (EVA-01, bigE: one qkv projection).
    subln: sub-LayerNorm (`inner_attn_ln` on merged heads, `ffn_ln` inside the MLP), EVA-02 only.
    mlp: 'swiglu' (`w3(ffn_ln(silu(w1 x) * w2 x))`) or 'gelu' (`fc2(gelu(fc1 x))`).
    rope: 2D rotary position embedding on q and k (CLS excluded), frequencies interpolated from
      `pt_seq_len` to the actual grid.
    postnorm: `x + norm(f(x))` instead of `x + f(norm(x))` (bigE, EVA-CLIP-18B).
    norm: 'layernorm', or 'rmsnorm' (EVA-CLIP-8B/18B: T5-style, no mean, no bias, statistics in float32).
    qkv_bias: the attention's q and v biases, and the head's bias: the reference builds its head with
      `bias=qkv_bias` (EVA-CLIP-18B/shinji), so one switch removes all three.
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  qkv: Literal['separate', 'fused'] = 'separate'
  subln: bool = True
  mlp: Literal['swiglu', 'gelu'] = 'swiglu'
  rope: bool = True
  postnorm: bool = False
  pt_seq_len: int = 16
  layer_scale_init: float | None = None
  norm_eps: float = 1e-6
  norm: Literal['layernorm', 'rmsnorm'] = 'layernorm'
  qkv_bias: bool = True

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def validate(self) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of patch_size {self.patch_size}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.rope and self.head_dim % 4:
      raise ValueError(f'2D RoPE needs head_dim divisible by 4, got {self.head_dim}')
    if self.qkv not in ('separate', 'fused'):
      raise ValueError(f"qkv must be 'separate' or 'fused', got {self.qkv!r}")
    if self.mlp not in ('swiglu', 'gelu'):
      raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
    if self.norm not in ('layernorm', 'rmsnorm'):
      raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """The OpenAI-CLIP causal text transformer."""
  width: int
  depth: int
  num_heads: int
  context_length: int = 77
  vocab_size: int = 49408
  mlp_ratio: int = 4
  norm_eps: float = 1e-5

  @property
  def mlp_dim(self) -> int:
    return self.width * self.mlp_ratio

  def validate(self) -> None:
    if self.width % self.num_heads:
      raise ValueError(f'text width {self.width} is not divisible by num_heads {self.num_heads}')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  embed_dim: int
  vision: VisionSpec
  text: TextSpec

  def validate(self) -> None:
    self.vision.validate()
    self.text.validate()


def _eva02(image_size, patch_size, width, depth, mlp_dim):
  return VisionSpec(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                    num_heads=width // 64, mlp_dim=mlp_dim)


def _eva01(width, depth, num_heads, mlp_dim, postnorm=False):
  return VisionSpec(image_size=224, patch_size=14, width=width, depth=depth, num_heads=num_heads,
                    mlp_dim=mlp_dim, qkv='fused', subln=False, mlp='gelu', rope=False, postnorm=postnorm)


def _eva_clip_xb(image_size, width, depth, postnorm=False):
  # EVA-CLIP-8B/18B (EVA-CLIP-18B/shinji `eva-clip-*-14-x`): EVA-01 blocks (fused qkv, exact-GELU MLP, no RoPE, no
  # sub-LN) with RMSNorm everywhere, no q/v or head bias, head dim 128 and MLP ratio 5 (int(width * 5), exact).
  return VisionSpec(image_size=image_size, patch_size=14, width=width, depth=depth, num_heads=width // 128,
                    mlp_dim=5 * width, qkv='fused', subln=False, mlp='gelu', rope=False, postnorm=postnorm,
                    norm='rmsnorm', qkv_bias=False)


# EVA-02 MLP hidden sizes are int(width * 2.6667): 2048 (B), 2730 (L). EVA-01 g: int(1408 * 4.3637) = 6144;
# bigE: 1792 * 8.5714 = 15360. Stored as integers so no float rounding can change a shape.
_MODELS = (
    ModelSpec('EVA01-CLIP-g-14', 1024, _eva01(1408, 40, 16, 6144), TextSpec(768, 12, 12)),
    ModelSpec('EVA01-CLIP-g-14-plus', 1024, _eva01(1408, 40, 16, 6144), TextSpec(1024, 24, 16)),
    ModelSpec('EVA02-CLIP-B-16', 512, _eva02(224, 16, 768, 12, 2048), TextSpec(512, 12, 8)),
    ModelSpec('EVA02-CLIP-L-14', 768, _eva02(224, 14, 1024, 24, 2730), TextSpec(768, 12, 12)),
    ModelSpec('EVA02-CLIP-L-14-336', 768, _eva02(336, 14, 1024, 24, 2730), TextSpec(768, 12, 12)),
    ModelSpec('EVA02-CLIP-bigE-14', 1024, _eva01(1792, 64, 16, 15360, postnorm=True),
              TextSpec(1024, 24, 16)),
    ModelSpec('EVA02-CLIP-bigE-14-plus', 1024, _eva01(1792, 64, 16, 15360, postnorm=True),
              TextSpec(1280, 32, 20)),
    # EVA-CLIP-18B/shinji's configs EVA-CLIP-8B.json, EVA-CLIP-8B-plus.json (448 px), EVA-CLIP-18B.json; the text
    # tower is EVA02-CLIP-E/14+'s.
    ModelSpec('EVA-CLIP-8B', 1280, _eva_clip_xb(224, 4096, 32), TextSpec(1280, 32, 20)),
    ModelSpec('EVA-CLIP-8B-plus', 1280, _eva_clip_xb(448, 4096, 32), TextSpec(1280, 32, 20)),
    ModelSpec('EVA-CLIP-18B', 1536, _eva_clip_xb(224, 5120, 48, postnorm=True), TextSpec(1280, 32, 20)),
    # A few-second model for tests and the demo: EVA-02 blocks (RoPE, sub-LN, SwiGLU) at toy size.
    ModelSpec('tiny', 64,
              VisionSpec(image_size=64, patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=170),
              TextSpec(width=64, depth=2, num_heads=2, context_length=32)),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _MODELS}

# The paper's short names (Table 1) resolve to the repository's names.
ALIASES = {
    'EVA01-CLIP-g/14': 'EVA01-CLIP-g-14', 'EVA01-CLIP-g/14+': 'EVA01-CLIP-g-14-plus',
    'EVA02-CLIP-B/16': 'EVA02-CLIP-B-16', 'EVA02-CLIP-L/14': 'EVA02-CLIP-L-14',
    'EVA02-CLIP-L/14+': 'EVA02-CLIP-L-14-336', 'EVA02-CLIP-E/14': 'EVA02-CLIP-bigE-14',
    'EVA02-CLIP-E/14+': 'EVA02-CLIP-bigE-14-plus',
    'EVA-CLIP-8B-448': 'EVA-CLIP-8B-plus',  # the Hugging Face repository's name (BAAI/EVA-CLIP-8B-448)
}


def list_models() -> list[str]:
  return list(MODELS)


def get_model_spec(name: str) -> ModelSpec:
  name = ALIASES.get(name, name)
  if name not in MODELS:
    raise InputError(f'Unknown model {name!r}. Known models: {", ".join(MODELS)}')
  return MODELS[name]

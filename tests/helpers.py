"""Helpers several test files share (fixtures live in conftest.py): the tiny training config and its batches,
webdataset shards, attention references and comparisons, config loading, a timm MIM checkpoint."""

import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

import eva_clip_jax as ec
from configs import tiny
from eva_clip_jax import ops
from eva_clip_jax.models import rope as rope_lib
from eva_clip_jax.ops.rope import apply_rope_after_prefix
from eva_clip_jax import sharding as sharding_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'


# Training: the tiny config with a small batch, random batches for it, a one-device mesh.

def train_config(**changes):
  config = tiny.get_config()
  config.batch_size = 16
  config.total_steps = 10
  config.schedule.warmup_steps = 2
  config.layer_decay.visual = 0.8  # exercise per-layer scales
  config.label_smoothing = 0.1
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def train_batch(config, seed=0, *, poisoned=False):
  """Random images and tokens; `poisoned` puts an inf pixel in one image (a corrupt sample that slipped through)."""
  rng = np.random.default_rng(seed)
  size = 64
  images = rng.normal(size=(config.batch_size, size, size, 3)).astype(np.float32)
  if poisoned:
    images[3, 10, 20, 1] = np.inf
  return {'image': images, 'text': rng.integers(1, 49407, (config.batch_size, 32)).astype(np.int32)}


def single_device_mesh():
  return sharding_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])


# Data: random JPEGs in webdataset shards.

def random_jpeg(seed, size=(40, 30)):
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, 'JPEG')
  return buffer.getvalue()


def write_shards(directory, count, per_shard, start=0, prefix=''):
  from eva_clip_jax import data  # pylint: disable=g-import-not-at-top  (grain: not on the GPU machine's image)
  with data.ShardWriter(str(directory), per_shard, prefix=prefix) as writer:
    for i in range(start, start + count):
      writer.write(f'{i:06d}', random_jpeg(i), 'jpg', f'caption number {i}', label=i)
  return writer.shards


# Attention: the float64 reference, and the flash-attention tests' inputs, runs and comparisons.

def numpy_attention(q, k, v, causal):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if causal:
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


def attention_inputs(seq, head_dim, *, batch=1, heads=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(key, (batch, seq, heads, head_dim), jnp.float32) for key in keys]  # q, k, v, cotangent


def out_and_grads(fn, q, k, v, cotangent):
  """fn's output and the gradients of sum(cotangent * output) w.r.t. q, k, v, in one compiled call."""
  def run(q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))
  return [np.asarray(x, np.float32) for x in jax.jit(run)(q, k, v, cotangent)]


def xla_attention(causal=False, rope=None):
  def attend(q, k, v):
    if rope is not None:
      q, k = (apply_rope_after_prefix(t, *rope) for t in (q, k))
    return ops.dot_product_attention(q, k, v, causal=causal)
  return attend


def assert_close(got, want, atol, names=('out', 'dq', 'dk', 'dv')):
  for name, a, b in zip(names, got, want):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=name)


def patch_dropout_tables(head_dim, grid, kept, batch):
  """Per-sample tables as the vision tower builds them under patch dropout: each sample's kept patches' rows."""
  cos, sin = (jnp.asarray(t) for t in rope_lib.rope_2d_tables(head_dim, grid))
  keep = jnp.stack([jnp.sort(jax.random.permutation(jax.random.key(i), grid * grid)[:kept]) for i in range(batch)])
  return cos[keep], sin[keep]


# Configs: a config file loaded as the CLI would, with --config.x=y overrides.

def load_config(argv):
  argv = ['prog', *argv]
  values = flags.FlagValues()
  # sys_argv: override flags (--config.x=y) are discovered from the argument list, as absl.app would pass it.
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


# Conversion: a timm EVA-02 MIM checkpoint.

def mim_state(patch, image_size, width=64, depth=2):
  """A bare timm EVA-02 MIM-layout vision state dict (no `visual.` prefix, no inner-attention LN, no head)."""
  import torch  # here, not at the top: only the conversion tests need torch

  from eva_clip_jax.conversion.torch_reference import randomize_, timm_vision_trunk

  trunk = timm_vision_trunk(ec.models.replace_spec(
      ec.get_model_spec('tiny'), embed_dim=8, vision__patch_size=patch, vision__image_size=image_size,
      vision__width=width, vision__depth=depth))
  trunk.head = torch.nn.Identity()
  for block in trunk.blocks:
    block.attn.norm = torch.nn.Identity()  # timm's MIM models have no sub-LN in attention
  randomize_(trunk, seed=2)
  return {k: v for k, v in trunk.state_dict().items()}

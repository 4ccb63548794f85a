"""Pieces both towers share: model options, layer factories, drop path and the stacked-layer runner.

Blocks of a tower are stored stacked (one module whose parameters carry a leading `depth` axis). The same
parameter layout then serves both execution modes: `scan_layers=True` runs a `lax.scan` (fast compiles for
40- and 64-layer towers), `scan_layers=False` unrolls the same scan. Checkpoints and conversions never depend
on how a model was run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

from eva_clip_jax.errors import InputError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'none': None,  # no rematerialisation
    'full': jax.checkpoint_policies.nothing_saveable,  # save only block inputs, recompute everything
    'dots': jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the elementwise ops
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


def as_dtype(dtype: Any) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise InputError(f'Unknown dtype {dtype!r}; use one of {list(DTYPES)}')
    return jnp.dtype(DTYPES[dtype])
  return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """How a model runs; none of these change the parameters' names or shapes.

  dtype: compute dtype of matmuls and activations. param_dtype: storage dtype of parameters.
  attention: backend of `eva_clip_jax.ops.dot_product_attention` ('auto', 'xla', 'cudnn', 'pallas_tpu', ...).
  remat: per-block rematerialisation policy, a key of REMAT_POLICIES.
  scan_layers: run blocks with a rolled `lax.scan` (True) or fully unrolled (False).
  No mesh: activations are sharded through logical names (`constrain_batch`), resolved where the model is traced.
  """
  dtype: Any = 'float32'
  param_dtype: Any = 'float32'
  attention: str = 'xla'
  remat: str = 'none'
  scan_layers: bool = True

  def __post_init__(self):
    object.__setattr__(self, 'dtype', as_dtype(self.dtype))
    object.__setattr__(self, 'param_dtype', as_dtype(self.param_dtype))
    if self.remat not in REMAT_POLICIES:
      raise InputError(f'Unknown remat policy {self.remat!r}; use one of {list(REMAT_POLICIES)}')


# Logical axis names, declared on every parameter where it is created (the `logical_axes` metadata of its
# nnx.Param) and mapped to mesh axes by the rules table of the config (sharding.py):
#   embed   the model width (the residual stream's features)
#   mlp     an MLP's hidden features, and the projection heads' output features
#   heads   attention's heads x head_dim features (q, k, v and the output projection's input)
#   vocab   the token-embedding rows
#   layers  the leading depth axis of stacked blocks (added by `create_stacked`)
#   norm    per-feature vectors: biases, norm scales, layer-scale gammas (small; replicated by the default rules)
# A dimension named None is never sharded.
LOGICAL_AXES = ('embed', 'mlp', 'heads', 'vocab', 'layers', 'norm')
AXES_METADATA = 'logical_axes'
# The batch dimension of activations (the residual stream between blocks): mapped to mesh axes by the logical-axis
# rules in effect where the model is traced (flax's `logical_axis_rules`, as `sharding.activation_sharding`
# sets them), on the mesh in effect there (`jax.set_mesh`, or inside jit `jax.sharding.use_abstract_mesh`).
ACTIVATION_BATCH = 'activation_batch'
# The heads dimension of a fused q|k|v projection's kernel where it is used (`fused_qkv`): mapped, like
# ACTIVATION_BATCH, to the mesh axes of tensor parallelism (the parameters' `heads` axis) by the rules in effect.
ACTIVATION_HEADS = 'activation_heads'


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  """An nnx.Param carrying the logical names of its dimensions."""
  if len(axes) != jnp.ndim(value):
    raise ValueError(f'logical axes {axes} do not match a parameter of shape {jnp.shape(value)}')
  return nnx.Param(value, **{AXES_METADATA: tuple(axes)})


def trunc_normal(std: float) -> nnx.Initializer:
  return nnx.initializers.truncated_normal(stddev=std)


def linear(in_features: int, out_features: int, opts: ModelOptions, rngs: nnx.Rngs, *, axes: tuple[str, str],
           use_bias: bool = True, std: float = 0.02, normal: bool = False) -> nnx.Linear:
  """A dense layer whose kernel [in, out] has logical axes `axes`; its bias is a 'norm' vector."""
  init = nnx.initializers.normal(std) if normal else trunc_normal(std)
  return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=init,
                    bias_init=nnx.initializers.zeros_init(), dtype=opts.dtype, param_dtype=opts.param_dtype,
                    kernel_metadata={AXES_METADATA: tuple(axes)}, bias_metadata={AXES_METADATA: ('norm',)},
                    rngs=rngs)


def layer_norm(features: int, eps: float, opts: ModelOptions, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # flax computes the statistics in float32 even for 16-bit inputs.
  return nnx.LayerNorm(features, epsilon=eps, dtype=opts.dtype, param_dtype=opts.param_dtype,
                       scale_metadata={AXES_METADATA: ('norm',)}, bias_metadata={AXES_METADATA: ('norm',)},
                       rngs=rngs)


def rms_norm(features: int, eps: float, opts: ModelOptions, rngs: nnx.Rngs) -> nnx.RMSNorm:
  # T5-style, as EVA-CLIP-8B/18B: x * rsqrt(mean(x^2) + eps) * scale, no mean subtracted, no bias; flax computes
  # the statistic in float32, as the reference does for 16-bit inputs.
  return nnx.RMSNorm(features, epsilon=eps, dtype=opts.dtype, param_dtype=opts.param_dtype,
                     scale_metadata={AXES_METADATA: ('norm',)}, rngs=rngs)


def norm_layer(kind: str, features: int, eps: float, opts: ModelOptions, rngs: nnx.Rngs) -> nnx.Module:
  return rms_norm(features, eps, opts, rngs) if kind == 'rmsnorm' else layer_norm(features, eps, opts, rngs)


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample, scaling survivors by 1/keep."""
  if key is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


def create_stacked(make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `depth` independently initialised blocks as one module with stacked parameters."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=depth,
            transform_metadata={nnx.PARTITION_NAME: 'layers', AXES_METADATA: 'layers'})
  def make(rngs: nnx.Rngs):
    return make_block(rngs)

  return make(rngs)


def _logical_mesh_axes(name: str) -> tuple[str, ...] | None:
  """The mesh axes of logical `name` under the rules and mesh in effect; None without either."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = dict(spmd.get_logical_axis_rules()).get(name)
  if mesh.empty or not axes:
    return None
  return (axes,) if isinstance(axes, str) else tuple(axes)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins activations' batch dimension to ACTIVATION_BATCH's mesh axes when it divides them (evaluation batches
  may not). Without it, under fsdp XLA propagates the weights' sharding into the activations and per-device activation
  memory grows with the device count."""
  axes = _logical_mesh_axes(ACTIVATION_BATCH)
  if axes is None or x.shape[0] % math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def gathered(weight: jax.Array) -> jax.Array:
  """An embedding table or position embedding, replicated where it is used when activations are batch-sharded.

  Under fsdp these weights are split along the width; left alone, XLA reshards their batch-sharded cotangents to
  match (a full replication of [batch, seq, width]: "Involuntary full rematerialization"). Gathering the weight
  instead makes its gradient a local partial sum that is reduce-scattered, as for every other fsdp weight.
  """
  if _logical_mesh_axes(ACTIVATION_BATCH) is None:
    return weight
  return jax.lax.with_sharding_constraint(weight, jax.sharding.PartitionSpec())


def fused_qkv(layer: nnx.Linear, x: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k and v [batch, seq, heads, head_dim] from a fused projection whose kernel is [width, 3 x width] (q | k | v,
  the checkpoints' layout), as `jnp.split(layer(x), 3, axis=-1)` reshaped to heads.

  Tensor parallelism shards the kernel's output dimension in contiguous blocks (its logical axis is `heads`): 4
  devices would hold q[0:3w/4], q[3w/4:] + k[0:w/2], ..., so splitting the output into q, k and v and then into
  heads would move activations between devices ([batch, seq, width] each, every layer and again in the backward
  pass). Instead the kernel is viewed as [width, 3, heads, head_dim] with its heads on ACTIVATION_HEADS' mesh axes:
  each device then holds whole heads of all three, the projection and attention run on local heads, and the only
  resharding is of the kernel's fsdp shard among the tensor devices (XLA gathers it and keeps each device's heads:
  width x 3 width / fsdp elements a layer, against [batch, seq, 3 width] activations; tests/test_tensor_parallel.py).
  """
  batch, seq, width = x.shape
  kernel = layer.kernel[...].astype(layer.dtype).reshape(width, 3, num_heads, -1)
  axes = _logical_mesh_axes(ACTIVATION_HEADS)
  if axes is not None and num_heads % math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes) == 0:
    free = jax.sharding.PartitionSpec.UNCONSTRAINED
    kernel = jax.lax.with_sharding_constraint(kernel, jax.sharding.PartitionSpec(free, None, axes, None))
  qkv = jnp.einsum('bsw,wthd->tbshd', x.astype(layer.dtype), kernel)
  if layer.bias is not None:
    qkv = qkv + layer.bias[...].astype(layer.dtype).reshape(3, 1, 1, num_heads, -1)
  return qkv[0], qkv[1], qkv[2]


def run_stacked(blocks: nnx.Module, x: jax.Array, per_layer: Any, opts: ModelOptions,
                **shared: Any) -> jax.Array:
  """Applies stacked blocks in order: `x = block_i(x, **per_layer[i], **shared)`.

  per_layer: a pytree whose leaves have a leading depth axis (drop-path rates and keys).
  shared: inputs every layer sees (RoPE tables, flags), closed over by the scan body.
  """
  graphdef, state = nnx.split(blocks)

  def body(carry, xs):
    layer_state, layer_inputs = xs
    block = nnx.merge(graphdef, layer_state)
    # The carry in is the initial x or the previous output, both pinned.
    return constrain_batch(block(carry, **layer_inputs, **shared)), None

  policy = REMAT_POLICIES[opts.remat]
  if opts.remat != 'none':
    body = jax.checkpoint(body, policy=policy, prevent_cse=not opts.scan_layers)
  x, _ = jax.lax.scan(body, constrain_batch(x), (state, per_layer), unroll=1 if opts.scan_layers else True)
  return x

"""Whole-sequence attention for TPU (Mosaic), lane-dense, with fused 2D RoPE: the 'pallas_tpu' attention backend.

Why not the flash kernel (`ops.experimental.flash_attention`) on TPU: at CLIP's lengths (77 to 577 tokens) one sequence's keys
and scores fit in VMEM, so the online softmax over key blocks buys nothing, while the flash layout does cost: it
needs q, k, v heads-major ([batch, heads, seq, head_dim], a transposing copy each way) and pads head_dim 64 to the
128 TPU lanes (twice the HBM bytes of every q/k/v/o block). Here the kernels read q, k, v exactly as the
projections write them and write the output as the output projection reads it: sequence-major [seq, batch,
heads * head_dim], which is how XLA's TPU layouts store [batch, seq, width] activations ({2,0,1}: the odd lengths
77/99/197/257 stay out of the tiled dimensions), so the transposes around the calls are free. A grid step takes
16 (or 8) whole sequences of one 128-lane group. HBM then sees each input and output once per pass: no score
matrix (the XLA path stores it in float32 and bfloat16, tile-padded), no rotated q/k, no layout copies, no
logsumexp (the backward recomputes each softmax whole; the sequence is one block).

Heads are processed in groups of 128 lanes (two heads of 64, one of 128): head j of a group is the group's lanes
[j * head_dim, (j + 1) * head_dim). A head's scores are q_group * mask_j against k_group (the masked lanes add
zeros), and its output is p_j @ v_group kept on head j's lanes. So head_dim 64 does the matmul work of 128, which
is what the 128-wide MXU does for a 64-deep contraction anyway, and no lane is ever shifted.

Fused RoPE: the EVA-02 rotation x * cos + rotate_half(x) * sin rotates interleaved pairs (x0, x1) -> (-x1, x0);
rotate_half is a signed permutation inside each pair, done on the MXU as x @ R with a fixed [128, 128] matrix
(exact: one nonzero term per output). The tables carry identity rows for the tokens before them (the CLS token:
cos 1, sin 0), so every token is rotated the same way. Gradients: d/dx = g * cos + (g * sin) @ R^T. No gradient flows to the tables.

Backward, one kernel: recompute p, then dv = p^T do, ds = p * (do v^T - rowsum(o * do)), dq = scale * ds k,
dk = scale * ds^T q (float32 softmax and accumulators; p and ds cast to the input dtype before their matmuls, as
FlashAttention does).

Constraints (`supports`): head_dim dividing 128 (EVA-02 B and L, the text towers: 64), heads * head_dim a multiple
of 128, a per-device batch that is a multiple of 8, one sequence per block within VMEM (checked against a budget);
on CPU the kernels run in the Mosaic TPU interpreter (tests). Tested in the Mosaic TPU interpreter on CPU
(tests/test_tpu_attention.py) and compiled by the TPU compiler (tests/test_accelerator_compile.py); not run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from eva_clip_jax.ops.common import MASK_VALUE, compile_platform

LANES = 128
NEEDS = ('a TPU (or the CPU interpreter), head_dim dividing 128, heads x head_dim a multiple of 128 and a per-device '
         'batch that is a multiple of 8 within its VMEM budget')
# VMEM for one grid step's blocks (double-buffered by the pipeline): well inside v4/v5e/v5p/v6e's scoped default.
_VMEM_BUDGET = 12 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class _Config:
  causal: bool
  scale: float
  head_dim: int
  rope: bool
  batch_block: int
  interpret: bool

  @property
  def heads_per_group(self) -> int:
    return LANES // self.head_dim


def batch_block(batch: int, seq: int, itemsize: int, rope: bool) -> int:
  """Sequences per grid step (0: none fits). The batch is the blocks' second-minor (sublane) dimension, so a block
  holds 16 or 8 of them (bfloat16 packs 16 rows per tile; Mosaic rejects blocks of fewer than 8 rows there: "Not
  implemented: Sublane broadcast"), and the batch on a device must be a multiple of 8."""
  arrays = 8 + 2 * rope  # the backward's q, k, v, o, do (tables) in, dq, dk, dv out; double-buffered below
  for block in (16, 8):
    if batch % block == 0 and 2 * arrays * seq * block * LANES * itemsize <= _VMEM_BUDGET:
      return block
  return 0


def supports(shape, dtype, platform: str) -> bool:
  """Whether [batch, seq, heads, head_dim] inputs on one device fit the kernel (see the module docstring)."""
  batch, seq, heads, head_dim = shape
  lane_ok = LANES % head_dim == 0 and (heads * head_dim) % LANES == 0
  return platform in ('tpu', 'cpu') and lane_ok and batch_block(batch, seq, jnp.dtype(dtype).itemsize, True) > 0


def _rotation_matrix(dtype) -> jax.Array:
  """R with (x @ R) = rotate_half(x) on interleaved pairs: out[2m] = -x[2m + 1], out[2m + 1] = x[2m]."""
  r = np.zeros((LANES, LANES), np.float32)
  idx = np.arange(0, LANES, 2)
  r[idx + 1, idx] = -1.0
  r[idx, idx + 1] = 1.0
  return jnp.asarray(r, dtype)


def _dot(a, b, contract):
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


_NT, _NN, _TN = ((1,), (1,)), ((1,), (0,)), ((0,), (0,))


def _rotate(x, cos, sin, rot, dtype, *, transpose=False):
  """RoPE of a [seq, 128] group (float32 result), or with transpose=True the gradient map g -> dx."""
  if transpose:
    return x * cos + _dot((x * sin).astype(dtype), rot, _NT)  # (g * sin) @ R^T
  return x.astype(jnp.float32) * cos + _dot(x, rot, _NN) * sin


def _head_masks(cfg: _Config):
  if cfg.head_dim == LANES:
    return [None]
  lane = lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
  return [(lane >= j * cfg.head_dim) & (lane < (j + 1) * cfg.head_dim) for j in range(cfg.heads_per_group)]


def _causal_mask(seq: int) -> jax.Array:
  return lax.broadcasted_iota(jnp.int32, (seq, seq), 1) <= lax.broadcasted_iota(jnp.int32, (seq, seq), 0)


def _masked(x, mask):
  return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _probabilities(q, k, mask, causal, cfg: _Config):
  """softmax(scale * q_j k^T) of head j (its lanes selected by `mask`) over the whole sequence, float32."""
  s = _dot(_masked(q, mask), k, _NT) * cfg.scale
  if causal is not None:
    s = jnp.where(causal, s, MASK_VALUE)
  p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
  return p / jnp.sum(p, axis=1, keepdims=True)


def _sequence(refs, b):
  """Sequence b of the block: the [seq, 128] rows of each array ref (a 2D table is shared by every sequence)."""
  return tuple(ref[...] if len(ref.shape) == 2 else ref[:, b, :] for ref in refs)


def _rotated_qk(q, k, tables, rot, cfg: _Config, dtype):
  if not cfg.rope:
    return q, k
  return tuple(_rotate(x, *tables, rot, dtype).astype(dtype) for x in (q, k))


def _forward_kernel(*refs, cfg: _Config):
  (q_ref, k_ref, v_ref), rest = refs[:3], refs[3:]
  table_refs, rot_ref, (o_ref,) = (rest[:2], rest[2], rest[3:]) if cfg.rope else ((), None, rest)
  seq, dtype = q_ref.shape[0], v_ref.dtype
  masks = _head_masks(cfg)
  causal = _causal_mask(seq) if cfg.causal else None
  rot = rot_ref[...] if cfg.rope else None
  for b in range(cfg.batch_block):
    q, k, v = _sequence((q_ref, k_ref, v_ref), b)
    tables = tuple(t.astype(jnp.float32) for t in _sequence(table_refs, b))
    q, k = _rotated_qk(q, k, tables, rot, cfg, dtype)
    out = jnp.zeros(q.shape, jnp.float32)
    for mask in masks:
      o = _dot(_probabilities(q, k, mask, causal, cfg).astype(dtype), v, _NN)
      out = o if mask is None else jnp.where(mask, o, out)
    o_ref[:, b, :] = out.astype(o_ref.dtype)


def _backward_kernel(*refs, cfg: _Config):
  (q_ref, k_ref, v_ref, o_ref, do_ref), rest = refs[:5], refs[5:]
  table_refs, rot_ref, outs = (rest[:2], rest[2], rest[3:]) if cfg.rope else ((), None, rest)
  dq_ref, dk_ref, dv_ref = outs
  seq, dtype = q_ref.shape[0], v_ref.dtype
  masks = _head_masks(cfg)
  causal = _causal_mask(seq) if cfg.causal else None
  rot = rot_ref[...] if cfg.rope else None
  for b in range(cfg.batch_block):
    q, k, v, o, do = _sequence((q_ref, k_ref, v_ref, o_ref, do_ref), b)
    tables = tuple(t.astype(jnp.float32) for t in _sequence(table_refs, b))
    q, k = _rotated_qk(q, k, tables, rot, cfg, dtype)
    o_do = o.astype(jnp.float32) * do.astype(jnp.float32)
    dq = dk = dv = jnp.zeros(q.shape, jnp.float32)
    for mask in masks:
      # The softmax is recomputed whole (the sequence is one block), so no logsumexp is stored by the forward.
      p = _probabilities(q, k, mask, causal, cfg)
      ds = (p * (_dot(_masked(do, mask), v, _NT) - jnp.sum(_masked(o_do, mask), axis=1, keepdims=True)))
      ds = ds.astype(dtype)
      dv = dv + _masked(_dot(p.astype(dtype), do, _TN), mask)
      dq = dq + _masked(_dot(ds, k, _NN), mask)
      dk = dk + _masked(_dot(ds, q, _TN), mask)
    dq, dk = dq * cfg.scale, dk * cfg.scale
    if cfg.rope:
      dq, dk = (_rotate(g, *tables, rot, dtype, transpose=True) for g in (dq, dk))
    dq_ref[:, b, :] = dq.astype(dq_ref.dtype)
    dk_ref[:, b, :] = dk.astype(dk_ref.dtype)
    dv_ref[:, b, :] = dv.astype(dv_ref.dtype)


def _specs(cfg: _Config, seq: int, tables):
  """Blocks of [seq, batch, width] arrays: whole sequences, `batch_block` of them, one 128-lane group."""
  block = pl.BlockSpec((seq, cfg.batch_block, LANES), lambda i, g: (0, i, g))
  if not cfg.rope:
    return block, []
  if tables[0].ndim == 3:  # per-sample tables (patch dropout)
    table = pl.BlockSpec((seq, cfg.batch_block, LANES), lambda i, g: (0, i, 0))
  else:  # one table for the batch, 2D: a [seq, 1, 128] block would need a sublane broadcast Mosaic does not do
    table = pl.BlockSpec((seq, LANES), lambda i, g: (0, 0))
  return block, [table, table, pl.BlockSpec((LANES, LANES), lambda i, g: (0, 0))]


def _cost(cfg: _Config, seq: int, batch: int, width: int, matmuls: int, rotations: int, arrays, outs):
  """The work the kernel really does (each head's matmuls at its group's full 128-lane depth, the RoPE rotations),
  for XLA's cost analysis, which cannot see into a kernel."""
  groups = width // LANES
  flops = batch * groups * (cfg.heads_per_group * seq * seq * matmuls + cfg.rope * rotations * seq * LANES) * LANES * 2
  moved = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (*arrays, *outs))
  return pl.CostEstimate(flops=int(flops), transcendentals=int(batch * width // cfg.head_dim * seq * seq),
                         bytes_accessed=int(moved))


def _call(kernel, cfg: _Config, args, out_shape, in_specs, out_specs, name, cost):
  from jax.experimental.pallas import tpu as pltpu
  seq, batch, width = args[0].shape
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=(batch // cfg.batch_block, width // LANES), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, name=name, cost_estimate=cost,
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel')),
      interpret=pltpu.InterpretParams() if cfg.interpret else False)(*args)


def _forward(q, k, v, tables, cfg: _Config):
  seq, batch, width = q.shape
  block, table_specs = _specs(cfg, seq, tables)
  args = (q, k, v, *tables)
  out_shape = jax.ShapeDtypeStruct(q.shape, v.dtype)
  return _call(_forward_kernel, cfg, args, out_shape, [block] * 3 + table_specs, block, 'tpu_attention_fwd',
               _cost(cfg, seq, batch, width, 2, 2, args, [out_shape]))


def _backward(q, k, v, tables, out, d_out, cfg: _Config):
  seq, batch, width = q.shape
  block, table_specs = _specs(cfg, seq, tables)
  args = (q, k, v, out, d_out, *tables)
  out_shape = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  return _call(_backward_kernel, cfg, args, out_shape, [block] * 5 + table_specs, (block,) * 3, 'tpu_attention_bwd',
               _cost(cfg, seq, batch, width, 5, 4, args, out_shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, tables, cfg: _Config):
  return _forward(q, k, v, tables, cfg)


def _attention_fwd(q, k, v, tables, cfg: _Config):
  out = _forward(q, k, v, tables, cfg)
  return out, (q, k, v, tables, out)


def _attention_bwd(cfg: _Config, residuals, d_out):
  q, k, v, tables, out = residuals
  dq, dk, dv = _backward(q, k, v, tables, out, d_out, cfg)
  return dq, dk, dv, jax.tree.map(jnp.zeros_like, tables)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _rope_tables(cos, sin, batch: int, seq: int, head_dim: int, dtype):
  """(cos, sin) [(batch,) n, head_dim] for the last n tokens -> each [seq, 128] or per-sample [seq, batch, 128]
  (sequence-major, as q): identity rows for the seq - n tokens before them (the CLS token) first, the head dim
  repeated over the heads of a 128-lane group; and the rotation matrix."""
  if (cos.shape != sin.shape or cos.ndim not in (2, 3) or cos.shape[-1] != head_dim or cos.shape[-2] > seq
      or (cos.ndim == 3 and cos.shape[0] != batch)):
    raise ValueError(f'rope tables must be [n, head_dim] or [batch, n, head_dim] with n <= seq, for batch {batch}, '
                     f'seq {seq}, head_dim {head_dim}; got {cos.shape} and {sin.shape}')
  prefix = seq - cos.shape[-2]
  out = []
  for table, first in ((cos, 1.0), (sin, 0.0)):
    table = lax.stop_gradient(table)
    table = jnp.concatenate([jnp.full((*table.shape[:-2], prefix, head_dim), first, table.dtype), table], axis=-2)
    table = jnp.tile(table, (*[1] * (table.ndim - 1), LANES // head_dim)).astype(dtype)
    out.append(table.transpose(1, 0, 2) if table.ndim == 3 else table)
  return (*out, _rotation_matrix(dtype))


def tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, scale: float | None = None,
                  rope: tuple[jax.Array, jax.Array] | None = None, interpret: bool = False) -> jax.Array:
  """Attention over [batch, seq, heads, head_dim] inputs with the whole-sequence Mosaic TPU kernels.

  rope: (cos, sin) [n, head_dim] or per-sample [batch, n, head_dim], applied to q and k of the last n tokens
  (`ops.rope.apply_rope_after_prefix`). interpret: run in the Mosaic TPU interpreter (CPU tests).
  Call it per device: the attention seam (`ops.attention`) runs it in a shard_map on a mesh.
  """
  if q.shape != k.shape or k.shape != v.shape or q.ndim != 4:
    raise ValueError(f'expected q, k, v of one shape [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, '
                     f'{v.shape}')
  if not supports(q.shape, q.dtype, 'tpu'):
    raise ValueError(f'the TPU whole-sequence kernel does not support {q.shape} {q.dtype}: it needs head_dim '
                     f'dividing {LANES}, heads x head_dim a multiple of {LANES}, and a batch block within its VMEM '
                     'budget')
  batch, seq, heads, head_dim = q.shape
  cfg = _Config(causal=causal, scale=float(head_dim ** -0.5 if scale is None else scale), head_dim=head_dim,
                rope=rope is not None, batch_block=batch_block(batch, seq, q.dtype.itemsize, rope is not None),
                interpret=interpret)
  tables = _rope_tables(*rope, batch, seq, head_dim, q.dtype) if rope is not None else ()
  # Sequence-major [seq, batch, width]: the layout XLA's TPU matmuls give the activations ({2,0,1} for [batch, seq,
  # width], which keeps the odd lengths 77/99/197/257 out of the tiled dimensions), so that no copy is needed
  # between the projections and the kernels.
  flat = [t.reshape(batch, seq, heads * head_dim).transpose(1, 0, 2) for t in (q, k, v)]
  return _attention(*flat, tables, cfg).transpose(1, 0, 2).reshape(q.shape)


def attention(q, k, v, *, causal: bool, scale: float, rope=None) -> jax.Array:
  """The backend's function: the TPU kernels, or their interpreter when the compile target is a CPU."""
  return tpu_attention(q, k, v, causal=causal, scale=scale, rope=rope, interpret=compile_platform(q) == 'cpu')

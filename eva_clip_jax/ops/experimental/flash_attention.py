"""Flash attention in Pallas: forward and backward kernels, optional fused 2D RoPE. The 'pallas_flash' backend.

Experimental: no GPU or TPU has measured it, and on TPU the TPU compiler's estimate puts it behind XLA's attention
(BENCHMARKS.md), so 'auto' never picks it; select it by name.

`flash_attention(q, k, v)` computes the same function as the 'xla' backend of `eva_clip_jax.ops.attention`
(q, k, v as [batch, seq, heads, head_dim]; float32 softmax; output in v.dtype) without materialising the
[q, k] score matrix: each kernel instance keeps one block of query rows, walks over the key blocks with an
online softmax, and accumulates in float32. The forward also writes the per-row logsumexp, which the backward
uses to recompute the probabilities block by block:
  dq kernel    grid over query blocks, loop over key blocks:   dq = scale * sum_k ds k
  dk/dv kernel grid over key blocks, loop over query blocks:   dv = sum_q p^T do,  dk = scale * sum_q ds^T q
with ds = p * (do v^T - rowsum(o * do)). The small rowsum is left to XLA (it fuses with the cotangent).

Lowerings. One kernel body serves every target; only the `pallas_call` wrapper differs:
  triton  (GPU) Pallas's Triton backend, plain `pl.BlockSpec`s. Triton rather than Mosaic GPU because Mosaic
          GPU targets Hopper-and-later (wgmma, TMA) while the Triton backend runs on A100 and H100 alike.
  tpu     Mosaic TPU, a (batch, heads, blocks) grid of independent 'parallel' steps; block row counts are
          powers of two >= 16 (sublane tiling of 16-bit types) and head dims are padded to 128 lanes.
On CPU the kernels run in interpret mode: the 'triton' wrapper through Pallas's generic interpreter
(`interpret=True`), the 'tpu' wrapper through the Mosaic TPU interpreter (`interpret=pltpu.InterpretParams()`,
present in jax 0.10.2), which is how the TPU path is tested without a TPU. Keys and values of one (batch, head)
are a single block that stays resident while the query blocks stream; that is right for ViT/CLIP sequence
lengths (a few hundred tokens) and would need a key grid axis for sequences of many thousands.

Shapes. Sequences are padded to the block size: padded keys get a -inf-like logit, padded query rows are
dropped (and their zero cotangents contribute nothing to dk/dv). Head dims are zero-padded to what the target
needs (a power of two for Triton, a multiple of 128 for Mosaic TPU); zero columns change no dot product.

Fused RoPE. `rope=(cos, sin)` rotates q and k inside the kernels, with the semantics of
`ops.rope.apply_rope_after_prefix` (interleaved pairs, rotate_half (x0, x1) -> (-x1, x0), the tokens before the
tables' rows, EVA's CLS token, untouched).
The wrapper only de-interleaves the head dim into (even, odd) halves -- a permutation it folds into the
padding/transposing copy that the sequence lengths of a ViT (1 + grid^2) require anyway -- so that rotate_half
becomes elementwise on two half-width operands: q.k = q_even.k_even + q_odd.k_odd. The rotation of each
loaded block, and in the backward its transpose (dq_pre = R^T dq_post), happen in the kernels; the rotated
q and k never exist in memory. No gradient flows to the cos/sin tables. Caveat: on TPU each half is padded to
128 lanes (head_dim 64 then costs the matmul width of 256; packing both halves into one tile is a TPU to-do).

Numerics: softmax statistics and all accumulators are float32; probabilities and ds are cast to the input dtype
before their matmuls (as in FlashAttention). Matmuls use the target's default precision for the input dtype,
as the 'xla' backend does (for float32 inputs that can mean TF32 on GPUs and bfloat16 passes on TPUs).
float16 is meant for GPUs; TPUs have no float16 matmul.

Targets come from the compile target (the inputs' mesh, `ops.common.compile_platform`), so an ahead-of-time
compile for TPU or GPU devices on a CPU host gets the real kernel; on a mesh of several devices the attention seam
runs the kernels per shard in a `shard_map` (XLA cannot partition a custom call). Each call declares its cost
(`pl.CostEstimate`) so that XLA's cost analysis does not count it as free.

On TPU the whole-sequence kernel (`ops.tpu_attention`, backend 'pallas_tpu') is the one to use where it fits: it
reads q, k, v in the layout the projections write and packs two heads of 64 into the 128 lanes, whereas the Mosaic
flash kernels here, with fused RoPE, pad each 32-wide half of head dim 64 to 128 lanes and 197 tokens to 256 rows
(10x the model's attention FLOPs), which is why XLA's attention beats them.

Block sizes are untuned defaults; the GPU/TPU speed of these kernels has not been measured. Tested in both
interpreters on CPU and compiled (tests/test_accelerator_compile.py) by the TPU compiler and for sm_90; no GPU or
TPU run.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from eva_clip_jax.ops.common import MASK_VALUE, compile_platform

# (forward block_q, block_k, backward block_q, block_k) per target: untuned starting points.
_DEFAULT_BLOCKS = {'triton': (128, 64, 64, 64), 'tpu': (128, 128, 128, 128)}


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call; hashable, so it can ride through custom_vjp as a nondiff argument."""
  target: str  # 'triton' or 'tpu'
  interpret: bool
  causal: bool
  scale: float
  q_len: int  # true (unpadded) lengths
  kv_len: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  rope: bool
  per_sample_tables: bool

  @property
  def parts(self) -> int:
    return 2 if self.rope else 1


def _default_target(*arrays) -> tuple[str, bool]:
  # The compile target's platform, not jax.devices()': an ahead-of-time compile for TPU or GPU devices on a CPU host
  # must get the real kernel, not the interpreter (which XLA compiles as loops over whole-array copies).
  platform = compile_platform(*arrays)
  if platform == 'tpu':
    return 'tpu', False
  if platform == 'gpu':
    return 'triton', False
  return 'triton', True  # CPU: no compiler for either kernel, interpret the GPU one


def _block(requested: int, length: int) -> int:
  if requested < 16 or requested & (requested - 1):
    raise ValueError(f'block sizes must be powers of two >= 16, got {requested}')
  # No point in blocks longer than the (power-of-two rounded) sequence: 77 text tokens use one 128 block.
  return min(requested, max(16, pl.next_power_of_2(length)))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _padded_head_dim(dim: int, target: str) -> int:
  return _round_up(dim, 128) if target == 'tpu' else max(16, pl.next_power_of_2(dim))


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jnp.pad(x, [(0, n - s) for s, n in zip(x.shape, shape)])


# ---------------------------------------------------------------------------------------------------- kernels
# All kernel code sees 2D blocks: [rows, head_dim] for q/k/v/o, [rows, 1] for logsumexp and delta,
# [4, rows, head_dim / 2] for the RoPE tables (cos_even, sin_even, cos_odd, sin_odd).

def _dot_nt(a, b):  # a @ b.T
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a.T @ b
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _rotate(parts, table_ref, rows, *, transpose: bool = False):
  """RoPE on (even, odd) halves in float32: the rotation, or with transpose=True its transpose (for grads)."""
  even, odd = (p.astype(jnp.float32) for p in parts)
  cos_e, sin_e, cos_o, sin_o = (table_ref[i, rows, :] for i in range(4))
  if transpose:
    return even * cos_e + odd * sin_o, odd * cos_o - even * sin_e
  return even * cos_e - odd * sin_e, odd * cos_o + even * sin_o


def _load_parts(refs, rows, table_ref, table_rows, dtype):
  parts = tuple(ref[rows, :] for ref in refs)
  if table_ref is None:
    return parts
  return tuple(p.astype(dtype) for p in _rotate(parts, table_ref, table_rows))


def _logits(q_parts, k_parts, q_start, k_start, cfg: _Config, shape):
  """scale * q k^T over one [block_q, block_k] tile, with padded keys and (if causal) the future masked."""
  s = sum(_dot_nt(qp, kp) for qp, kp in zip(q_parts, k_parts)) * cfg.scale
  cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  valid = None
  if cfg.kv_len % shape[1]:  # only then can a tile hold padded keys
    valid = cols < cfg.kv_len
  if cfg.causal:
    rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    valid = cols <= rows if valid is None else valid & (cols <= rows)
  return s if valid is None else jnp.where(valid, s, MASK_VALUE)


def _split_refs(refs, cfg: _Config, n_in: int):
  """(q refs, k refs, other inputs, q-table ref, k-table ref, outputs) from the flat kernel argument list."""
  p = cfg.parts
  q_refs, k_refs, rest = refs[:p], refs[p:2 * p], refs[2 * p:]
  inputs, outputs = rest[:n_in], rest[n_in:]
  q_table = k_table = None
  if cfg.rope:
    *inputs, q_table, k_table = inputs
  return q_refs, k_refs, inputs, q_table, k_table, outputs


def _num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def _forward_kernel(*refs, cfg: _Config):
  q_refs, k_refs, (v_ref,), q_table, k_table, (o_ref, lse_ref) = _split_refs(refs, cfg, 1 + 2 * cfg.rope)
  block_q, block_k = cfg.block_q, cfg.block_k
  q_start = pl.program_id(2) * block_q
  q = _load_parts(q_refs, slice(None), q_table, slice(None), v_ref.dtype)

  def body(j, carry):
    acc, row_max, row_sum = carry
    k_start = pl.multiple_of(j * block_k, block_k)
    rows = pl.ds(k_start, block_k)
    k = _load_parts(k_refs, rows, k_table, rows, v_ref.dtype)
    s = _logits(q, k, q_start, k_start, cfg, (block_q, block_k))
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - new_max)
    correction = jnp.exp(row_max - new_max)
    row_sum = correction * row_sum + jnp.sum(p, axis=1, keepdims=True)
    acc = correction * acc + _dot_nn(p.astype(v_ref.dtype), v_ref[rows, :])
    return acc, new_max, row_sum

  num_k = _num_blocks(cfg.kv_len, block_k)  # blocks made only of padding are skipped
  if cfg.causal:  # and so are blocks entirely in this query block's future
    num_k = jnp.minimum(num_k, lax.div(q_start + block_q + block_k - 1, block_k))
  init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((block_q, 1), -jnp.inf, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32))
  acc, row_max, row_sum = lax.fori_loop(0, num_k, body, init)
  o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
  lse_ref[...] = row_max + jnp.log(row_sum)


def _dq_kernel(*refs, cfg: _Config):
  q_refs, k_refs, (v_ref, do_ref, lse_ref, delta_ref), q_table, k_table, dq_refs = _split_refs(
      refs, cfg, 4 + 2 * cfg.rope)
  block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
  q_start = pl.program_id(2) * block_q
  dtype = v_ref.dtype
  q = _load_parts(q_refs, slice(None), q_table, slice(None), dtype)
  do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    k_start = pl.multiple_of(j * block_k, block_k)
    rows = pl.ds(k_start, block_k)
    k = _load_parts(k_refs, rows, k_table, rows, dtype)
    p = jnp.exp(_logits(q, k, q_start, k_start, cfg, (block_q, block_k)) - lse)
    ds = (p * (_dot_nt(do, v_ref[rows, :]) - delta)).astype(dtype)
    return tuple(acc + _dot_nn(ds, kp) for acc, kp in zip(dq, k))

  num_k = _num_blocks(cfg.kv_len, block_k)
  if cfg.causal:
    num_k = jnp.minimum(num_k, lax.div(q_start + block_q + block_k - 1, block_k))
  dq = lax.fori_loop(0, num_k, body, tuple(jnp.zeros(r.shape, jnp.float32) for r in dq_refs))
  dq = tuple(d * cfg.scale for d in dq)
  if q_table is not None:  # gradient w.r.t. the unrotated q: the transposed rotation
    dq = _rotate(dq, q_table, slice(None), transpose=True)
  for ref, d in zip(dq_refs, dq):
    ref[...] = d.astype(ref.dtype)


def _dkv_kernel(*refs, cfg: _Config):
  q_refs, k_refs, (v_ref, do_ref, lse_ref, delta_ref), q_table, k_table, outs = _split_refs(
      refs, cfg, 4 + 2 * cfg.rope)
  dk_refs, dv_ref = outs[:-1], outs[-1]
  block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
  k_start = pl.program_id(2) * block_k
  dtype = v_ref.dtype
  k = _load_parts(k_refs, slice(None), k_table, slice(None), dtype)
  v = v_ref[...]

  def body(i, carry):
    dk, dv = carry
    q_start = pl.multiple_of(i * block_q, block_q)
    rows = pl.ds(q_start, block_q)
    q = _load_parts(q_refs, rows, q_table, rows, dtype)
    do = do_ref[rows, :]
    p = jnp.exp(_logits(q, k, q_start, k_start, cfg, (block_q, block_k)) - lse_ref[rows, :])
    dv = dv + _dot_tn(p.astype(dtype), do)
    ds = (p * (_dot_nt(do, v) - delta_ref[rows, :])).astype(dtype)
    return tuple(acc + _dot_tn(ds, qp) for acc, qp in zip(dk, q)), dv

  first_q = lax.div(k_start, block_q) if cfg.causal else 0  # earlier queries cannot see these keys
  # A block made only of padded keys (the sequence is padded to the largest block size) gets zeros. Both bounds
  # int32, not weakly typed: Triton's scf.for rejects a loop whose bounds differ in type (sm_90 compile; the
  # interpreter accepts it).
  num_q = jnp.where(k_start < cfg.kv_len, jnp.int32(_num_blocks(cfg.q_len, block_q)), jnp.int32(first_q))
  init = (tuple(jnp.zeros(r.shape, jnp.float32) for r in dk_refs), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(first_q, num_q, body, init)
  dk = tuple(d * cfg.scale for d in dk)
  if k_table is not None:
    dk = _rotate(dk, k_table, slice(None), transpose=True)
  for ref, d in zip(dk_refs, dk):
    ref[...] = d.astype(ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------- pallas_calls
# Arrays reach the kernels heads-major and padded: [batch, heads, seq_pad, dim_pad]; grid (batch, heads, blocks).

def _blocked(block: int, dim: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, None, block, dim), lambda b, h, i: (b, h, i, 0))


def _whole(length: int, dim: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, None, length, dim), lambda b, h, i: (b, h, 0, 0))


def _table_spec(cfg: _Config, rows: int | None, table: jax.Array) -> pl.BlockSpec:
  """RoPE tables: [4, seq, dim] shared by the batch, or [batch, 4, seq, dim]; rows=None for the whole sequence."""
  length, dim = table.shape[-2:]
  if rows is None:
    if cfg.per_sample_tables:
      return pl.BlockSpec((None, 4, length, dim), lambda b, h, i: (b, 0, 0, 0))
    return pl.BlockSpec((4, length, dim), lambda b, h, i: (0, 0, 0))
  if cfg.per_sample_tables:
    return pl.BlockSpec((None, 4, rows, dim), lambda b, h, i: (b, 0, i, 0))
  return pl.BlockSpec((4, rows, dim), lambda b, h, i: (0, i, 0))


def _cost(cfg: _Config, args, out_shape, matmuls: int) -> pl.CostEstimate:
  """What one call computes, for XLA's cost analysis (which cannot see into a kernel and otherwise counts nothing):
  `matmuls` [q_pad, k_pad] x width products per (batch, head), at the padded sizes the kernel really runs."""
  batch, heads, q_pad, _ = args[0].shape
  k_pad = args[cfg.parts].shape[2]
  width = sum(a.shape[-1] for a in args[:cfg.parts])  # q's parts: the head dim as the kernel pads it
  work = batch * heads * q_pad * k_pad
  if cfg.causal:
    work //= 2
  moved = sum(math.prod(a.shape) * a.dtype.itemsize for a in (*args, *jax.tree.leaves(out_shape)))
  return pl.CostEstimate(flops=int(2 * matmuls * work * width), transcendentals=int(work), bytes_accessed=int(moved))


def _pallas_call(kernel, cfg: _Config, *, grid, in_specs, out_specs, out_shape, name, head_dim, cost=None):
  # Imported here, not at the top: `import eva_clip_jax` should not pay for (or depend on) both backends.
  from jax.experimental.pallas import tpu as pltpu
  from jax.experimental.pallas import triton as pltriton
  if cfg.target == 'tpu':
    params = pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'parallel'))
    interpret = pltpu.InterpretParams() if cfg.interpret else False
  else:
    params = pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    interpret = cfg.interpret
  return pl.pallas_call(functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=params, interpret=interpret, name=name,
                        cost_estimate=cost)


def _qk_specs(cfg, q_parts, k_parts, table, *, block_q, block_k, grid_over_q: bool):
  """Specs of q parts, k parts and (appended last by the caller) the q and k tables."""
  q_len, k_len = q_parts[0].shape[2], k_parts[0].shape[2]
  if grid_over_q:
    q_specs = [_blocked(block_q, p.shape[-1]) for p in q_parts]
    k_specs = [_whole(k_len, p.shape[-1]) for p in k_parts]
    table_specs = [_table_spec(cfg, block_q, table), _table_spec(cfg, None, table)] if cfg.rope else []
  else:
    q_specs = [_whole(q_len, p.shape[-1]) for p in q_parts]
    k_specs = [_blocked(block_k, p.shape[-1]) for p in k_parts]
    table_specs = [_table_spec(cfg, None, table), _table_spec(cfg, block_k, table)] if cfg.rope else []
  return q_specs, k_specs, table_specs


def _forward(q_parts, k_parts, v, table, cfg: _Config):
  batch, heads, q_pad, _ = q_parts[0].shape
  q_specs, k_specs, table_specs = _qk_specs(cfg, q_parts, k_parts, table, block_q=cfg.block_q,
                                            block_k=cfg.block_k, grid_over_q=True)
  out_shape = (jax.ShapeDtypeStruct((batch, heads, q_pad, v.shape[-1]), v.dtype),
               jax.ShapeDtypeStruct((batch, heads, q_pad, 1), jnp.float32))
  args = (*q_parts, *k_parts, v, *([table] * 2 * cfg.rope))
  return _pallas_call(
      _forward_kernel, cfg, grid=(batch, heads, q_pad // cfg.block_q),
      in_specs=[*q_specs, *k_specs, _whole(v.shape[2], v.shape[-1]), *table_specs],
      out_specs=(_blocked(cfg.block_q, v.shape[-1]), _blocked(cfg.block_q, 1)), out_shape=out_shape,
      name='flash_attention_fwd', head_dim=v.shape[-1], cost=_cost(cfg, args, out_shape, 2))(*args)


def _backward(q_parts, k_parts, v, table, out, lse, d_out, cfg: _Config):
  batch, heads, q_pad, dim = out.shape
  k_pad = v.shape[2]
  block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
  tables = [table] * 2 * cfg.rope

  q_specs, k_specs, table_specs = _qk_specs(cfg, q_parts, k_parts, table, block_q=block_q, block_k=block_k,
                                            grid_over_q=True)
  row_specs = [_whole(k_pad, dim), _blocked(block_q, dim), _blocked(block_q, 1), _blocked(block_q, 1)]
  args = (*q_parts, *k_parts, v, d_out, lse, delta, *tables)
  dq_shape = tuple(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in q_parts)
  dq = _pallas_call(  # q k^T, do v^T, ds k
      _dq_kernel, cfg, grid=(batch, heads, q_pad // block_q), in_specs=[*q_specs, *k_specs, *row_specs,
                                                                          *table_specs],
      out_specs=tuple(_blocked(block_q, p.shape[-1]) for p in q_parts), out_shape=dq_shape,
      name='flash_attention_dq', head_dim=dim, cost=_cost(cfg, args, dq_shape, 3))(*args)

  q_specs, k_specs, table_specs = _qk_specs(cfg, q_parts, k_parts, table, block_q=block_q, block_k=block_k,
                                            grid_over_q=False)
  row_specs = [_blocked(block_k, dim), _whole(q_pad, dim), _whole(q_pad, 1), _whole(q_pad, 1)]
  dkv_shape = (*(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in k_parts), jax.ShapeDtypeStruct(v.shape, v.dtype))
  *dk, dv = _pallas_call(  # q k^T, p^T do, do v^T, ds^T q
      _dkv_kernel, cfg, grid=(batch, heads, k_pad // block_k), in_specs=[*q_specs, *k_specs, *row_specs,
                                                                           *table_specs],
      out_specs=(*(_blocked(block_k, p.shape[-1]) for p in k_parts), _blocked(block_k, dim)), out_shape=dkv_shape,
      name='flash_attention_dkv', head_dim=dim, cost=_cost(cfg, args, dkv_shape, 4))(*args)
  return tuple(dq), tuple(dk), dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_parts, k_parts, v, table, cfg: _Config):
  return _forward(q_parts, k_parts, v, table, cfg)[0]


def _attention_fwd(q_parts, k_parts, v, table, cfg: _Config):
  out, lse = _forward(q_parts, k_parts, v, table, cfg)
  return out, (q_parts, k_parts, v, table, out, lse)


def _attention_bwd(cfg: _Config, residuals, d_out):
  q_parts, k_parts, v, table, out, lse = residuals
  dq, dk, dv = _backward(q_parts, k_parts, v, table, out, lse, d_out, cfg)
  return dq, dk, dv, None if table is None else jnp.zeros_like(table)


_attention.defvjp(_attention_fwd, _attention_bwd)


# -------------------------------------------------------------------------------------------------- wrapper

def _rope_table(cos: jax.Array, sin: jax.Array, batch: int, seq: int, head_dim: int) -> jax.Array:
  """(cos, sin) for the last n tokens -> [(batch,) 4, seq, head_dim / 2]: even/odd columns, identity rows for the
  tokens before them (CLS)."""
  if (cos.shape != sin.shape or cos.ndim not in (2, 3) or cos.shape[-1] != head_dim or cos.shape[-2] > seq
      or (cos.ndim == 3 and cos.shape[0] != batch)):
    raise ValueError(f'rope tables must be [n, head_dim] or [batch, n, head_dim] with n <= seq, for batch {batch}, '
                     f'seq {seq}, head_dim {head_dim}; got {cos.shape} and {sin.shape}')
  cos, sin = (lax.stop_gradient(t).astype(jnp.float32) for t in (cos, sin))
  lead, prefix = cos.shape[:-2], seq - cos.shape[-2]
  cos = jnp.concatenate([jnp.ones((*lead, prefix, head_dim), jnp.float32), cos], axis=-2)
  sin = jnp.concatenate([jnp.zeros((*lead, prefix, head_dim), jnp.float32), sin], axis=-2)
  return jnp.stack([cos[..., 0::2], sin[..., 0::2], cos[..., 1::2], sin[..., 1::2]], axis=-3)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, scale: float | None = None,
                    rope: tuple[jax.Array, jax.Array] | None = None, block_q: int | None = None,
                    block_k: int | None = None, block_q_bwd: int | None = None, block_k_bwd: int | None = None,
                    target: str | None = None, interpret: bool | None = None) -> jax.Array:
  """softmax(q k^T * scale [+ causal mask]) v over [batch, seq, heads, head_dim] inputs, as a Pallas kernel.

  rope: (cos, sin) tables [n, head_dim] or per-sample [batch, n, head_dim], applied inside the kernels to q and k
    of the last n tokens (`ops.rope.apply_rope_after_prefix`).
  block_*: query/key rows per block in the forward and backward kernels (powers of two >= 16; clamped to the
    sequence). target: 'triton' (GPU) or 'tpu' (Mosaic); interpret: run through the Pallas interpreter.
    Both default to the compile target's platform (`ops.common.compile_platform`; CPU: 'triton', interpreted).
  Call it per device: the attention seam (`ops.attention`) runs it in a shard_map on a mesh.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f'expected q, k, v as [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  default_target, default_interpret = _default_target(q, k, v)
  target = target or default_target
  if target not in _DEFAULT_BLOCKS:
    raise ValueError(f"target must be 'triton' or 'tpu', got {target!r}")
  interpret = default_interpret if interpret is None else interpret
  if rope is not None and (q_len != kv_len or head_dim % 2):
    raise ValueError(f'fused RoPE needs self-attention with an even head_dim, got q {q.shape} and k {k.shape}')

  defaults = _DEFAULT_BLOCKS[target]
  bq, bk, bq_bwd, bk_bwd = (_block(b or d, n) for b, d, n in zip(
      (block_q, block_k, block_q_bwd, block_k_bwd), defaults, (q_len, kv_len, q_len, kv_len)))
  cfg = _Config(target=target, interpret=interpret, causal=causal,
                scale=float(head_dim ** -0.5 if scale is None else scale), q_len=q_len, kv_len=kv_len,
                block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd, rope=rope is not None,
                per_sample_tables=rope is not None and rope[0].ndim == 3)
  q_pad, k_pad = _round_up(q_len, max(bq, bq_bwd)), _round_up(kv_len, max(bk, bk_bwd))

  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # heads-major, as the kernels' BlockSpecs expect
  table = None
  if rope is not None:
    half = _padded_head_dim(head_dim // 2, target)
    q_parts = tuple(_pad_to(p, (batch, heads, q_pad, half)) for p in (q[..., 0::2], q[..., 1::2]))
    k_parts = tuple(_pad_to(p, (batch, heads, k_pad, half)) for p in (k[..., 0::2], k[..., 1::2]))
    table = _rope_table(*rope, batch, q_len, head_dim)
    table = _pad_to(table, (*table.shape[:-2], q_pad, half))
  else:
    dim = _padded_head_dim(head_dim, target)
    q_parts, k_parts = (_pad_to(q, (batch, heads, q_pad, dim)),), (_pad_to(k, (batch, heads, k_pad, dim)),)
  v = _pad_to(v, (batch, heads, k_pad, _padded_head_dim(head_dim, target)))
  out = _attention(q_parts, k_parts, v, table, cfg)
  return out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3)


def attention(q, k, v, *, causal: bool, scale: float, rope=None) -> jax.Array:
  """The backend's function: default blocks, the compile target's lowering."""
  return flash_attention(q, k, v, causal=causal, scale=scale, rope=rope)

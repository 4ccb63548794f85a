"""Key tables between this library's parameters and the PyTorch checkpoint layouts.

Layouts:
  eva        the EVA repository's own files (`EVA02_CLIP_B_psz16_s8B.pt`): `visual.blocks.N.attn.q_proj.weight`,
             `attn.q_bias`, `attn.inner_attn_ln`, `mlp.w1/w2/ffn_ln/w3`, RoPE buffers, `text.transformer...`.
  open_clip  open_clip / timm (`timm/EVA02-*` hub repos): `visual.trunk.*` in timm's Eva naming
             (`attn.q_proj.bias`, `attn.norm`, `mlp.fc1_g/fc1_x/norm/fc2`), `text.*` or top-level text keys.

A table is a list of `Entry(ours, theirs, kind)`; per-block entries hold `{i}` in the PyTorch key and are
stacked on the leading depth axis of our parameters. Both directions read the same table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from eva_clip_jax.errors import InputError
from eva_clip_jax.models.registry import ModelSpec, VisionSpec

Kind = Literal['copy', 'linear', 'conv']
LAYOUTS = ('eva', 'open_clip')


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: tuple[str, ...]  # path in the nested parameter dict
  theirs: str  # PyTorch state-dict key; '{i}' for a per-block entry
  kind: Kind = 'copy'  # linear: torch [out, in] <-> ours [in, out]; conv: OIHW <-> HWIO
  depth: int = 0  # > 0 for per-block entries


def _linear(ours, theirs, bias=True, depth=0):
  yield Entry(ours + ('kernel',), f'{theirs}.weight', 'linear', depth)
  if bias:
    yield Entry(ours + ('bias',), f'{theirs}.bias', 'copy', depth)


def _norm(ours, theirs, depth=0, bias=True):
  yield Entry(ours + ('scale',), f'{theirs}.weight', 'copy', depth)
  if bias:
    yield Entry(ours + ('bias',), f'{theirs}.bias', 'copy', depth)


def vision_entries(spec: VisionSpec, layout: str, prefix: str) -> Iterator[Entry]:
  """The vision tower; `prefix` is 'visual.' (eva), 'visual.trunk.' (open_clip) or '' (bare towers)."""
  p, d, v = prefix, spec.depth, ('visual',)
  norm_bias = spec.norm == 'layernorm'  # RMSNorm has no bias
  yield Entry(v + ('patch_embed', 'kernel'), f'{p}patch_embed.proj.weight', 'conv')
  yield Entry(v + ('patch_embed', 'bias'), f'{p}patch_embed.proj.bias')
  yield Entry(v + ('cls_token',), f'{p}cls_token')
  yield Entry(v + ('pos_embed',), f'{p}pos_embed')
  b, blk = v + ('blocks',), f'{p}blocks.{{i}}'
  yield from _norm(b + ('norm1',), f'{blk}.norm1', d, norm_bias)
  yield from _norm(b + ('norm2',), f'{blk}.norm2', d, norm_bias)
  a = b + ('attn',)
  if spec.qkv == 'separate':
    for name in ('q_proj', 'k_proj', 'v_proj'):
      yield from _linear(a + (name,), f'{blk}.attn.{name}', bias=False, depth=d)
    # timm keeps the q and v biases as the projections' own biases
    theirs = ('q_bias', 'v_bias') if layout == 'eva' else ('q_proj.bias', 'v_proj.bias')
    for ours, key in zip(('q_bias', 'v_bias'), theirs if spec.qkv_bias else ()):
      yield Entry(a + (ours,), f'{blk}.attn.{key}', depth=d)
  else:
    yield from _linear(a + ('qkv',), f'{blk}.attn.qkv', bias=False, depth=d)
    if spec.qkv_bias:
      yield Entry(a + ('q_bias',), f'{blk}.attn.q_bias', depth=d)
      yield Entry(a + ('v_bias',), f'{blk}.attn.v_bias', depth=d)
  if spec.subln:
    inner = 'inner_attn_ln' if layout == 'eva' else 'norm'
    yield from _norm(a + ('inner_attn_ln',), f'{blk}.attn.{inner}', d, norm_bias)
  yield from _linear(a + ('proj',), f'{blk}.attn.proj', depth=d)
  m = b + ('mlp',)
  if spec.mlp == 'swiglu':
    names = ('w1', 'w2', 'w3') if layout == 'eva' else ('fc1_g', 'fc1_x', 'fc2')
    for ours, theirs in zip(('w1', 'w2', 'w3'), names):
      yield from _linear(m + (ours,), f'{blk}.mlp.{theirs}', depth=d)
  else:
    yield from _linear(m + ('fc1',), f'{blk}.mlp.fc1', depth=d)
    yield from _linear(m + ('fc2',), f'{blk}.mlp.fc2', depth=d)
  if spec.subln:
    yield from _norm(m + ('ffn_ln',), f'{blk}.mlp.{"ffn_ln" if layout == "eva" else "norm"}', d, norm_bias)
  if spec.layer_scale_init:
    yield Entry(b + ('gamma_1',), f'{blk}.gamma_1', depth=d)
    yield Entry(b + ('gamma_2',), f'{blk}.gamma_2', depth=d)
  yield from _norm(v + ('norm',), f'{p}norm', bias=norm_bias)
  yield from _linear(v + ('head',), f'{p}head', bias=spec.qkv_bias)


def text_entries(spec: ModelSpec, prefix: str) -> Iterator[Entry]:
  """The text tower; `prefix` is 'text.' (EVA, open_clip CustomTextCLIP) or '' (OpenAI CLIP layout)."""
  p, d, t = prefix, spec.text.depth, ('text',)
  yield Entry(t + ('token_embedding', 'embedding'), f'{p}token_embedding.weight')
  yield Entry(t + ('positional_embedding',), f'{p}positional_embedding')
  b, blk = t + ('blocks',), f'{p}transformer.resblocks.{{i}}'
  yield from _norm(b + ('ln_1',), f'{blk}.ln_1', d)
  yield Entry(b + ('attn', 'in_proj', 'kernel'), f'{blk}.attn.in_proj_weight', 'linear', d)
  yield Entry(b + ('attn', 'in_proj', 'bias'), f'{blk}.attn.in_proj_bias', depth=d)
  yield from _linear(b + ('attn', 'out_proj'), f'{blk}.attn.out_proj', depth=d)
  yield from _norm(b + ('ln_2',), f'{blk}.ln_2', d)
  yield from _linear(b + ('mlp', 'c_fc'), f'{blk}.mlp.c_fc', depth=d)
  yield from _linear(b + ('mlp', 'c_proj'), f'{blk}.mlp.c_proj', depth=d)
  yield from _norm(t + ('ln_final',), f'{p}ln_final')
  yield Entry(t + ('text_projection',), f'{p}text_projection')


PREFIXES = {'eva': ('visual.', 'text.'), 'open_clip': ('visual.trunk.', 'text.')}


def entries(spec: ModelSpec, layout: str, *, vision_prefix: str | None = None,
            text_prefix: str | None = None) -> list[Entry]:
  """The full table of a layout. Prefixes default to the layout's own; bare towers pass ''."""
  if layout not in LAYOUTS:
    raise InputError(f'unknown checkpoint layout {layout!r}; use one of {LAYOUTS}')
  default_vision, default_text = PREFIXES[layout]
  vision_prefix = default_vision if vision_prefix is None else vision_prefix
  text_prefix = default_text if text_prefix is None else text_prefix
  return [*vision_entries(spec.vision, layout, vision_prefix), *text_entries(spec, text_prefix),
          Entry(('logit_scale',), 'logit_scale')]


def rope_buffer_keys(spec: ModelSpec) -> list[str]:
  """EVA's persistent RoPE buffers: once on the tower and again under every block's attention."""
  if not spec.vision.rope:
    return []
  owners = ['visual.rope'] + [f'visual.blocks.{i}.attn.rope' for i in range(spec.vision.depth)]
  return [f'{owner}.freqs_{part}' for owner in owners for part in ('cos', 'sin')]


# Our axis order, as positions of torch's axes: Linear [out, in] -> [in, out], Conv2d OIHW -> HWIO. The way back
# is the inverse permutation, so the two directions cannot drift apart.
_OUR_AXES: dict[Kind, tuple[int, ...]] = {'linear': (1, 0), 'conv': (2, 3, 1, 0)}


def _to_ours(array: np.ndarray, kind: Kind) -> np.ndarray:
  return array.transpose(_OUR_AXES[kind]) if kind in _OUR_AXES else array


def _to_theirs(array: np.ndarray, kind: Kind) -> np.ndarray:
  return array.transpose(np.argsort(_OUR_AXES[kind])) if kind in _OUR_AXES else array


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def entry_keys(entry: Entry) -> list[str]:
  """The PyTorch keys of an entry: one, or one per block."""
  return [entry.theirs.format(i=i) for i in range(entry.depth)] if entry.depth else [entry.theirs]


def our_shape(entry: Entry, theirs_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Our parameter's shape from the shape of (each block's) PyTorch tensor."""
  shape = tuple(theirs_shape[a] for a in _OUR_AXES[entry.kind]) if entry.kind in _OUR_AXES else tuple(theirs_shape)
  return (entry.depth,) + shape if entry.depth else shape


def theirs_shape(entry: Entry, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of (each block's) PyTorch tensor from our parameter's shape: the inverse of `our_shape`."""
  ours = tuple(ours[1:] if entry.depth else ours)
  return tuple(ours[a] for a in np.argsort(_OUR_AXES[entry.kind])) if entry.kind in _OUR_AXES else ours


def _theirs_index(index: tuple[slice, ...], kind: Kind) -> tuple[slice, ...]:
  if kind not in _OUR_AXES:
    return index
  out = [slice(None)] * len(index)
  for ours, theirs in enumerate(_OUR_AXES[kind]):
    out[theirs] = index[ours]
  return tuple(out)


def read_entry(reader: Any, entry: Entry, index: tuple[slice, ...] | None = None) -> np.ndarray:
  """Our parameter, or the slice `index` of it (our axes), read from `reader` (`torch_io.StateReader`: `read(key,
  index)` in PyTorch's axis order). A slice of a per-block parameter reads only the blocks in its range."""
  shape = our_shape(entry, reader.shape(entry_keys(entry)[0]))
  index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
  if not entry.depth:
    return _to_ours(reader.read(entry.theirs, _theirs_index(index, entry.kind)), entry.kind)
  rest = _theirs_index(index[1:], entry.kind)
  out = None
  for n, i in enumerate(range(*index[0].indices(entry.depth))):  # filled in place: one block's copy at a time
    block = _to_ours(reader.read(entry.theirs.format(i=i), rest), entry.kind)
    if out is None:
      out = np.empty((len(range(*index[0].indices(entry.depth))),) + block.shape, block.dtype)
    out[n] = block
  return out


def check_keys(keys: Any, table: list[Entry], *, allow_missing: bool = False) -> tuple[list[Entry], list[str]]:
  """(the entries whose keys are all in `keys`, the keys no entry uses), without reading any data.

  A per-block parameter is present only when every block's key is. Missing keys raise a KeyError that lists them
  all, unless `allow_missing`.
  """
  present, used, missing = [], set(), []
  for entry in table:
    names = entry_keys(entry)
    absent = [k for k in names if k not in keys]
    if absent:
      missing.extend(absent)
      continue
    present.append(entry)
    used.update(names)
  if missing and not allow_missing:
    shown = ', '.join(missing[:40]) + (f', ... ({len(missing)} in all)' if len(missing) > 40 else '')
    raise KeyError(f'checkpoint is missing {len(missing)} keys: {shown}')
  return present, sorted(set(keys) - used)


def table_to_params(state_dict: Mapping[str, np.ndarray], table: list[Entry], *,
                    allow_missing: bool = False) -> tuple[dict[str, Any], list[str]]:
  """Applies a table to a flat state dict. Returns (nested params, keys the table did not use); see `check_keys`.
  Values are taken one key at a time, so a lazy mapping (`torch_io.StateReader`) is read entry by entry."""
  present, unused = check_keys(state_dict, table, allow_missing=allow_missing)
  params: dict[str, Any] = {}
  for entry in present:
    arrays = [_to_ours(np.asarray(state_dict[k]), entry.kind) for k in entry_keys(entry)]
    set_path(params, entry.ours, np.stack(arrays) if entry.depth else arrays[0])
  return params, unused


def iter_theirs(params: Mapping[str, Any], table: list[Entry]) -> Iterator[tuple[str, tuple[int, ...], Any]]:
  """The inverse of `table_to_params`, lazily: (PyTorch key, shape, a function making the numpy array) per key.
  A block is taken out of its stacked (possibly sharded, on-device) parameter only when it is made."""
  for entry in table:
    value = get_path(params, entry.ours)
    theirs = theirs_shape(entry, np.shape(value))
    for i in range(entry.depth) if entry.depth else (None,):
      key = entry.theirs if i is None else entry.theirs.format(i=i)
      yield key, theirs, lambda v=value, i=i, kind=entry.kind: np.array(
          _to_theirs(np.asarray(v if i is None else v[i]), kind), order='C')


def params_to_table(params: Mapping[str, Any], table: list[Entry]) -> dict[str, np.ndarray]:
  """The inverse of `table_to_params`: a flat PyTorch-named dict of numpy arrays."""
  return {key: make() for key, _, make in iter_theirs(params, table)}

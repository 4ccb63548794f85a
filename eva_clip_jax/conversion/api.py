"""Converting between PyTorch EVA-CLIP checkpoints and this library's models.

  load_pretrained(model, source)      a .pt/.bin/.safetensors file (EVA or open_clip layout), an orbax
                                      parameter directory, a released tag (eva_clip_jax.pretrained) or
                                      'hf-hub:org/repo'
  convert_file(src, dst, model_name)  PyTorch file -> orbax parameter directory
  export_file(src, dst, model_name, layout)
                                      orbax directory (or a model) -> EVA-native or open_clip PyTorch file
  init_towers(model, visual=..., text=...)
                                      the paper's initialisation: image tower from an EVA MIM checkpoint,
                                      text tower from an OpenAI/OpenCLIP model, head/projection/scale fresh
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from eva_clip_jax import storage
from eva_clip_jax.conversion import layouts, orbax_io, resize
from eva_clip_jax.conversion.params import assign_params, model_params
from eva_clip_jax.errors import InputError
from eva_clip_jax.models.paths import flatten, unflatten
from eva_clip_jax.models.registry import ModelSpec, get_model_spec
from eva_clip_jax.models.rope import rope_2d_tables
from eva_clip_jax.pretrained import resolve

# Buffers the reference stores beside its parameters; recomputed or not needed here.
IGNORED_SUFFIXES = ('rope.freqs_cos', 'rope.freqs_sin', 'attn_mask', 'attn.k_bias')


def _is_ignored(key: str) -> bool:
  return key.endswith(IGNORED_SUFFIXES)


def _find_prefix(state: Mapping[str, Any], suffix: str) -> str | None:
  hits = sorted((k[:-len(suffix)] for k in state if k.endswith(suffix)), key=len)
  return hits[0] if hits else None


def detect_vision_layout(state: Mapping[str, Any]) -> tuple[str, str] | None:
  """(naming, prefix) of the vision tower in `state`, or None when it has none.

  open_clip puts timm's Eva under 'visual.trunk.'; EVA's files use 'visual.'; MIM and other bare vision
  checkpoints have no prefix, and their naming is told apart by timm-only names.
  """
  prefix = _find_prefix(state, 'patch_embed.proj.weight')
  if prefix is None:
    return None
  if prefix.endswith('trunk.'):
    return 'open_clip', prefix
  timm_only = ('.mlp.fc1_g.weight', '.attn.norm.weight', '.attn.q_proj.bias', '.mlp.norm.weight')
  if any(k.startswith(prefix) and k.endswith(timm_only) for k in state):
    return 'open_clip', prefix
  return 'eva', prefix


def detect_layout(state: Mapping[str, Any]) -> str:
  vision = detect_vision_layout(state)
  if vision is None:
    raise InputError('cannot tell the checkpoint layout: no vision tower (no *patch_embed.proj.weight key)')
  return vision[0]


def _adapt_vision(params: dict[str, Any], spec: ModelSpec) -> None:
  """Resizes a checkpoint's position embedding and patch kernel to the model's grid and patch, in place."""
  visual = params.get('visual', {})
  if 'pos_embed' in visual:
    visual['pos_embed'] = resize.resize_pos_embed(np.asarray(visual['pos_embed']), spec.vision.grid_size)
  kernel = visual.get('patch_embed', {}).get('kernel')
  if kernel is not None:
    visual['patch_embed']['kernel'] = resize.resize_patch_kernel(np.asarray(kernel), spec.vision.patch_size)


def _table_for(state: Mapping[str, Any], spec: ModelSpec, layout: str | None) -> list[layouts.Entry]:
  vision = detect_vision_layout(state)
  naming, vision_prefix = vision if vision else (layout or 'eva', 'visual.')
  if layout is not None and vision is not None and layout != naming:
    raise InputError(f'the checkpoint looks like the {naming!r} layout, not {layout!r}')
  text_prefix = _find_prefix(state, 'token_embedding.weight')
  return layouts.entries(spec, naming, vision_prefix=vision_prefix,
                         text_prefix='text.' if text_prefix is None else text_prefix)


def state_dict_to_params(state: Mapping[str, Any], spec: ModelSpec, *, layout: str | None = None,
                         allow_missing: bool = False) -> dict[str, Any]:
  """A PyTorch state dict (numpy arrays) -> nested parameters for `spec`.

  Raises ValueError listing every missing or unexpected key (RoPE and mask buffers are recomputed, so never
  unexpected). Position embedding and patch kernel are resized to the model as the reference does on load.
  """
  table = _table_for(state, spec, layout)
  try:
    params, unused = layouts.table_to_params(state, table, allow_missing=allow_missing)
  except KeyError as e:
    raise InputError(f'checkpoint does not fit {spec.name}: {e.args[0]}') from None
  unexpected = [k for k in unused if not _is_ignored(k)]
  if unexpected:
    raise InputError(f'checkpoint does not fit {spec.name}: {len(unexpected)} unexpected keys: '
                     + ', '.join(unexpected[:40]))
  _adapt_vision(params, spec)
  return params


def params_to_state_dict(params: Mapping[str, Any], spec: ModelSpec, layout: str) -> dict[str, np.ndarray]:
  """Nested parameters -> a flat PyTorch state dict in `layout` ('eva' or 'open_clip')."""
  state = layouts.params_to_table(params, layouts.entries(spec, layout))
  if layout == 'eva' and spec.vision.rope:  # EVA's model keeps its RoPE tables as persistent buffers
    cos, sin = rope_2d_tables(spec.vision.head_dim, spec.vision.grid_size, spec.vision.pt_seq_len)
    for key in layouts.rope_buffer_keys(spec):
      state[key] = (cos if key.endswith('cos') else sin).copy()  # safetensors refuses shared buffers
  return state


def read_params(source: str, spec: ModelSpec, *, layout: str | None = None,
                allow_missing: bool = False) -> dict[str, Any]:
  """Parameters for `spec` from a PyTorch file, an orbax parameter directory or an hf-hub id."""
  path = resolve(source, spec.name)  # a released tag or hf-hub: id -> the file in the hub cache
  if storage.isdir(path):
    params, meta = orbax_io.load_params(path)
    if meta.get('model') not in (None, spec.name):
      raise InputError(f'{path} holds {meta["model"]} parameters, not {spec.name}')
    _adapt_vision(params, spec)
    return params
  from eva_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top
  return state_dict_to_params(torch_io.load_state_dict(path), spec, layout=layout, allow_missing=allow_missing)


def load_pretrained(model: nnx.Module, source: str, *, layout: str | None = None,
                    allow_missing: bool = False) -> None:
  """Loads weights into `model` in place (see `read_params`)."""
  params = read_params(source, model.spec, layout=layout, allow_missing=allow_missing)
  assign_params(model, params, allow_missing=allow_missing)


def convert_file(src: str, dst: str, model_name: str | ModelSpec, *, layout: str | None = None,
                 allow_missing: bool = False, overwrite: bool = False) -> None:
  """PyTorch checkpoint -> orbax parameter directory that `create_model(pretrained=dst)` loads."""
  from eva_clip_jax.models.factory import create_model  # pylint: disable=g-import-not-at-top
  spec = model_name if isinstance(model_name, ModelSpec) else get_model_spec(model_name)
  model = create_model(spec)
  load_pretrained(model, src, layout=layout, allow_missing=allow_missing)
  orbax_io.save_params(model_params(model), dst, model_name=spec.name, source=storage.basename(src),
                       overwrite=overwrite)


def export_file(src: str | nnx.Module, dst: str, model_name: str | ModelSpec, layout: str,
                dtype: str = 'float32') -> None:
  """An orbax parameter directory (or a model) -> a PyTorch file in the EVA or open_clip layout."""
  from eva_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top
  spec = model_name if isinstance(model_name, ModelSpec) else get_model_spec(model_name)
  if isinstance(src, nnx.Module):
    params = model_params(src)
  else:
    params = read_params(src, spec)
  torch_io.save_state_dict(params_to_state_dict(params, spec, layout), dst, dtype=dtype)


def init_towers(model: nnx.Module, *, visual: str | None = None, text: str | None = None,
                skip: tuple[str, ...]) -> dict[str, list[str]]:
  """The paper's initialisation: each tower from its own pretrained checkpoint.

  visual: an EVA MIM checkpoint (timm `eva02_*.mim_*` or EVA-native naming, bare or under `visual.`), the
    EVA-01 giant, or a whole EVA-CLIP/open_clip file. Patch kernel and position embedding are resized bicubically
    to the model (14 -> 16 for B/16).
  text: an OpenAI CLIP or OpenCLIP state dict (text keys bare or under `text.`).
  skip: parameter paths ('visual.head') that start fresh whatever the files hold; the recipe's `config.init.skip`
    is the paper's choice (heads and logit scale fresh).
  Returns {'loaded': [...], 'fresh': [...]} parameter paths, for the training log.
  """
  from eva_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top
  spec = model.spec
  params: dict[str, Any] = {}
  for tower, source in (('visual', visual), ('text', text)):
    if not source:
      continue
    if not storage.exists(source):
      raise FileNotFoundError(f'{tower} init file not found: {source}')
    state = torch_io.load_state_dict(source)
    table = [e for e in _table_for(state, spec, None) if e.ours[0] == tower]
    loaded, _ = layouts.table_to_params(state, table, allow_missing=True)
    if tower not in loaded:
      raise InputError(f'{source} holds no {tower} tower parameters that fit {spec.name}')
    params.update(loaded)
  _adapt_vision(params, spec)
  flat = flatten(params)
  flat = {k: v for k, v in flat.items() if not k.replace('/', '.').startswith(skip)}
  assign_params(model, unflatten(flat), allow_missing=True)
  all_paths = flatten(model_params(model))
  return {'loaded': sorted(flat), 'fresh': sorted(set(all_paths) - set(flat))}


def init_from_config(model: nnx.Module, init_config: Mapping[str, Any]) -> dict[str, list[str]]:
  """`init_towers` driven by a config's `init` block (`visual`, `text`, `skip`); empty names are skipped."""
  visual, text = init_config.get('visual') or None, init_config.get('text') or None
  visual, text = (resolve(s, model.spec.name, purpose=p) if s else None  # released tags -> cached files
                  for s, p in ((visual, 'visual'), (text, 'text')))
  for tower, source in (('visual', visual), ('text', text)):
    if source and not storage.exists(source):
      raise FileNotFoundError(f'config.init.{tower} = {source!r} is not a file. Download the checkpoint it names '
                              f'and pass its path: --config.init.{tower}=/path/to/{storage.basename(source)}.pt')
  return init_towers(model, visual=visual, text=text, skip=tuple(init_config.skip))

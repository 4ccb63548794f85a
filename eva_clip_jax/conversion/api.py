"""Converting between PyTorch EVA-CLIP checkpoints and this library's models.

  load_pretrained(model, source)      a .pt/.bin/.safetensors file (EVA or open_clip layout), an orbax
                                      parameter directory, a released tag (eva_clip_jax.pretrained) or
                                      'hf-hub:org/repo'
  convert_file(src, dst, model_name)  PyTorch file -> orbax parameter directory
  export_file(src, dst, model_name, layout)
                                      orbax directory (or a model) -> EVA-native or open_clip PyTorch file
  load_sharded(model, source, mesh, rules)
                                      a model whose parameters are read straight into their shardings: each
                                      process reads only its devices' slices of the file (EVA-CLIP-8B/18B)
  read_sharded(source, spec, targets) the same for a tree of jax.ShapeDtypeStructs with shardings (a training
                                      setup's abstract parameters)

PyTorch files are read tensor by tensor (memory-mapped .pt/.bin, ranged reads of .safetensors) and written tensor
by tensor, so host memory never holds the checkpoint beside the model (torch_io).
  init_towers(model, visual=..., text=...)
                                      the paper's initialisation: image tower from an EVA MIM checkpoint,
                                      text tower from an OpenAI/OpenCLIP model, head/projection/scale fresh
  read_towers(targets, spec, visual=..., text=...)
                                      the same into shardings, each process reading its own slices (training)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from eva_clip_jax import sharding as sharding_lib, storage
from eva_clip_jax.conversion import layouts, orbax_io, resize
from eva_clip_jax.conversion.params import assign_params, model_params
from eva_clip_jax.errors import InputError
from eva_clip_jax.models.paths import flatten, path_name, unflatten
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


def _resizers(spec: ModelSpec) -> dict[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]:
  """The parameters a checkpoint may hold at another size, resized to the model as the reference does on load."""
  return {('visual', 'pos_embed'): lambda a: resize.resize_pos_embed(np.asarray(a), spec.vision.grid_size),
          ('visual', 'patch_embed', 'kernel'): lambda a: resize.resize_patch_kernel(np.asarray(a),
                                                                                    spec.vision.patch_size)}


def _adapt_vision(params: dict[str, Any], spec: ModelSpec) -> None:
  """Resizes a checkpoint's position embedding and patch kernel to the model's grid and patch, in place."""
  for path, resize_fn in _resizers(spec).items():
    try:
      value = layouts.get_path(params, path)
    except KeyError:
      continue
    layouts.set_path(params, path, resize_fn(value))


def _table_for(state: Mapping[str, Any], spec: ModelSpec, layout: str | None) -> list[layouts.Entry]:
  vision = detect_vision_layout(state)
  naming, vision_prefix = vision if vision else (layout or 'eva', 'visual.')
  if layout is not None and vision is not None and layout != naming:
    raise InputError(f'the checkpoint looks like the {naming!r} layout, not {layout!r}')
  text_prefix = _find_prefix(state, 'token_embedding.weight')
  return layouts.entries(spec, naming, vision_prefix=vision_prefix,
                         text_prefix='text.' if text_prefix is None else text_prefix)


def _checked_table(state: Mapping[str, Any], spec: ModelSpec, layout: str | None,
                   allow_missing: bool = False) -> list[layouts.Entry]:
  """The entries of `state`'s table that it holds, after checking its keys (no data is read)."""
  try:
    present, unused = layouts.check_keys(state, _table_for(state, spec, layout), allow_missing=allow_missing)
  except KeyError as e:
    raise InputError(f'checkpoint does not fit {spec.name}: {e.args[0]}') from None
  unexpected = [k for k in unused if not _is_ignored(k)]
  if unexpected:
    raise InputError(f'checkpoint does not fit {spec.name}: {len(unexpected)} unexpected keys: '
                     + ', '.join(unexpected[:40]))
  return present


def state_dict_to_params(state: Mapping[str, Any], spec: ModelSpec, *, layout: str | None = None,
                         allow_missing: bool = False) -> dict[str, Any]:
  """A PyTorch state dict (numpy arrays, or a lazy `torch_io.StateReader`) -> nested parameters for `spec`.

  Raises ValueError listing every missing or unexpected key (RoPE and mask buffers are recomputed, so never
  unexpected). Position embedding and patch kernel are resized to the model as the reference does on load.
  """
  params, _ = layouts.table_to_params(state, _checked_table(state, spec, layout, allow_missing), allow_missing=True)
  _adapt_vision(params, spec)
  return params


def state_producers(params: Mapping[str, Any], spec: ModelSpec, layout: str, *,
                    text_prefix: str | None = None) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
  """(PyTorch key, shape, a function making the numpy array) for each tensor of `layout`, for a streamed write.

  text_prefix: where the text tower goes; the layout's own by default ('text.'). EVA-CLIP-8B/18B's reference model
  (EVA-CLIP-18B/shinji's `CLIP`, not `CustomCLIP`) keeps it at the top level: pass ''.
  """
  out = list(layouts.iter_theirs(params, layouts.entries(spec, layout, text_prefix=text_prefix)))
  if layout == 'eva' and spec.vision.rope:  # EVA's model keeps its RoPE tables as persistent buffers
    cos, sin = rope_2d_tables(spec.vision.head_dim, spec.vision.grid_size, spec.vision.pt_seq_len)
    for key in layouts.rope_buffer_keys(spec):
      table = cos if key.endswith('cos') else sin
      out.append((key, tuple(table.shape), table.copy))  # safetensors refuses shared buffers
  return out


def params_to_state_dict(params: Mapping[str, Any], spec: ModelSpec, layout: str, *,
                         text_prefix: str | None = None) -> dict[str, np.ndarray]:
  """Nested parameters -> a flat PyTorch state dict in `layout` ('eva' or 'open_clip'); see `state_producers`."""
  return {key: make() for key, _, make in state_producers(params, spec, layout, text_prefix=text_prefix)}


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
  with torch_io.open_state_dict(path) as reader:  # read entry by entry
    return state_dict_to_params(reader, spec, layout=layout, allow_missing=allow_missing)


def param_targets(model: nnx.Module, mesh: Mesh | None = None, rules: Any = None,
                  strategy: str = 'fsdp') -> dict[str, Any]:
  """The model's parameters as a pure dict of jax.ShapeDtypeStructs carrying their shardings: over `mesh` by the
  logical-axis `rules` (config.sharding.axis_rules) as training shards them, or on the first local device."""
  state = nnx.state(model, nnx.Param)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
  if mesh is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), abstract)
  else:
    if rules is None:
      raise InputError('loading onto a mesh needs the logical-axis rules (config.sharding.axis_rules)')
    shardings = sharding_lib.param_shardings(abstract, sharding_lib.logical_axes(state), mesh, strategy, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def read_sharded(source: str, spec: ModelSpec, targets: Any, *, layout: str | None = None) -> dict[str, Any]:
  """Parameters for `spec` as global jax.Arrays with the shapes, dtypes and shardings of `targets` (a pure dict of
  jax.ShapeDtypeStructs: `param_targets`, or a training setup's abstract parameters).

  Each array is built shard by shard (`_sharded_array`), reading only the slice an addressable device holds (a
  per-block parameter's slice names the blocks, hence the PyTorch keys, it reads), converted and cast on the way: a
  process never holds more of the checkpoint than its own shards plus one tensor. A converted directory is restored
  by orbax straight into the shardings. Keys and shapes are checked before any data is read; position
  embedding and patch kernel of another size are read whole and resized (they are small).
  """
  path = resolve(source, spec.name)
  flat_targets = flatten(targets)
  if storage.isdir(path):
    shapes = flatten(orbax_io.param_shapes(path))
    if all(shapes.get(k) == tuple(t.shape) for k, t in flat_targets.items()):
      params, meta = orbax_io.load_params(path, targets)
      if meta.get('model') not in (None, spec.name):
        raise InputError(f'{path} holds {meta["model"]} parameters, not {spec.name}')
      return params
    return jax.device_put(read_params(path, spec), jax.tree.map(lambda t: t.sharding, targets))  # to be resized
  from eva_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top
  with torch_io.open_state_dict(path) as reader:
    table = _checked_table(reader, spec, layout)
    out = _read_entries(reader, table, spec, flat_targets, path, whole=True)
  return unflatten(out)


def _read_entries(reader: Mapping[str, Any], table: list[layouts.Entry], spec: ModelSpec, flat_targets: dict[str, Any],
                  path: str, *, whole: bool) -> dict[str, jax.Array]:
  """`table`'s parameters read from `reader` into `flat_targets`' shapes, dtypes and shardings, {path name: array}.
  Shapes are checked before any data is read; with `whole`, so is that the table covers every target."""
  resizers = _resizers(spec)
  shapes = {e: layouts.our_shape(e, reader.shape(layouts.entry_keys(e)[0])) for e in table}
  names = {e: path_name(e.ours) for e in table}
  mis_shaped = [f'{names[e]}: expected {tuple(flat_targets[names[e]].shape)}, got {shapes[e]}' for e in table
                if names[e] in flat_targets and shapes[e] != tuple(flat_targets[names[e]].shape)
                and e.ours not in resizers]
  problems = [f'{what} ({len(found)}): {", ".join(found)}' for what, found in (
      ('missing', sorted(set(flat_targets) - set(names.values())) if whole else []),
      ('unexpected', sorted(set(names.values()) - set(flat_targets)))) if found]
  if mis_shaped:  # as assign_params words it
    problems.append(f'wrong shape ({len(mis_shaped)}): {"; ".join(mis_shaped)}')
  if problems:
    raise InputError(f'{path} does not fit {spec.name}:\n  ' + '\n  '.join(problems))
  out = {}
  for entry in table:
    target = flat_targets[names[entry]]
    if shapes[entry] != tuple(target.shape):
      resized = resizers[entry.ours](layouts.read_entry(reader, entry))
      read = lambda index, resized=resized: resized[index]
    else:
      read = lambda index, entry=entry: layouts.read_entry(reader, entry, index)
    out[names[entry]] = _sharded_array(target, read)
  return out


def _sharded_array(target: jax.ShapeDtypeStruct, read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
  """What `jax.make_array_from_callback(shape, sharding, read)` makes, one index at a time. That function reads every
  addressable shard before copying any to its device, so a whole parameter's local part is held twice (measured: the
  peak of a sharded load rose by the largest parameter); here each read goes to the devices holding that index and
  is dropped before the next. A replicated index is read once."""
  shape, dtype, sharding = target.shape, target.dtype, target.sharding
  groups: dict[tuple, tuple[tuple[slice, ...], list[jax.Device]]] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    groups.setdefault(tuple((s.start, s.stop, s.step) for s in index), (index, []))[1].append(device)
  shards = []
  for index, devices in groups.values():
    host = np.asarray(read(index), dtype)
    placed = [jax.device_put(host, device) for device in devices]
    jax.block_until_ready(placed)  # the copies are done: `host` can go
    shards += placed
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def load_sharded(model: nnx.Module | ModelSpec | str, source: str, mesh: Mesh | None = None, rules: Any = None, *,
                 strategy: str = 'fsdp', layout: str | None = None, **model_kwargs) -> nnx.Module:
  """The model (a name, a spec, or a model, abstract or not) with the weights of `source`, each parameter built in
  its sharding over `mesh` by the logical-axis `rules` (see `read_sharded`); without a mesh, on the first local
  device. model_kwargs go to `create_model` (dtype, param_dtype, attention, ...). The model is created abstract:
  no random initialisation is computed or held beside the weights."""
  from eva_clip_jax.models.factory import create_model, model_from_params  # pylint: disable=g-import-not-at-top
  if not isinstance(model, nnx.Module):
    model = create_model(model, abstract=True, **model_kwargs)
  graphdef, template, rest = nnx.split(model, nnx.Param, ...)
  params = read_sharded(source, model.spec, param_targets(model, mesh, rules, strategy), layout=layout)
  return model_from_params(graphdef, template, params, rest)


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
  if allow_missing:  # the keys the file lacks keep a fresh initialisation, so the model is made whole first
    model = create_model(spec)
    load_pretrained(model, src, layout=layout, allow_missing=True)
    params = model_params(model)
  else:
    params = read_sharded(src, spec, param_targets(create_model(spec, abstract=True)), layout=layout)
  orbax_io.save_params(params, dst, model_name=spec.name, source=storage.basename(src), overwrite=overwrite)


def export_file(src: str | nnx.Module, dst: str, model_name: str | ModelSpec, layout: str,
                dtype: str = 'float32', *, text_prefix: str | None = None) -> None:
  """An orbax parameter directory (or a model, sharded or not) -> a PyTorch file in the EVA or open_clip layout,
  written tensor by tensor (see `state_producers` for text_prefix)."""
  from eva_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top
  spec = model_name if isinstance(model_name, ModelSpec) else get_model_spec(model_name)
  if isinstance(src, nnx.Module):
    params = model_params(src)
  else:
    params = read_params(src, spec)
  torch_io.write_state_dict(state_producers(params, spec, layout, text_prefix=text_prefix), dst, dtype=dtype)


def read_towers(targets: Any, spec: ModelSpec, *, visual: str | None = None, text: str | None = None,
                skip: tuple[str, ...] = ()) -> dict[str, jax.Array]:
  """The paper's initialisation: each tower from its own pretrained checkpoint, read into `targets`' shardings
  (a pure dict of jax.ShapeDtypeStructs, as `read_sharded`: each process reads only its devices' slices, so an
  8B or 18B tower never passes through one host whole).

  visual: an EVA MIM checkpoint (timm `eva02_*.mim_*` or EVA-native naming, bare or under `visual.`), the
    EVA-01 giant, or a whole EVA-CLIP/open_clip file. Patch kernel and position embedding are resized bicubically
    to the model (14 -> 16 for B/16).
  text: an OpenAI CLIP or OpenCLIP state dict (text keys bare or under `text.`).
  skip: parameter paths ('visual.head') that start fresh whatever the files hold; the recipe's `config.init.skip`
    is the paper's choice (heads and logit scale fresh).
  Returns {path name: array} of the parameters the files give; the others are the caller's to initialise.
  """
  from eva_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top
  flat_targets = flatten(targets)
  out: dict[str, jax.Array] = {}
  for tower, source in (('visual', visual), ('text', text)):
    if not source:
      continue
    if not storage.exists(source):
      raise FileNotFoundError(f'{tower} init file not found: {source}')
    with torch_io.open_state_dict(source) as state:
      table = [e for e in _table_for(state, spec, None) if e.ours[0] == tower]
      present, _ = layouts.check_keys(state, table, allow_missing=True)
      if not present:
        raise InputError(f'{source} holds no {tower} tower parameters that fit {spec.name}')
      present = [e for e in present if not path_name(e.ours).replace('/', '.').startswith(skip)]
      out.update(_read_entries(state, present, spec, flat_targets, source, whole=False))
  return out


def init_towers(model: nnx.Module, *, visual: str | None = None, text: str | None = None,
                skip: tuple[str, ...]) -> dict[str, list[str]]:
  """`read_towers` into a model in place (on its first local device). Returns {'loaded': [...], 'fresh': [...]}
  parameter paths, for the training log."""
  loaded = read_towers(param_targets(model), model.spec, visual=visual, text=text, skip=skip)
  assign_params(model, unflatten(loaded), allow_missing=True)
  return {'loaded': sorted(loaded), 'fresh': sorted(set(flatten(model_params(model))) - set(loaded))}


def init_sources(init_config: Mapping[str, Any], model_name: str) -> tuple[str | None, str | None]:
  """A config's `init.visual` / `init.text` as files: released tags resolved to the hub cache, empty names None."""
  sources = []
  for tower in ('visual', 'text'):
    source = init_config.get(tower) or None
    source = resolve(source, model_name, purpose=tower) if source else None
    if source and not storage.exists(source):
      raise FileNotFoundError(f'config.init.{tower} = {source!r} is not a file. Download the checkpoint it names '
                              f'and pass its path: --config.init.{tower}=/path/to/{storage.basename(source)}.pt')
    sources.append(source)
  return tuple(sources)


def init_from_config(model: nnx.Module, init_config: Mapping[str, Any]) -> dict[str, list[str]]:
  """`init_towers` driven by a config's `init` block (`visual`, `text`, `skip`); empty names are skipped."""
  visual, text = init_sources(init_config, model.spec.name)
  return init_towers(model, visual=visual, text=text, skip=tuple(init_config.skip))

"""Checkpoint interop with PyTorch: both layouts, both directions, files, safety, initialisation, resizing."""

import os
import pickle
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_bige_spec, small_eva01_spec
from safetensors.torch import save_file

import eva_clip_jax as ec
from eva_clip_jax.conversion import api, model_params, torch_io
from eva_clip_jax.recipe import clip_recipe
from helpers import mim_state

SKIP_ON_INIT = tuple(clip_recipe(model='tiny', visual_lr=0, text_lr=0, visual_layer_decay=1, text_layer_decay=1,
                                 batch_size=1, samples_seen=1).init.skip)
from eva_clip_jax.conversion.torch_reference import (open_clip_model, randomize_, state_dict_numpy,
                                                     timm_vision_trunk, torch_features)

TOLERANCE = 1e-4


def eva_native_state_dict(open_clip_state, spec):
  """The EVA repository's key names for an open_clip state dict, written from the EVA source
  (eva_clip/eva_vit_model.py), independently of the converter's tables, plus junk RoPE buffers that a
  correct converter drops and recomputes."""
  swiglu = spec.vision.mlp == 'swiglu'
  out = {}
  for key, value in open_clip_state.items():
    if key.startswith('visual.trunk.'):
      key = 'visual.' + key[len('visual.trunk.'):]
      for old, new in (('.attn.q_proj.bias', '.attn.q_bias'), ('.attn.v_proj.bias', '.attn.v_bias'),
                       ('.attn.norm.', '.attn.inner_attn_ln.'), ('.mlp.norm.', '.mlp.ffn_ln.'),
                       ('.mlp.fc1_g.', '.mlp.w1.'), ('.mlp.fc1_x.', '.mlp.w2.')):
        key = key.replace(old, new)
      if swiglu:
        key = key.replace('.mlp.fc2.', '.mlp.w3.')
    out[key] = value
  if spec.vision.rope:
    n, hd = spec.vision.num_patches, spec.vision.head_dim
    out['visual.rope.freqs_cos'] = torch.zeros(n, hd)
    for i in range(spec.vision.depth):
      out[f'visual.blocks.{i}.attn.rope.freqs_sin'] = torch.zeros(n, hd)
  return out


def attention_inputs(spec, batch=2):
  size = spec.vision.image_size
  images = np.random.default_rng(5).normal(size=(batch, size, size, 3)).astype(np.float32)
  text = ec.get_tokenizer(context_length=spec.text.context_length)(['a cat on a mat', 'two dogs'][:batch])
  return images, text


def _assert_matches(model, reference_outputs, images, text):
  ref_image, ref_text, ref_logits = reference_outputs
  np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), ref_image, atol=TOLERANCE,
                             rtol=0)
  np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(text))), ref_text, atol=TOLERANCE, rtol=0)
  logits, _ = model.get_logits(jnp.asarray(images), jnp.asarray(text))
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=TOLERANCE, rtol=0)


def _specs():
  return [pytest.param(ec.get_model_spec('EVA02-CLIP-B-16'), id='B-16'),
          # L/14's widths, heads and MLP at two blocks a tower: the key tables are per block, so depth adds
          # nothing to check but CPU time (the full-size L/14's parameter count: tests/test_registry.py).
          pytest.param(ec.models.replace_spec(ec.get_model_spec('EVA02-CLIP-L-14'), name='l14-depth2',
                                              vision__depth=2, text__depth=2), id='L-14-depth2'),
          pytest.param(small_eva01_spec(), id='eva01-style'), pytest.param(small_bige_spec(), id='bigE-style')]


@pytest.mark.parametrize('spec', _specs())
def test_both_pytorch_layouts_convert_to_matching_models(spec, tmp_path):
  ref = open_clip_model(spec, seed=3)
  images, text = attention_inputs(spec)
  expected = torch_features(ref, images, text)
  state = ref.state_dict()
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'open_clip_model.safetensors'))
  # EVA's own files: DeepSpeed's {'module': ...} wrapper, some keys with a DDP prefix.
  eva = eva_native_state_dict(state, spec)
  eva = {('module.' + k if i % 3 == 0 else k): v for i, (k, v) in enumerate(eva.items())}
  torch.save({'module': eva, 'epoch': 7}, tmp_path / 'eva_native.pt')
  del ref, state, eva
  for name, layout in (('open_clip_model.safetensors', 'open_clip'), ('eva_native.pt', 'eva')):
    src = str(tmp_path / name)
    assert api.detect_layout(torch_io.load_state_dict(src)) == layout
    out = tmp_path / f'jax_{layout}'
    api.convert_file(src, str(out), spec)
    _assert_matches(ec.create_model(spec, pretrained=str(out)), expected, images, text)


@pytest.mark.parametrize('layout,suffix', [('eva', '.pt'), ('open_clip', '.bin'), ('open_clip', '.safetensors'),
                                           ('eva', '.safetensors')])
def test_jax_to_pytorch_to_jax_is_bit_exact(layout, suffix, tmp_path):
  model = ec.create_model('tiny', seed=11)
  path = str(tmp_path / f'exported{suffix}')
  api.export_file(model, path, 'tiny', layout)
  back = ec.create_model('tiny', seed=0, pretrained=path)
  for a, b in zip(jax_leaves(model), jax_leaves(back)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(model):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(model_params(model))]


@pytest.mark.parametrize('spec', [pytest.param(ec.get_model_spec('tiny'), id='tiny'),
                                  pytest.param(small_eva01_spec(), id='eva01-style')])
def test_exported_open_clip_state_dict_loads_strictly_and_reproduces(spec, tmp_path):
  model = ec.create_model(spec, seed=4)
  randomized = open_clip_model(spec, seed=9)  # a fresh open_clip model to load into
  path = str(tmp_path / 'open_clip_model.safetensors')
  api.export_file(model, path, spec, 'open_clip')
  from safetensors.torch import load_file
  randomized.load_state_dict(load_file(path), strict=True)
  images, text = attention_inputs(spec)
  _assert_matches(model, torch_features(randomized, images, text), images, text)


def test_exported_eva_file_has_the_references_keys(tmp_path):
  spec = ec.get_model_spec('tiny')
  path = str(tmp_path / 'eva.pt')
  api.export_file(ec.create_model(spec), path, spec, 'eva')
  state = torch.load(path, weights_only=True)
  ref_keys = set(eva_native_state_dict(open_clip_model(spec).state_dict(), spec))
  rope = {k for k in state if 'rope.freqs' in k}
  assert len(rope) == 2 * (spec.vision.depth + 1)
  assert set(state) - rope == ref_keys - {k for k in ref_keys if 'rope.freqs' in k}
  assert state['visual.blocks.0.attn.rope.freqs_cos'].shape == (spec.vision.num_patches, spec.vision.head_dim)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_16_bit_eva_file_converts(dtype, tmp_path):
  spec = ec.get_model_spec('tiny')
  state = eva_native_state_dict(open_clip_model(spec).state_dict(), spec)
  half = {k: v.to(dtype) for k, v in state.items()}
  torch.save({'state_dict': half}, tmp_path / 'half.pt')
  model = ec.create_model(spec, pretrained=str(tmp_path / 'half.pt'))
  kernel = np.asarray(model.visual.blocks.attn.q_proj.kernel[...])[0]
  expected = half['visual.blocks.0.attn.q_proj.weight'].float().numpy().T
  np.testing.assert_array_equal(kernel, expected)


def test_malicious_pickle_is_refused_without_running(tmp_path):
  marker = tmp_path / 'pwned'

  class Payload:

    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'evil.pt'
  with open(path, 'wb') as f:
    pickle.dump({'state_dict': {'visual.cls_token': Payload()}}, f)
  with pytest.raises(ValueError, match='refusing to load'):
    ec.create_model('tiny', pretrained=str(path))
  assert not marker.exists()


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
  spec = ec.get_model_spec('tiny')
  state = open_clip_model(spec).state_dict()
  broken = dict(state)
  del broken['visual.trunk.norm.weight']
  broken['visual.trunk.extra.weight'] = torch.zeros(3)
  torch.save(broken, tmp_path / 'broken.pt')
  with pytest.raises(ValueError, match=r'missing 1 keys: visual\.trunk\.norm\.weight'):
    ec.create_model(spec, pretrained=str(tmp_path / 'broken.pt'))
  del broken['visual.trunk.extra.weight']
  torch.save(broken, tmp_path / 'missing.pt')
  model = ec.models.create_model(spec)
  fresh = np.asarray(model.visual.norm.scale[...])
  api.load_pretrained(model, str(tmp_path / 'missing.pt'), allow_missing=True)
  np.testing.assert_array_equal(np.asarray(model.visual.norm.scale[...]), fresh)  # kept
  np.testing.assert_array_equal(np.asarray(model.visual.norm.bias[...]),
                                state['visual.trunk.norm.bias'].numpy())  # loaded
  shaped = dict(state)
  shaped['text.ln_final.weight'] = torch.zeros(7)
  torch.save(shaped, tmp_path / 'shaped.pt')
  with pytest.raises(ValueError, match=r'wrong shape \(1\): text/ln_final/scale: expected \(64,\), got \(7,\)'):
    ec.create_model(spec, pretrained=str(tmp_path / 'shaped.pt'))
  wrong_model = ec.models.replace_spec(spec, text__depth=3)
  with pytest.raises(ValueError, match='missing 13 keys'):
    ec.create_model(wrong_model, pretrained=str(tmp_path / 'missing.pt'))


@pytest.mark.parametrize('name', ['out.pt', 'out.safetensors'])
def test_failed_export_leaves_no_file(name, tmp_path, monkeypatch):
  made = torch_io._made  # pylint: disable=protected-access
  calls = []

  def failing_midway(*args):  # the file is half written, tensor by tensor, when the disk fills up
    calls.append(1)
    if len(calls) == 5:
      raise OSError('disk full')
    return made(*args)

  monkeypatch.setattr(torch_io, '_made', failing_midway)
  with pytest.raises(OSError, match='disk full'):
    api.export_file(ec.create_model('tiny'), str(tmp_path / name), 'tiny', 'eva')
  assert list(tmp_path.iterdir()) == []


def test_failed_conversion_leaves_no_directory(tmp_path, monkeypatch):
  from eva_clip_jax.conversion import orbax_io
  model = ec.create_model('tiny')
  write_text = orbax_io.storage.write_text

  def interrupted_marker(path, text):  # the arrays are written; the run dies before model.json marks them complete
    if path.endswith('model.json'):
      raise OSError('interrupted')
    write_text(path, text)

  # Not json.dumps: orbax's own background threads call it too, and a failure there races our clean-up.
  monkeypatch.setattr(orbax_io.storage, 'write_text', interrupted_marker)
  with pytest.raises(OSError, match='interrupted'):
    orbax_io.save_params(model_params(model), str(tmp_path / 'out'), model_name='tiny')
  assert list(tmp_path.iterdir()) == []


def test_mim_checkpoint_initialises_a_patch16_tower(tmp_path):
  spec = ec.models.replace_spec(ec.get_model_spec('tiny'), name='b16-shaped', vision__image_size=224,
                                vision__patch_size=16)
  mim = mim_state(patch=14, image_size=224)  # a 16x16 grid of 14px patches, as EVA02_B_psz14
  mim['lm_head.weight'] = torch.zeros(3, 3)  # MIM extras are ignored
  torch.save(mim, tmp_path / 'mim.pt')
  model = ec.models.create_model(spec)
  fresh_head = np.asarray(model.visual.head.kernel[...])
  report = api.init_towers(model, visual=str(tmp_path / 'mim.pt'), skip=SKIP_ON_INIT)
  kernel = np.asarray(model.visual.patch_embed.kernel[...])
  assert kernel.shape == (16, 16, 3, 64)
  expected = F.interpolate(mim['patch_embed.proj.weight'], size=(16, 16), mode='bicubic',
                           align_corners=False).numpy().transpose(2, 3, 1, 0)
  np.testing.assert_allclose(kernel, expected, atol=1e-5)
  pos = mim['pos_embed'][:, 1:].reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
  pos = F.interpolate(pos, size=(14, 14), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 196,
                                                                                                          64)
  np.testing.assert_allclose(np.asarray(model.visual.pos_embed[...])[:, 1:], pos.numpy(), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(model.visual.pos_embed[...])[:, 0], mim['pos_embed'][:, 0].numpy())
  np.testing.assert_array_equal(np.asarray(model.visual.head.kernel[...]), fresh_head)  # skipped: fresh
  assert 'visual/blocks/attn/inner_attn_ln/scale' in report['fresh']
  assert 'visual/blocks/mlp/w1/kernel' in report['loaded'] and 'visual/head/kernel' in report['fresh']
  assert not any(path.startswith('text/') for path in report['loaded'])
  assert np.isfinite(np.asarray(model.encode_image(jnp.zeros((1, 224, 224, 3))))).all()


def test_text_tower_from_an_openai_layout_clip(tmp_path):
  import open_clip
  spec = ec.get_model_spec('tiny')
  t = spec.text
  clip = open_clip.CLIP(32, dict(image_size=32, layers=1, width=64, patch_size=16),
                        dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                             heads=t.num_heads, layers=t.depth))
  randomize_(clip, seed=6)
  torch.save(clip.state_dict(), tmp_path / 'clip.pt')  # OpenAI layout: text keys at the top level
  model = ec.models.create_model(spec)
  fresh_projection = np.asarray(model.text.text_projection[...])
  report = api.init_towers(model, text=str(tmp_path / 'clip.pt'), skip=SKIP_ON_INIT)
  np.testing.assert_array_equal(np.asarray(model.text.blocks.mlp.c_fc.kernel[...])[1],
                                clip.state_dict()['transformer.resblocks.1.mlp.c_fc.weight'].numpy().T)
  np.testing.assert_array_equal(np.asarray(model.text.text_projection[...]), fresh_projection)
  assert all(path.startswith('text/') for path in report['loaded'])


def test_224_checkpoint_runs_in_the_336_model(tmp_path):
  small = ec.models.replace_spec(ec.get_model_spec('tiny'), name='l14-224', vision__image_size=56,
                                 vision__patch_size=14)
  large = ec.models.replace_spec(small, name='l14-336', vision__image_size=84)
  ref = open_clip_model(small)
  torch.save(ref.state_dict(), tmp_path / 'l14_224.pt')
  model = ec.create_model(large, pretrained=str(tmp_path / 'l14_224.pt'))
  pos = ref.visual.trunk.pos_embed.detach()[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
  pos = F.interpolate(pos, size=(6, 6), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 64)
  np.testing.assert_allclose(np.asarray(model.visual.pos_embed[...])[:, 1:], pos.numpy(), atol=1e-5)
  out = model.encode_image(jnp.asarray(np.random.default_rng(0).normal(size=(2, 84, 84, 3)), jnp.float32))
  assert out.shape == (2, 64) and np.isfinite(np.asarray(out)).all()


def test_hub_ids_fail_clearly_without_network(monkeypatch):
  import huggingface_hub
  # The flag is read when huggingface_hub is imported (open_clip may have imported it already): set both.
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  with pytest.raises(OSError, match='could not fetch hf-hub:timm/EVA02-B-16'):
    ec.create_model('tiny', pretrained='hf-hub:timm/EVA02-B-16')


def test_missing_file_and_wrong_model_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint file'):
    ec.create_model('tiny', pretrained=str(tmp_path / 'nope.pt'))
  from eva_clip_jax.conversion import orbax_io
  orbax_io.save_params(model_params(ec.create_model('tiny')), str(tmp_path / 'tiny_dir'), model_name='tiny')
  with pytest.raises(ValueError, match='holds tiny parameters, not EVA02-CLIP-B-16'):
    api.read_params(str(tmp_path / 'tiny_dir'), ec.get_model_spec('EVA02-CLIP-B-16'))


def test_command_line_both_ways(tmp_path):
  spec = ec.get_model_spec('tiny')
  ref = open_clip_model(spec, seed=8)
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / 'in.safetensors'))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'eva_clip_jax.convert', '--model=tiny', *args],
                                     check=True, capture_output=True, text=True, env=env)
  run(f'--src={tmp_path}/in.safetensors', f'--dst={tmp_path}/jax')
  run(f'--src={tmp_path}/jax', f'--dst={tmp_path}/out.pt', '--layout=eva')
  back = torch.load(tmp_path / 'out.pt', weights_only=True)
  np.testing.assert_array_equal(back['visual.blocks.1.mlp.w1.weight'].numpy(),
                                ref.state_dict()['visual.trunk.blocks.1.mlp.fc1_g.weight'].numpy())
  failed = subprocess.run([sys.executable, '-m', 'eva_clip_jax.convert', '--model=tiny', f'--src={tmp_path}/jax',
                           f'--dst={tmp_path}/out.pt', '--layout=eva'], capture_output=True, text=True, env=env)
  assert failed.returncode != 0 and 'exists' in failed.stderr


def test_config_init_block_drives_tower_init(tmp_path):
  from ml_collections import config_flags  # noqa: F401  (configs are ml_collections)
  import importlib.util
  spec_file = importlib.util.spec_from_file_location('b16', os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                                         'b16.py'))
  module = importlib.util.module_from_spec(spec_file)
  spec_file.loader.exec_module(module)
  config = module.get_config()
  model = ec.models.create_model('tiny')
  with pytest.raises(ValueError, match='tag of tiny .it is a tag of EVA02-CLIP-B-16'):  # B/16's MIM tag
    api.init_from_config(model, config.init)
  config.init.visual = 'mim/EVA02_B_psz14to16.pt'
  with pytest.raises(FileNotFoundError, match='--config.init.visual=/path/to/EVA02_B_psz14to16'):
    api.init_from_config(model, config.init)
  torch.save(mim_state(patch=8, image_size=64), tmp_path / 'mim.pt')
  config.init.visual, config.init.text = str(tmp_path / 'mim.pt'), ''
  report = api.init_from_config(model, config.init)
  assert 'visual/blocks/norm1/scale' in report['loaded'] and 'logit_scale' in report['fresh']


def test_eva01_giant_style_tower_initialises_the_eva01_model(tmp_path):
  """An EVA-01 MIM/CLIP vision checkpoint (fused qkv with q/v biases, GELU MLP), bare keys as timm stores it."""
  spec = small_eva01_spec()
  trunk = timm_vision_trunk(spec)
  randomize_(trunk, seed=12)
  state = {k: v for k, v in trunk.state_dict().items() if not k.startswith('head.')}
  state['rel_pos_bias.relative_position_bias_table'] = torch.zeros(3, 2)  # EVA-01 MIM extras are ignored
  torch.save({'model': state}, tmp_path / 'eva01_g.pt')
  model = ec.models.create_model(spec)
  report = api.init_towers(model, visual=str(tmp_path / 'eva01_g.pt'), skip=SKIP_ON_INIT)
  np.testing.assert_array_equal(np.asarray(model.visual.blocks.attn.qkv.kernel[...])[1],
                                state['blocks.1.attn.qkv.weight'].numpy().T)
  np.testing.assert_array_equal(np.asarray(model.visual.blocks.attn.v_bias[...])[0],
                                state['blocks.0.attn.v_bias'].numpy())
  assert 'visual/blocks/mlp/fc2/kernel' in report['loaded'] and 'visual/head/kernel' in report['fresh']

r"""Convert EVA-CLIP checkpoints between PyTorch and JAX.

PyTorch -> JAX (the EVA or open_clip layout is detected; wrappers, `module.` prefixes and RoPE buffers are
handled; 16-bit files are read as float32):

  python -m eva_clip_jax.convert --model=EVA02-CLIP-B-16 --src=EVA02_CLIP_B_psz16_s8B.pt --dst=ckpt/b16
  python -m eva_clip_jax.convert --model=EVA02-CLIP-B-16 --src=open_clip_model.safetensors --dst=ckpt/b16

JAX -> PyTorch (from a converted directory or a training checkpoint's parameters):

  python -m eva_clip_jax.convert --model=EVA02-CLIP-B-16 --src=ckpt/b16 --dst=b16.pt --layout=eva
  python -m eva_clip_jax.convert --model=EVA02-CLIP-B-16 --src=ckpt/b16 --dst=open_clip_model.safetensors \
      --layout=open_clip

Outputs appear only when complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

from absl import app, flags

from eva_clip_jax import cli, storage
from eva_clip_jax.conversion import api
from eva_clip_jax.conversion.orbax_io import is_params_dir

_MODEL = flags.DEFINE_string('model', None, 'model name (see eva_clip_jax.list_models())', required=True)
_SRC = flags.DEFINE_string('src', None, 'PyTorch file, hf-hub:org/repo, or a converted JAX directory',
                           required=True)
_DST = flags.DEFINE_string('dst', None, 'output: a directory (to JAX) or a .pt/.bin/.safetensors file (to PyTorch)',
                           required=True)
_LAYOUT = flags.DEFINE_enum('layout', None, ['eva', 'open_clip'],
                            'to PyTorch: the layout to write; to JAX: insist on this layout (default: detect)')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'float16', 'bfloat16'], 'to PyTorch: tensor dtype')
_ALLOW_MISSING = flags.DEFINE_bool('allow_missing', False, 'to JAX: keep fresh values for keys the file lacks')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace an existing output')


def main(argv):
  del argv
  src, dst = _SRC.value, _DST.value
  if is_params_dir(src):
    if not _LAYOUT.value:
      raise app.UsageError('converting to PyTorch needs --layout=eva or --layout=open_clip')
    if storage.exists(dst) and not _OVERWRITE.value:
      raise app.UsageError(f'{dst} exists; pass --overwrite to replace it')
    api.export_file(src, dst, _MODEL.value, _LAYOUT.value, dtype=_DTYPE.value)
    print(f'wrote {dst} ({_LAYOUT.value} layout, {_DTYPE.value})')
  else:
    api.convert_file(src, dst, _MODEL.value, layout=_LAYOUT.value, allow_missing=_ALLOW_MISSING.value,
                     overwrite=_OVERWRITE.value)
    print(f'wrote {dst} (load it with create_model({_MODEL.value!r}, pretrained={dst!r}))')


if __name__ == '__main__':
  cli.run(main)

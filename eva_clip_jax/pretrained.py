"""The released EVA-CLIP checkpoints by name, and their download through the Hugging Face Hub's cache.

  list_pretrained()                       [('EVA02-CLIP-B-16', 'merged2b_s8b_b131k'), ...]  (open_clip's convention)
  create_model('EVA02-CLIP-L-14', pretrained='merged2b_s4b_b131k')   resolves, downloads once, converts

Two tags name each released model: open_clip's (timm's repository on the hub, open_clip's layout) and the EVA
repository's file name (`QuanSun/EVA-CLIP`, EVA's layout, with or without `.pt`). The EVA MIM files are tagged for
the image-tower initialisation only (`config.init.visual`).

Downloads go through `huggingface_hub.hf_hub_download`, so its cache, `HF_HOME` / `HF_HUB_CACHE`, `HF_ENDPOINT`
and `HF_HUB_OFFLINE` behave as for every other hub library (read here at call time, so setting them in a notebook
works). What huggingface_hub 2.4 checks by itself: the byte count against the hub's X-Linked-Size /
Content-Length, with the file downloaded to a process-unique temporary name and renamed into the cache only when
complete (a dropped connection is resumed with a Range request within the call). What it does not: the content.
For LFS files the hub's etag is the file's sha256 (the blob's name in the cache), so a fresh download is hashed
here and removed from the cache when it does not match. A file already in the cache is used without contacting
the hub.

Nothing here imports torch: the downloaded file is read by `conversion/` (tensors only, never unpickled code).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import os
import re
from typing import Literal

from eva_clip_jax.errors import InputError, MissingDependency
from eva_clip_jax.models.registry import get_model_spec

EVA_REPO = 'QuanSun/EVA-CLIP'
OPEN_CLIP_FILE = 'open_clip_pytorch_model.bin'
_SHA256 = re.compile(r'[0-9a-f]{64}')


class PretrainedUnavailable(OSError):
  """A known checkpoint that could not be fetched (offline, unreachable, or a corrupted download)."""


class CorruptedDownload(PretrainedUnavailable):
  """A download whose content does not hash to the hub's sha256 (removed from the cache)."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """One released checkpoint as `model` loads it.

  kind: 'clip' (the whole two-tower model) or 'mim' (an EVA MIM image tower, for `init.visual`).
  layout: the file's parameter naming ('eva' or 'open_clip'); `conversion/` also detects it from the keys.
  sha256: pin the content (otherwise the hub's LFS etag is the reference).
  """
  model: str
  tag: str
  repo: str
  filename: str
  kind: Literal['clip', 'mim'] = 'clip'
  layout: Literal['eva', 'open_clip'] = 'eva'
  revision: str = 'main'
  sha256: str | None = None

  @property
  def url(self) -> str:
    endpoint = (os.environ.get('HF_ENDPOINT') or 'https://huggingface.co').rstrip('/')
    return f'{endpoint}/{self.repo}/resolve/{self.revision}/{self.filename}'


_TABLE: dict[tuple[str, str], Pretrained] = {}


def register_pretrained(entry: Pretrained) -> None:
  """Adds (or replaces) a checkpoint under (entry.model, entry.tag); the model must be registered."""
  model = get_model_spec(entry.model).name
  _TABLE[(model, entry.tag)] = dataclasses.replace(entry, model=model)


def _file_stem(name: str) -> str:
  return name.removesuffix('.pt').removesuffix('.bin')


def _eva(model: str, filename: str, kind: str = 'clip', repo: str = EVA_REPO) -> Pretrained:
  return Pretrained(model, _file_stem(filename), repo, filename, kind=kind, layout='eva')


def _timm(model: str, tag: str, timm_name: str) -> Pretrained:
  return Pretrained(model, tag, f'timm/{timm_name}.{tag}', OPEN_CLIP_FILE, layout='open_clip')


# open_clip 3.3's tags and timm repositories (open_clip/pretrained.py), and the EVA repository's files they came from.
for _entry in (
    _timm('EVA01-CLIP-g-14', 'laion400m_s11b_b41k', 'eva_giant_patch14_clip_224'),
    _eva('EVA01-CLIP-g-14', 'EVA01_CLIP_g_14_psz14_s11B.pt'),
    _timm('EVA01-CLIP-g-14-plus', 'merged2b_s11b_b114k', 'eva_giant_patch14_plus_clip_224'),
    _eva('EVA01-CLIP-g-14-plus', 'EVA01_CLIP_g_14_plus_psz14_s11B.pt'),
    _timm('EVA02-CLIP-B-16', 'merged2b_s8b_b131k', 'eva02_base_patch16_clip_224'),
    _eva('EVA02-CLIP-B-16', 'EVA02_CLIP_B_psz16_s8B.pt'),
    _timm('EVA02-CLIP-L-14', 'merged2b_s4b_b131k', 'eva02_large_patch14_clip_224'),
    _eva('EVA02-CLIP-L-14', 'EVA02_CLIP_L_psz14_s4B.pt'),
    _timm('EVA02-CLIP-L-14-336', 'merged2b_s6b_b61k', 'eva02_large_patch14_clip_336'),
    _eva('EVA02-CLIP-L-14-336', 'EVA02_CLIP_L_336_psz14_s6B.pt'),
    _timm('EVA02-CLIP-bigE-14', 'laion2b_s4b_b115k', 'eva02_enormous_patch14_clip_224'),
    _eva('EVA02-CLIP-bigE-14', 'EVA02_CLIP_E_psz14_s4B.pt'),
    _timm('EVA02-CLIP-bigE-14-plus', 'laion2b_s9b_b144k', 'eva02_enormous_patch14_plus_clip_224'),
    _eva('EVA02-CLIP-bigE-14-plus', 'EVA02_CLIP_E_psz14_plus_s9B.pt'),
    # MIM image towers, the paper's initialisation (B/16 from the patch-14 MIM model, resized on load).
    _eva('EVA02-CLIP-B-16', 'EVA02_B_psz14to16.pt', 'mim'),
    _eva('EVA02-CLIP-L-14', 'EVA02_L_psz14.pt', 'mim'),
    _eva('EVA02-CLIP-L-14-336', 'EVA02_L_psz14.pt', 'mim'),
    _eva('EVA02-CLIP-bigE-14', 'EVA02_E_psz14.pt', 'mim'),
    _eva('EVA02-CLIP-bigE-14-plus', 'EVA02_E_psz14.pt', 'mim'),
    _eva('EVA01-CLIP-g-14', 'EVA01_g_psz14.pt', 'mim'),
    _eva('EVA01-CLIP-g-14-plus', 'EVA01_g_psz14.pt', 'mim'),
    # EVA-CLIP-8B / 8B-448 / 18B (EVA-CLIP-18B/README.md): BAAI's own hub repositories, EVA's layout; open_clip has no
    # tags for them. 18B's files are float16.
    _eva('EVA-CLIP-8B', 'EVA_CLIP_8B_psz14_s9B.pt', repo='BAAI/EVA-CLIP-8B'),
    _eva('EVA-CLIP-8B-plus', 'EVA_CLIP_8B_psz14_plus_s0.6B.pt', repo='BAAI/EVA-CLIP-8B-448'),
    _eva('EVA-CLIP-18B', 'EVA_CLIP_18B_psz14_s6B.fp16.pt', repo='BAAI/EVA-CLIP-18B'),
    _eva('EVA-CLIP-8B', 'EVA_8B_psz14.bin', 'mim', repo='BAAI/EVA-CLIP-8B'),
    _eva('EVA-CLIP-18B', 'EVA_18B_psz14.fp16.bin', 'mim', repo='BAAI/EVA-CLIP-18B'),
):
  register_pretrained(_entry)


def list_pretrained(kind: str | None = 'clip') -> list[tuple[str, str]]:
  """(model, tag) pairs, as open_clip's `list_pretrained()`; kind='mim' for the image-tower files, None for all."""
  return [key for key, entry in _TABLE.items() if kind is None or entry.kind == kind]


def get_pretrained(model: str, tag: str) -> Pretrained | None:
  """The entry for `tag` (or the EVA file name it stands for, '.pt' or '.bin' included) of `model`, else None."""
  model = get_model_spec(model).name
  entry = _TABLE.get((model, tag))
  if entry is None and tag.endswith(('.pt', '.bin')):
    entry = _TABLE.get((model, _file_stem(tag)))
  return entry



def _looks_like_tag(source: str) -> bool:
  """A bare name with no directory part and no file suffix other than .pt, or a known tag (some hold dots:
  `EVA_CLIP_8B_psz14_plus_s0.6B`, `EVA_CLIP_18B_psz14_s6B.fp16`): a tag, not a path."""
  if os.sep in source or '/' in source:
    return False
  known = {tag for _, tag in _TABLE}
  return _file_stem(source) in known or os.path.splitext(source)[1] in ('', '.pt')


def _unknown_tag(model: str, tag: str, purpose: str) -> InputError:
  kinds = ('mim', 'clip') if purpose == 'visual' else ('clip',)
  ours = [t for (m, t), e in _TABLE.items() if m == model and e.kind in kinds]
  elsewhere = sorted({m for (m, t), e in _TABLE.items() if t in (tag, _file_stem(tag)) and m != model})
  if elsewhere:
    hint = f'it is a tag of {", ".join(elsewhere)}'
  else:
    close = difflib.get_close_matches(tag, [t for _, t in _TABLE], n=3, cutoff=0.5)
    hint = f'close matches: {", ".join(close)}' if close else 'no close match'
  return InputError(f'{tag!r} is neither a file nor a known pretrained tag of {model} ({hint}); its tags: '
                    f'{", ".join(ours) or "none"} (eva_clip_jax.list_pretrained() lists them all)')


def resolve(source: str, model: str, *, purpose: Literal['model', 'visual', 'text'] = 'model') -> str:
  """A local path for `source`: a known tag (downloaded once), 'hf-hub:org/repo', or a path (returned unchanged).

  purpose: 'model' (the whole model: CLIP tags), 'visual' (image-tower initialisation: CLIP or MIM tags), 'text'.
  Raises ValueError for an unknown tag (naming the close matches) and PretrainedUnavailable when a known file cannot
  be fetched (naming the file, where to download it and where to put it).
  """
  if source.startswith('hf-hub:'):
    return _hf_hub_model(source[len('hf-hub:'):])
  if '://' in source or os.path.exists(source) or not _looks_like_tag(source):
    return source
  try:
    model = get_model_spec(model).name
  except ValueError:
    raise InputError(f'{source!r} is not a file, and {model} (not a registered model) has no released tags') from None
  entry = get_pretrained(model, source)
  if entry is None and source.endswith(('.pt', '.bin')):
    return source  # a file name that is not a released one: the loader says the file is missing
  if entry is None:
    raise _unknown_tag(model, source, purpose)
  if entry.kind == 'mim' and purpose != 'visual':
    raise InputError(f'{source!r} is an EVA MIM image tower, not a whole CLIP model: use it as the image-tower '
                     f'initialisation (--config.init.visual={source}); CLIP tags of {model}: '
                     + ', '.join(t for (m, t), e in _TABLE.items() if m == model and e.kind == 'clip'))
  return download(entry)


# --- the hub -------------------------------------------------------------------------------------------------------


def _hub():
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependency('downloading released weights needs huggingface_hub: pip install -r requirements.txt') from e
  return huggingface_hub


def _settings() -> dict:
  """The hub's environment, read now rather than when huggingface_hub was imported."""
  env = os.environ
  cache = env.get('HF_HUB_CACHE') or (os.path.join(env['HF_HOME'], 'hub') if env.get('HF_HOME') else None)
  offline = (env.get('HF_HUB_OFFLINE') or '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')
  return dict(cache_dir=cache and os.path.expanduser(cache), endpoint=env.get('HF_ENDPOINT') or None,
              offline=offline)


def _cache_dir(settings: dict) -> str:
  return settings['cache_dir'] or _hub().constants.HF_HUB_CACHE


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__


def _fetch(repo: str, filename: str, revision: str = 'main', sha256: str | None = None) -> str:
  """The cached file, else a download; raises PretrainedUnavailable (offline) or the hub's own error."""
  hub, settings = _hub(), _settings()
  cached = hub.try_to_load_from_cache(repo, filename, cache_dir=settings['cache_dir'], revision=revision)
  if isinstance(cached, str) and os.path.isfile(cached):
    return cached
  if settings['offline']:
    raise PretrainedUnavailable('HF_HUB_OFFLINE is set')
  path = hub.hf_hub_download(repo, filename, revision=revision, cache_dir=settings['cache_dir'],
                             endpoint=settings['endpoint'])
  _verify_download(path, repo, filename, revision, sha256)
  return path


def download(entry: Pretrained) -> str:
  """The local path of `entry`'s file, downloaded into the hub cache on first use and checked."""
  try:
    return _fetch(entry.repo, entry.filename, entry.revision, entry.sha256)
  except CorruptedDownload:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any hub or network failure: one line that says what to do
    reason = str(e) if isinstance(e, PretrainedUnavailable) else _first_line(e)
  raise PretrainedUnavailable(
      f'{entry.model} {entry.tag!r} needs {entry.repo}/{entry.filename}, which is not in the Hugging Face cache '
      f'({_cache_dir(_settings())}) and could not be downloaded ({reason}): download {entry.url} where the hub is '
      f'reachable and pass the file itself (pretrained=/path/to/{entry.filename}), or copy that machine\'s hub cache '
      'here (HF_HOME)')


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def _verify_download(path: str, repo: str, filename: str, revision: str, expected: str | None = None) -> None:
  """Hashes a fresh download against the hub's sha256 etag (the blob's name); removes it from the cache if wrong."""
  blob = os.path.realpath(path)
  if expected is None:
    etag = os.path.basename(blob)
    if not _SHA256.fullmatch(etag):  # no symlinks in this cache (the blob was moved): ask the hub for the etag
      hub = _hub()
      meta = hub.get_hf_file_metadata(hub.hf_hub_url(repo, filename, revision=revision,
                                                     endpoint=_settings()['endpoint']))
      etag = meta.etag or ''
    if not _SHA256.fullmatch(etag):
      logging.warning('%s/%s is not an LFS file: its size was checked, not its hash', repo, filename)
      return
    expected = etag
  actual = _sha256(blob)
  if actual != expected:
    for stale in {path, blob}:
      if os.path.lexists(stale):
        os.remove(stale)
    raise CorruptedDownload(f'the download of {repo}/{filename} is corrupted (sha256 {actual[:12]}..., the hub '
                                f'says {expected[:12]}...); it was removed from the cache: try again')


def _hf_hub_model(repo: str) -> str:
  """An open_clip-layout model repository ('hf-hub:org/repo'): its safetensors file, else its .bin."""
  errors = []
  for filename in ('open_clip_model.safetensors', OPEN_CLIP_FILE):
    try:
      return _fetch(repo, filename)
    except CorruptedDownload:
      raise
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f'{filename}: {_first_line(e)}')
  raise PretrainedUnavailable(f'could not fetch hf-hub:{repo} (no network, or no such repository?): download its '
                              f'{OPEN_CLIP_FILE} where the hub is reachable and pass the local path instead. '
                              + ' | '.join(errors))

"""The grain input pipeline over webdataset shards, the shard writer and the demo set."""

import hashlib
import io
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from eva_clip_jax import data, transforms
from eva_clip_jax.data import decode, demo, pipeline
from eva_clip_jax.data.pipeline import SKIP_REASONS
from eva_clip_jax.errors import InputError
from eva_clip_jax.tokenizer import tokenize
from helpers import random_jpeg, write_shards


def _collect(ds, limit=None):
  it = iter(ds)
  try:
    batches = []
    for batch in it:
      batches.append(batch)
      if limit and len(batches) == limit:
        break
    return batches, it
  finally:
    if limit is None and hasattr(it, 'close'):
      it.close()


def test_brace_patterns_and_missing_paths(tmp_path):
  assert data.expand_braces('d/{00008..00011}.tar') == [f'd/{i:05d}.tar' for i in range(8, 12)]
  write_shards(tmp_path, 6, 2)
  assert len(data.list_shards(f'{tmp_path}/{{00000..00002}}.tar')) == 3
  assert len(data.list_shards(str(tmp_path))) == 3 and len(data.list_shards(f'{tmp_path}/*.tar')) == 3
  with pytest.raises(FileNotFoundError, match='no shard matches'):
    data.make_dataset(f'{tmp_path}/nope-{{0..3}}.tar', batch_size=2, image_size=16)


def test_eval_pass_reads_every_sample_once_in_order(tmp_path):
  write_shards(tmp_path, 10, 4)
  batches, _ = _collect(data.make_dataset(str(tmp_path), batch_size=4, image_size=16, context_length=16,
                                          is_train=False))
  assert [b['image'].shape for b in batches] == [(4, 16, 16, 3), (4, 16, 16, 3), (2, 16, 16, 3)]
  assert batches[0]['image'].dtype == np.float32 and batches[0]['text'].dtype == np.int32
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(10))
  np.testing.assert_array_equal(batches[0]['text'][3], tokenize(['caption number 3'], 16)[0])


def test_training_batches_resume_exactly(tmp_path):
  write_shards(tmp_path, 40, 5)
  ds = data.make_dataset(str(tmp_path), batch_size=4, image_size=16, context_length=16, seed=3, shuffle_buffer=8)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(12)]  # crosses an epoch boundary (40 samples = 10 batches)
  resumed = iter(ds)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(12)]):
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['image'], b['image'])  # same random crops too
  labels = np.concatenate([b['label'] for b in expected[:7]])
  assert sorted(labels.tolist()) != labels.tolist()  # shuffled


def test_resume_with_worker_processes(tmp_path):
  write_shards(tmp_path, 24, 3)
  ds = data.make_dataset(str(tmp_path), batch_size=4, image_size=16, context_length=16, seed=1, shuffle_buffer=4,
                         num_workers=2)
  it = iter(ds)
  first = [next(it)['label'] for _ in range(2)]
  state = it.get_state()
  expected = [next(it)['label'] for _ in range(4)]
  it.close()
  resumed = iter(ds)
  resumed.set_state(state)
  got = [next(resumed)['label'] for _ in range(4)]
  resumed.close()
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  assert len(np.unique(np.concatenate(first + expected))) > 8


def test_two_hosts_read_disjoint_shares_that_cover_the_data(tmp_path):
  write_shards(tmp_path, 30, 5)
  seen = []
  for host in range(2):
    batches, _ = _collect(data.make_dataset(str(tmp_path), batch_size=5, image_size=16, is_train=False,
                                            process_index=host, process_count=2))
    seen.append(set(np.concatenate([b['label'] for b in batches]).tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(30))
  with pytest.raises(ValueError, match='fewer than the 8 processes'):
    data.make_dataset(str(tmp_path), batch_size=2, image_size=16, process_index=0, process_count=8)


def test_epochs_reshuffle_shard_order(tmp_path):
  write_shards(tmp_path, 24, 2)
  ds = data.make_dataset(str(tmp_path), batch_size=2, image_size=16, seed=5, shuffle_buffer=1, cycle_length=1,
                         num_epochs=2)
  batches, _ = _collect(ds)
  labels = np.concatenate([b['label'] for b in batches])
  first, second = labels[:24], labels[24:]
  assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(24))
  assert first.tolist() != second.tolist()
  again, _ = _collect(data.make_dataset(str(tmp_path), batch_size=2, image_size=16, seed=5, shuffle_buffer=1,
                                        cycle_length=1, num_epochs=2))
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in again]), labels)  # seeded


def test_bad_samples_are_skipped_and_counted(tmp_path):
  good = tmp_path / 'good'
  write_shards(good, 6, 6)
  bad = tmp_path / 'bad'
  with data.ShardWriter(str(bad), 100) as writer:
    writer.write('000100', random_jpeg(100), 'jpg', 'fine', label=100)
    writer.write('000101', random_jpeg(101)[:200], 'jpg', 'a corrupt jpeg', label=101)
    writer.write('000102', random_jpeg(102), 'jpg', '   ', label=102)
    writer.write('000103', b'not an image at all', 'jpg', 'garbage bytes', label=103)
    writer.write('000104', random_jpeg(104), 'jpg', 'fine too', label=104)
  # A caption that is not UTF-8, and a sample without an image.
  with tarfile.open(bad / '00001.tar', 'w') as tar:
    for name, payload in (('000105.jpg', random_jpeg(105)), ('000105.txt', b'\xff\xfe caption'),
                          ('000106.txt', b'no image'), ('000107.jpg', random_jpeg(107)), ('000107.txt', b'ok'),
                          ('000107.cls', b'107')):
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  # A truncated tar: its first two samples survive.
  write_shards(tmp_path / 'src', 4, 4, start=200)
  raw = (tmp_path / 'src' / '00000.tar').read_bytes()
  (bad / '00002.tar').write_bytes(raw[:len(raw) // 2 + 700])
  ds = data.make_dataset([str(good), str(bad)], batch_size=2, image_size=16, is_train=False)
  batches, _ = _collect(ds)
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.sum() == len(valid) - 1  # one placeholder carries the skips at the very end of the pass
  labels = sorted(np.concatenate([b['label'] for b in batches])[valid].tolist())
  skipped = sum(data.skipped_counts(b)[f'skipped/{r}'] for b in batches for r in SKIP_REASONS)
  counts = {r: sum(data.skipped_counts(b)[f'skipped/{r}'] for b in batches) for r in SKIP_REASONS}
  assert labels[:6] == list(range(6)) and {100, 104, 107, 200} <= set(labels) and -1 not in labels
  assert not {101, 102, 103, 105} & set(labels)
  assert counts['bad_image'] == 2 and counts['empty_caption'] == 1 and counts['bad_caption'] == 1
  assert counts['missing_image'] == 1 and counts['corrupt_tar'] == 1
  assert skipped == 6


def test_mixture_follows_the_weights(tmp_path):
  write_shards(tmp_path / 'a', 40, 10, start=0)
  write_shards(tmp_path / 'b', 40, 10, start=1000)
  ds = data.make_dataset([(str(tmp_path / 'a'), 0.8), (str(tmp_path / 'b'), 0.2)], batch_size=10, image_size=16,
                         shuffle_buffer=4)
  batches, it = _collect(ds, limit=20)
  it.close() if hasattr(it, 'close') else None
  labels = np.concatenate([b['label'] for b in batches])
  share = float(np.mean(labels < 1000))
  assert 0.7 < share < 0.9


def test_writer_from_folder_and_csv(tmp_path):
  src = tmp_path / 'photos'
  src.mkdir()
  for i in range(3):
    (src / f'p{i}.jpg').write_bytes(random_jpeg(i))
    (src / f'p{i}.txt').write_text(f'photo {i}\n')
  (src / 'orphan.jpg').write_bytes(random_jpeg(9))  # no caption: not written
  shards = data.write_from_folder(str(src), str(tmp_path / 'from_folder'), samples_per_shard=2)
  assert len(shards) == 2
  (tmp_path / 'pairs.csv').write_text('path,caption,label\nphotos/p0.jpg,zero,0\nphotos/p2.jpg,two,2\n')
  data.write_from_csv(str(tmp_path / 'pairs.csv'), str(tmp_path / 'from_csv'))
  batches, _ = _collect(data.make_dataset(str(tmp_path / 'from_csv'), batch_size=4, image_size=16,
                                          context_length=8, is_train=False))
  np.testing.assert_array_equal(batches[0]['label'], [0, 2])
  np.testing.assert_array_equal(batches[0]['text'][1], tokenize(['two'], 8)[0])
  with pytest.raises(FileNotFoundError, match='no image with a same-named'):
    data.write_from_folder(str(tmp_path / 'from_csv'), str(tmp_path / 'x'))
  (tmp_path / 'named.csv').write_text('path,caption,label\nphotos/p0.jpg,zero,cat\n')
  with pytest.raises(InputError, match="named.csv: the label 'cat' of photos/p0.jpg is not an integer"):
    data.write_from_csv(str(tmp_path / 'named.csv'), str(tmp_path / 'y'))


def test_interrupted_writer_leaves_no_partial_shard(tmp_path):
  with pytest.raises(RuntimeError):
    with data.ShardWriter(str(tmp_path), 2) as writer:
      for i in range(3):
        writer.write(f'{i}', random_jpeg(i), 'jpg', 'c')
      raise RuntimeError('interrupted')
  assert sorted(os.listdir(tmp_path)) == ['00000.tar']


def test_demo_set_is_deterministic(tmp_path):
  def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
      for name in sorted(files):
        if name.endswith(('.csv', '.txt', '.jpg')):
          h.update((dirpath[len(str(root)):] + name).encode())
          h.update(open(os.path.join(dirpath, name), 'rb').read())
    return h.hexdigest()

  a = demo.write_demo_set(str(tmp_path / 'a'), num_train=16, num_val=8, samples_per_shard=8)
  demo.write_demo_set(str(tmp_path / 'b'), num_train=16, num_val=8, samples_per_shard=8)
  assert digest(tmp_path / 'a') == digest(tmp_path / 'b')
  assert open(a['classnames']).read().split() == list(demo.COLORS)
  batches, _ = _collect(data.make_dataset(a['val'], batch_size=8, image_size=64, is_train=False))
  assert batches[0]['image'].shape == (8, 64, 64, 3) and set(batches[0]['label']) <= set(range(10))


def test_synthetic_input():
  batch = data.make_synthetic_dataset(batch_size=3, image_size=32, context_length=8)[0]
  assert batch['image'].shape == (3, 32, 32, 3) and batch['text'].shape == (3, 8)
  assert (batch['text'][:, 0] == 49406).all() and (batch['text'][:, -1] == 49407).all()
  assert batch['image'].dtype == np.uint8  # as the training pipeline yields them


def test_iterator_state_is_json_and_config_sources(tmp_path):
  import json
  import ml_collections
  write_shards(tmp_path / 'a', 8, 4)
  config = ml_collections.ConfigDict(dict(sources=((str(tmp_path / 'a'), 1.0),), shuffle_buffer=4, cycle_length=2,
                                          num_workers=0))
  ds = data.make_dataset_from_config(config, batch_size=2, image_size=16, context_length=8, seed=0)
  it = iter(ds)
  next(it)
  state = json.loads(json.dumps(it.get_state()))  # goes into the training checkpoint as JSON
  expected = next(it)['label']
  resumed = iter(ds)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['label'], expected)
  config.sources = (('', 0.8), (str(tmp_path / 'a'), 0.2))
  with pytest.raises(ValueError, match='no shard pattern for source'):
    data.make_dataset_from_config(config, batch_size=2, image_size=16, context_length=8, seed=0)


def _photo_jpeg(seed, size, quality=90):
  buffer = io.BytesIO()
  demo.photo_like(np.random.default_rng(seed), *size).save(buffer, 'JPEG', quality=quality)
  return buffer.getvalue()


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / mse)


def test_reduced_scale_decode_is_close_to_the_exact_crop():
  # The same seed draws the same box on both paths; these sizes and seeds give DCT reductions 2, 2, 4 and 8.
  worst = np.inf
  cases = [((560, 500), 224, 2), ((768, 1360), 224, 2), ((1024, 1000), 224, 4), ((1000, 960), 112, 8)]
  for seed, (size, out, factor) in enumerate(cases):
    jpeg = _photo_jpeg(seed, size)
    _, _, w, h = transforms.random_resized_crop_box(*size, np.random.default_rng(seed))
    assert decode.draft_factor(w, h, out) == factor
    exact = decode.decode_train_crop(jpeg, out, np.random.default_rng(seed), reduced=False)
    fast = decode.decode_train_crop(jpeg, out, np.random.default_rng(seed))
    assert fast.shape == exact.shape == (out, out, 3) and fast.dtype == exact.dtype == np.uint8
    assert not np.array_equal(fast, exact)  # the reduced path really ran
    worst = min(worst, _psnr(fast, exact))
  assert worst >= 40.0, worst  # measured 44-51 dB


def test_exact_training_crop_is_the_train_transform_and_png_is_decoded_in_full():
  jpeg = _photo_jpeg(7, (500, 400))
  old = transforms.image_transform(64, is_train=True, seed=3)(decode.decode_image(jpeg))
  crop = decode.decode_train_crop(jpeg, 64, np.random.default_rng(3), reduced=False)
  np.testing.assert_array_equal(transforms.normalize_images(crop), old)  # bit for bit the float path of before
  buffer = io.BytesIO()
  Image.open(io.BytesIO(jpeg)).save(buffer, 'PNG')  # no DCT to reduce: full decode either way
  png = [decode.decode_train_crop(buffer.getvalue(), 64, np.random.default_rng(3), reduced=r) for r in (True, False)]
  np.testing.assert_array_equal(png[0], png[1])


def test_training_images_are_uint8_and_the_old_path_stays_selectable(tmp_path):
  write_shards(tmp_path, 8, 4)
  kwargs = dict(batch_size=4, image_size=16, context_length=16, seed=2, shuffle_buffer=1)
  new, it = _collect(data.make_dataset(str(tmp_path), **kwargs), limit=1)
  old, it2 = _collect(data.make_dataset(str(tmp_path), reduced_decode=False, uint8_images=False, **kwargs), limit=1)
  assert new[0]['image'].dtype == np.uint8 and old[0]['image'].dtype == np.float32
  # 40x30 images: no crop is large enough to reduce, so the two differ only in where normalisation happens.
  np.testing.assert_allclose(transforms.normalize_images(new[0]['image']), old[0]['image'], atol=1e-6)


def test_num_workers_minus_one_leaves_the_trainer_its_core(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: set(range(12)))
  assert data.resolve_num_workers(-1) == 12 - pipeline.TRAINER_CORES
  assert data.resolve_num_workers(0) == 0 and data.resolve_num_workers(3) == 3
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: {0})
  assert data.resolve_num_workers(-1) == 0  # one core: decode in the trainer's process
  with pytest.raises(ValueError, match='num_workers must be'):
    data.resolve_num_workers(-2)


def _tar_members(directory):
  members = {}
  for name in sorted(os.listdir(directory)):
    with tarfile.open(os.path.join(directory, name)) as tar:
      members.update({m.name: tar.extractfile(m).read() for m in tar})
  return members


def test_writer_max_size_shrinks_the_longer_side_and_keeps_captions(tmp_path):
  src = tmp_path / 'photos'
  src.mkdir()
  sizes = {'wide.jpg': (1000, 563), 'tall.jpg': (301, 997), 'small.jpg': (200, 120), 'odd.png': (777, 777)}
  for i, (name, size) in enumerate(sizes.items()):
    image = demo.photo_like(np.random.default_rng(i), *size)
    image.save(src / name, quality=90)
    (src / name).with_suffix('.txt').write_text(f'  photo {i}: ünïcode, "quoted"  \n')
  (src / 'broken.jpg').write_bytes(b'not a jpeg')
  (src / 'broken.txt').write_text('kept as it is')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for dst, extra in (('plain', []), ('small', ['--max_size=256', '--quality=85'])):
    subprocess.run([sys.executable, '-m', 'eva_clip_jax.data.writer', f'--src={src}', f'--dst={tmp_path / dst}',
                    *extra], check=True, env=env, cwd=pathlib.Path(__file__).resolve().parents[1],
                   capture_output=True, timeout=120)
  plain, small = _tar_members(tmp_path / 'plain'), _tar_members(tmp_path / 'small')
  assert sorted(plain) == sorted(small)
  originals = {}
  for name in sorted(plain):
    if name.endswith('.txt'):
      assert small[name] == plain[name]  # captions untouched
      continue
    if plain[name] == b'not a jpeg':
      assert small[name] == plain[name]  # stored as it is; the reader skips and counts it
      continue
    before, after = Image.open(io.BytesIO(plain[name])), Image.open(io.BytesIO(small[name]))
    originals[before.size] = after.size
    assert after.format == before.format
    if max(before.size) <= 256:
      assert small[name] == plain[name]  # small enough already: the same bytes
      continue
    assert max(after.size) == 256
    (w, h), (w2, h2) = before.size, after.size
    assert abs(w2 - w * 256 / max(w, h)) <= 1 and abs(h2 - h * 256 / max(w, h)) <= 1  # aspect within a pixel
  assert originals == {(1000, 563): (256, 144), (301, 997): (77, 256), (200, 120): (200, 120), (777, 777): (256, 256)}
  resized = Image.open(io.BytesIO(small[next(n for n in small if small[n] != plain[n] and n.endswith('.jpg'))]))
  assert resized.mode == 'RGB'

"""Data, checkpoints and metrics in a gs:// bucket, against a real GCS server (fake-gcs-server) the tests start.

Every GCS client of the project (gcsfs for listing and streaming, tensorstore under orbax for the checkpoint
arrays) talks HTTP to the server; nothing is mocked. Faults come from outside the product: SIGKILL and SIGTERM of
the trainer, a truncated object in the bucket, a proxy that fails requests or refuses writes, a full disk.
"""

import io
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from eva_clip_jax import data, storage
from eva_clip_jax.data import demo
from eva_clip_jax.training.checkpoint import read_state
from gcs_local import FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 6


def _command(workdir, sources, total=TOTAL, every=1):
  return [sys.executable, '-m', 'eva_clip_jax.train', f'--config={ROOT}/configs/tiny.py', f'--workdir={workdir}',
          f'--config.total_steps={total}', '--config.batch_size=16', '--config.log_every_steps=2',
          f'--config.checkpoint.every_steps={every}', f"--config.data.sources=(('{sources}', 1.0),)",
          '--config.data.shuffle_buffer=32', '--config.data.num_workers=1', '--config.evals={}']


def _env(**extra):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **extra}
  env.pop('XLA_FLAGS', None)
  return env


def _steps(workdir):
  """Finished checkpoint steps (in a bucket orbax writes a step in place: finished once it has its commit file)."""
  directory = storage.join(workdir, 'checkpoints')
  if not storage.isdir(directory):
    return []
  return sorted(int(d) for d in storage.listdir(directory) if d.isdigit() and (
      not storage.is_url(directory) or storage.exists(storage.join(directory, d, 'commit_success.txt'))))


def _final_state(workdir, step=TOTAL):
  return read_state(storage.join(workdir, 'checkpoints', str(step)))


def _assert_identical(expected, got):
  for name in ('params', 'opt_state', 'loss_scale', 'rng', 'step'):
    leaves_a, leaves_b = jax.tree.leaves(expected[name]), jax.tree.leaves(got[name])
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.fixture(scope='module')
def demo_local(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('demo') / 'demo_data')
  demo.write_demo_set(root, num_train=128, num_val=16, samples_per_shard=32)
  return root


@pytest.fixture(scope='module')
def demo_bucket(gcs_server, demo_local):  # pylint: disable=unused-argument
  """The same demo set, uploaded to a bucket of its own."""
  fs, _ = storage.filesystem('gs://demo-data')
  fs.mkdir('demo-data')
  storage.upload(demo_local, 'gs://demo-data/demo')
  return 'gs://demo-data/demo'


@pytest.fixture(scope='module')  # its users share an xdist group, so one worker makes it (pyproject: loadgroup)
def straight(tmp_path_factory, demo_local):
  """The uninterrupted run, all on local disk: the reference every bucket run must end equal to."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  subprocess.run(_command(workdir, f'{demo_local}/train'), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=900)
  return workdir


# --------------------------------------------------------------------------------------------------------------
# The path layer and the data pipeline.


def test_storage_layer_behaves_alike_on_disk_and_in_a_bucket(tmp_path, gcs_bucket):
  for base in (str(tmp_path / 'local'), f'{gcs_bucket}/remote'):
    storage.makedirs(base)
    storage.write_text(storage.join(base, 'a', 'x.txt'), 'hello\n')
    storage.write_bytes(storage.join(base, 'a', 'y.bin'), b'\0' * 100)
    assert storage.listdir(storage.join(base, 'a')) == ['x.txt', 'y.bin']
    assert storage.glob(storage.join(base, 'a', '*.txt')) == [storage.join(base, 'a', 'x.txt')]
    assert storage.read_text(storage.join(base, 'a', 'x.txt')) == 'hello\n'
    assert storage.size(storage.join(base, 'a', 'y.bin')) == 100
    with storage.open_read(storage.join(base, 'a', 'y.bin')) as f:
      f.seek(90)
      assert f.read() == b'\0' * 10
    with pytest.raises(RuntimeError):
      with storage.atomic_write(storage.join(base, 'half.txt'), 'w') as f:
        f.write('partial')
        raise RuntimeError('interrupted')
    assert not storage.exists(storage.join(base, 'half.txt'))
    assert [p for p in storage.walk_files(base) if 'tmp' in storage.basename(p)] == []
    storage.move(storage.join(base, 'a'), storage.join(base, 'b'))
    assert not storage.exists(storage.join(base, 'a', 'x.txt'))
    assert storage.walk_files(storage.join(base, 'b')) == [storage.join(base, 'b', n) for n in ('x.txt', 'y.bin')]


def test_shards_are_found_in_a_bucket_by_braces_prefix_glob_and_list(demo_bucket):
  expected = [f'{demo_bucket}/train/{i:05d}.tar' for i in range(4)]
  assert data.list_shards(f'{demo_bucket}/train/{{00000..00003}}.tar') == expected
  assert data.list_shards(f'{demo_bucket}/train/{{00000..00009}}.tar') == expected  # only the ones that exist
  assert data.list_shards(f'{demo_bucket}/train') == expected
  assert data.list_shards(f'{demo_bucket}/train/*.tar') == expected
  storage.write_text(f'{demo_bucket}/lists/train.txt', '# two shards\n../train/00001.tar\n../train/00002.tar\n')
  assert [storage.basename(p) for p in data.list_shards(f'{demo_bucket}/lists/train.txt')] == ['00001.tar',
                                                                                              '00002.tar']
  with pytest.raises(FileNotFoundError, match='no shard matches'):
    data.list_shards(f'{demo_bucket}/nope/{{0..3}}.tar')


def _batches(source, n, state=None):
  it = iter(data.make_dataset(source, batch_size=8, image_size=32, context_length=16, seed=3, shuffle_buffer=16))
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  return out, it.get_state()


def test_streamed_shards_match_local_disk_and_resume_exactly(demo_local, demo_bucket):
  local, _ = _batches(f'{demo_local}/train', 6)
  remote, _ = _batches(f'{demo_bucket}/train', 6)
  first, state = _batches(f'{demo_bucket}/train', 3)
  rest, _ = _batches(f'{demo_bucket}/train', 3, state)
  for a, b, c in zip(local, remote, first + rest):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['image'], c['image'])
    np.testing.assert_array_equal(a['text'], c['text'])


def test_a_shard_that_disappears_is_skipped_and_counted(demo_local, gcs_bucket):
  storage.upload(f'{demo_local}/train', f'{gcs_bucket}/train')
  pattern = f'{gcs_bucket}/train/{{00000..00003}}.tar'
  dataset = data.make_dataset(pattern, batch_size=8, image_size=32, context_length=16, is_train=False)
  storage.remove(f'{gcs_bucket}/train/00002.tar')  # listed at start, gone when the pipeline reaches it
  batches = list(dataset)
  counts = {k: sum(data.skipped_counts(b)[k] for b in batches) for k in data.skipped_counts(batches[0])}
  assert counts['skipped/unreadable_shard'] == 1
  assert sum(int(np.sum(b['valid'])) for b in batches) == 96  # three shards of 32


def test_transient_faults_are_retried_and_counted_with_the_same_batches(demo_local, demo_bucket, gcs_server):
  """30% of requests fail (503 or a dropped connection): the client retries with backoff, the batches are those of
  local disk, and the retries ride on the batches into the training metrics."""
  proxy = FaultProxy(gcs_server, fail_fraction=0.3, seed=1)
  try:
    os.environ['STORAGE_EMULATOR_HOST'] = proxy.url
    faulty, _ = _batches(f'{demo_bucket}/train', 4)
  finally:
    os.environ['STORAGE_EMULATOR_HOST'] = gcs_server
    proxy.close()
  clean, _ = _batches(f'{demo_local}/train', 4)
  retries = sum(data.skipped_counts(b)['data/storage_retries'] for b in faulty)
  assert proxy.injected['503'] > 0 and retries >= proxy.injected['503'] // 2, (proxy.injected, retries)
  for a, b in zip(clean, faulty):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['text'], b['text'])


# --------------------------------------------------------------------------------------------------------------
# Training runs with their workdir (and shards) in the bucket.


@pytest.mark.xdist_group('straight')  # one worker makes the reference run once
def test_sigkilled_bucket_run_resumes_bit_identical_to_a_local_run(tmp_path, demo_bucket, gcs_bucket, straight):
  """Shards and workdir in the bucket; three SIGKILLs at random moments; the end equals the uninterrupted run on
  local disk, checkpoints and metrics are in the bucket, and no local folder named gs: appeared."""
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  workdir = f'{gcs_bucket}/run'
  command = _command(workdir, f'{demo_bucket}/train')
  for kill in range(3):
    before = _steps(workdir)
    proc = subprocess.Popen(command, cwd=str(tmp_path), env=_env(PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 600
    if kill == 0:
      time.sleep(rng.uniform(3.0, 8.0))
    else:
      while proc.poll() is None and time.time() < deadline and not set(_steps(workdir)) - set(before):
        time.sleep(0.1)
      time.sleep(rng.uniform(0.0, 0.6))
    if proc.poll() is not None:
      assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
      continue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
  result = subprocess.run(command, cwd=str(tmp_path), env=_env(PYTHONPATH=ROOT), capture_output=True, timeout=900)
  assert result.returncode == 0, (seed, result.stderr.decode()[-3000:])
  _assert_identical(_final_state(straight), _final_state(workdir))
  assert storage.exists(f'{workdir}/metrics.jsonl') and storage.exists(f'{workdir}/final_metrics.json')
  assert storage.glob(f'{workdir}/events.out.tfevents.*')
  assert not os.path.exists(os.path.join(str(tmp_path), 'gs:')) and not os.path.exists(os.path.join(ROOT, 'gs:'))


@pytest.mark.xdist_group('straight')  # one worker makes the reference run once
def test_training_through_failing_requests_counts_the_retries_and_ends_in_the_same_state(tmp_path, demo_bucket,
                                                                                        gcs_server, straight):
  """The shards are read through a proxy that fails 20% of reads (503 or a dropped connection): the run finishes in
  the uninterrupted run's state and its metrics count the client's retries."""
  proxy = FaultProxy(gcs_server, fail_fraction=0.2, seed=7, only_reads=True)
  workdir = str(tmp_path / 'faulty')
  try:
    result = subprocess.run(_command(workdir, f'{demo_bucket}/train'), cwd=ROOT, capture_output=True, timeout=900,
                            env=_env(STORAGE_EMULATOR_HOST=proxy.url))
  finally:
    proxy.close()
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  assert proxy.injected['503'] + proxy.injected['dropped'] > 0
  _assert_identical(_final_state(straight), _final_state(workdir))
  import json  # pylint: disable=g-import-not-at-top
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  assert sum(line.get('data/storage_retries', 0) for line in lines) > 0, lines


@pytest.mark.xdist_group('straight')  # one worker makes the reference run once
def test_a_truncated_object_in_the_latest_bucket_step_is_set_aside(tmp_path, demo_local, gcs_bucket, straight):
  workdir = f'{gcs_bucket}/damaged'
  storage.upload(straight, workdir)
  step_dir = f'{workdir}/checkpoints/{TOTAL}/state'
  largest = max(storage.walk_files(step_dir), key=storage.size)
  storage.write_bytes(largest, storage.read_bytes(largest)[:storage.size(largest) // 2])
  result = subprocess.run(_command(workdir, f'{demo_local}/train'), cwd=ROOT, env=_env(), capture_output=True,
                          timeout=900)
  stderr = result.stderr.decode()
  assert result.returncode == 0, stderr[-3000:]
  assert f'Checkpoint step {TOTAL} cannot be restored' in stderr and f'Resumed from step {TOTAL - 1}' in stderr
  assert 'Traceback' not in stderr
  aside = [d for d in storage.listdir(f'{workdir}/checkpoints') if d.startswith(f'damaged.{TOTAL}.')]
  assert len(aside) == 1  # kept, under its new name, with every object
  assert len(storage.walk_files(f'{workdir}/checkpoints/{aside[0]}')) == len(storage.walk_files(
      f'{straight}/checkpoints/{TOTAL}'))
  _assert_identical(_final_state(straight), _final_state(workdir))


def test_sigterm_saves_to_the_bucket_within_the_notice_and_resumes(tmp_path, demo_local, gcs_bucket):
  workdir = f'{gcs_bucket}/preempted'
  command = _command(workdir, f'{demo_local}/train', total=100000, every=100000)
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
  deadline = time.time() + 900
  while not storage.exists(f'{workdir}/metrics.jsonl') and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    time.sleep(0.5)
  noticed = time.time()
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  took = time.time() - noticed
  assert proc.returncode == 0, stderr.decode()[-3000:]
  assert took < 30, f'{took:.1f} s from SIGTERM to exit'
  saved = max(_steps(workdir))
  assert int(_final_state(workdir, saved)['step']) == saved >= 2
  resumed = subprocess.run(_command(workdir, f'{demo_local}/train', total=saved + 2, every=100000), cwd=ROOT,
                           env=_env(), capture_output=True, timeout=900)
  assert resumed.returncode == 0 and f'Resumed from step {saved}' in resumed.stderr.decode()


def test_a_bucket_that_refuses_writes_stops_the_run_with_one_line_and_it_resumes(tmp_path, demo_local, gcs_bucket,
                                                                                 gcs_server):
  proxy = FaultProxy(gcs_server)
  workdir = f'{gcs_bucket}/refused'
  env = _env(STORAGE_EMULATOR_HOST=proxy.url, TENSORSTORE_GCS_HTTP_URL=proxy.url)
  try:
    proc = subprocess.Popen(_command(workdir, f'{demo_local}/train', total=40), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while len(_steps(workdir)) < 2 and time.time() < deadline:
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      time.sleep(0.2)
    proxy.refuse_writes = True
    _, stderr = proc.communicate(timeout=600)
  finally:
    proxy.close()
  stderr = stderr.decode()
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert proc.returncode == 2 and len(errors) == 1, stderr[-3000:]
  last, latest = errors[0], max(_steps(workdir))
  assert last.startswith('error: 3 checkpoint saves in a row failed') and f'latest usable step is {latest}' in last
  assert 'Traceback' not in stderr
  assert int(_final_state(workdir, latest)['step']) == latest
  result = subprocess.run(_command(workdir, f'{demo_local}/train', total=latest + 2), cwd=ROOT, env=_env(),
                          capture_output=True, timeout=900)
  assert result.returncode == 0 and f'Resumed from step {latest}' in result.stderr.decode(), result.stderr[-3000:]


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs mounted for the test: a disk that really fills up."""
  mount_point = tmp_path / 'disk'
  mount_point.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(mount_point)], capture_output=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.decode().strip()}')
  try:
    yield str(mount_point)
  finally:
    subprocess.run(['umount', '-l', str(mount_point)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes(small_disk, demo_local):
  """The disk fills up after two checkpoints: the run stops with one line naming the cause and the latest usable
  step, leaves no partial step behind, and resumes from that step once there is room again."""
  workdir = os.path.join(small_disk, 'run')
  proc = subprocess.Popen(_command(workdir, f'{demo_local}/train', total=40), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while len(_steps(workdir)) < 2 and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    time.sleep(0.2)
  filler = os.path.join(small_disk, 'filler')
  with open(filler, 'wb') as f:
    try:
      while True:
        f.write(b'\0' * (1 << 20))
        f.flush()
    except OSError:  # ENOSPC: the disk is full
      pass
  _, stderr = proc.communicate(timeout=600)
  stderr = stderr.decode()
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert proc.returncode == 2 and len(errors) == 1, stderr[-3000:]
  last, latest = errors[0], max(_steps(workdir))
  assert last.startswith('error: 3 checkpoint saves in a row failed') and 'No space left' in last, last
  assert f'latest usable step is {latest}' in last
  # No traceback through the project's code. (tensorstore's writers that were cut off may still report "Event loop
  # is closed" while the interpreter shuts down, after the error line: a known leftover, not the run's report.)
  assert 'eva_clip_jax/' not in stderr.split('Traceback', 1)[-1] or 'Traceback' not in stderr
  assert not [d for d in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in d]  # no partial step left
  os.remove(filler)
  result = subprocess.run(_command(workdir, f'{demo_local}/train', total=latest + 2), cwd=ROOT, env=_env(),
                          capture_output=True, timeout=900)
  assert result.returncode == 0 and f'Resumed from step {latest}' in result.stderr.decode(), result.stderr[-3000:]


def test_two_processes_share_one_bucket_workdir_are_killed_and_resume(gcs_bucket):
  """jax.distributed on CPU: two processes write one checkpoint series to one gs:// path; both are SIGKILLed after
  the first step lands; started again, both resume from the same step and finish."""
  import socket  # pylint: disable=g-import-not-at-top
  workdir = f'{gcs_bucket}/two'

  def start():
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    return [subprocess.Popen([sys.executable, '-m', 'eva_clip_jax.train', f'--config={ROOT}/configs/tiny.py',
                              f'--workdir={workdir}', '--num_cpu_devices=1', '--config.total_steps=5',
                              '--config.batch_size=16', '--config.log_every_steps=1', '--config.data.synthetic=True',
                              '--config.checkpoint.every_steps=1', '--config.evals={}',
                              f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for i in range(2)]

  procs = start()
  deadline = time.time() + 600
  while not _steps(workdir) and time.time() < deadline and all(p.poll() is None for p in procs):
    time.sleep(0.2)
  for p in procs:
    p.kill()
    p.communicate()
  killed_at = max(_steps(workdir))
  procs = start()
  outputs = [p.communicate(timeout=900)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  resumed = [int(out.split('Resumed from step ')[1].split()[0]) for out in outputs if 'Resumed from step' in out]
  assert resumed and resumed[0] >= killed_at, outputs[0][-2000:]
  assert int(_final_state(workdir, 5)['step']) == 5


def test_convert_and_extract_features_read_and_write_a_bucket(tmp_path, gcs_bucket, demo_local, demo_bucket):
  """`convert` both ways with the source, the converted directory and the export all in the bucket; the converted
  model equals the source's, the export reloads to the same parameters; `extract_features` embeds shards in the
  bucket into the bucket, equal to a local run."""
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.conversion import api, model_params  # pylint: disable=g-import-not-at-top
  model = ec.create_model('tiny', seed=5)
  api.export_file(model, f'{gcs_bucket}/tiny.safetensors', 'tiny', 'open_clip')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'eva_clip_jax.convert', *args], cwd=ROOT, env=_env(),
                                     capture_output=True, text=True, timeout=600)
  result = run('--model=tiny', f'--src={gcs_bucket}/tiny.safetensors', f'--dst={gcs_bucket}/converted')
  assert result.returncode == 0, result.stderr[-2000:]
  result = run('--model=tiny', f'--src={gcs_bucket}/converted', f'--dst={gcs_bucket}/export/tiny.pt',
               '--layout=eva')
  assert result.returncode == 0, result.stderr[-2000:]
  for source in (f'{gcs_bucket}/converted', f'{gcs_bucket}/export/tiny.pt'):
    loaded = ec.create_model('tiny', pretrained=source)
    for a, b in zip(jax.tree.leaves(model_params(model)), jax.tree.leaves(model_params(loaded))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not [p for p in storage.walk_files(gcs_bucket) if '.tmp' in p]

  out = subprocess.run([sys.executable, '-m', 'eva_clip_jax.extract_features', f'--config={ROOT}/configs/tiny.py',
                        f'--data={demo_bucket}/val', f'--output_dir={gcs_bucket}/features', '--batch_size=8'],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.extract_features import extract_features  # pylint: disable=g-import-not-at-top
  local = extract_features(tiny.get_config(), f'{demo_local}/val', str(tmp_path / 'features'), batch_size=8)
  remote = np.load(io.BytesIO(storage.read_bytes(f'{gcs_bucket}/features/image_features.npy')))
  np.testing.assert_allclose(remote, np.load(local['image_features']), atol=1e-6)
  assert storage.read_text(f'{gcs_bucket}/features/keys.txt') == open(local['keys'], encoding='utf-8').read()

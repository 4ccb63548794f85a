import atexit
import os
import shutil
import tempfile
import uuid

# CPU, also where the CUDA plugin is installed (requirements-accel.txt): it would otherwise probe for a GPU. The
# accelerator-compile tests reach TPU and GPU compilers through jax.experimental.topologies, not as backends.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu's host-wide lock file would let only one test worker compile for TPU (compiling opens no chip).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# XLA reads XLA_FLAGS once per process: deviceless GPU compiles need cuBLAS for the matmuls (untuned Triton GEMM
# tiles may fail to compile without a GPU to autotune on; eva_clip_jax.training.planning.GPU_XLA_FLAGS).
if '--xla_gpu_enable_triton_gemm' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_triton_gemm=false".strip()

# One XLA compilation cache for the whole run, shared by the test workers and by the training, evaluation and
# conversion subprocesses they start (which inherit the variable): the tiny model's train step, compiled in some
# forty subprocess runs, compiles once (a tiny training run: 42 s cold, 22 s warm). Only the process that made the
# folder removes it. Cached executables are the compiler's own output: results are unchanged.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='eva_clip_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

import jax  # noqa: E402

# Eight fake CPU devices, for the sharding tests; unsharded code keeps running on the first.
jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS(['pytest'])  # grain's worker processes read absl flags

from eva_clip_jax import storage  # noqa: E402
from gcs_local import start_gcs_server  # noqa: E402
from eva_clip_jax.models import get_model_spec, replace_spec  # noqa: E402


def small_eva01_spec():
  """EVA-01 blocks (fused qkv, GELU MLP, pre-norm) at two layers, g/14's head dim 88."""
  return replace_spec(get_model_spec('EVA01-CLIP-g-14'), name='eva01-small', embed_dim=32, vision__depth=2,
                      vision__width=176, vision__num_heads=2, vision__mlp_dim=768, vision__image_size=56,
                      text__depth=2, text__width=64, text__num_heads=2)


def small_bige_spec():
  """bigE blocks (fused qkv, GELU MLP, post-norm) at two layers, bigE's head dim 112."""
  return replace_spec(get_model_spec('EVA02-CLIP-bigE-14'), name='bige-small', embed_dim=32, vision__depth=2,
                      vision__width=224, vision__num_heads=2, vision__mlp_dim=960, vision__image_size=56,
                      text__depth=2, text__width=64, text__num_heads=2)


@pytest.fixture
def float32_matmuls():
  """IEEE float32 matmuls, for comparisons at float32 tolerances: GPUs default to TF32 for float32 dots, and so do
  the Triton kernels traced under that default (lax.dot_general reads it), which misses 1e-5 by 2-3e-4 (H200,
  2026-12-04, BENCHMARKS.md). On CPU, float32 dots are IEEE already."""
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture
def tiny_spec():
  return get_model_spec('tiny')


@pytest.fixture(scope='module')
def initial_params():
  """The tiny model's initial parameters (helpers.train_config), made once per test module (random initialisation
  compiles slowly on CPU) and placed onto each test's mesh by `init_state`."""
  from eva_clip_jax.training import step as step_lib
  from helpers import single_device_mesh, train_config
  setup = step_lib.make_setup(train_config(), single_device_mesh())
  return jax.device_get(step_lib.init_state(setup).params)


@pytest.fixture(scope='session')
def gcs_server(tmp_path_factory):
  """A local GCS server (fake-gcs-server) for the session; yields its URL, with STORAGE_EMULATOR_HOST set to it,
  which subprocesses inherit through os.environ (the storage layer's listings are never cached)."""
  proc, url = start_gcs_server(str(tmp_path_factory.mktemp('gcs')))
  os.environ['STORAGE_EMULATOR_HOST'] = url
  storage.point_clients_at_emulator()  # storage read the variable at import, before the server existed
  yield url
  proc.kill()
  proc.wait()
  os.environ.pop('STORAGE_EMULATOR_HOST', None)
  os.environ.pop('TENSORSTORE_GCS_HTTP_URL', None)


@pytest.fixture
def gcs_bucket(gcs_server):  # pylint: disable=redefined-outer-name,unused-argument
  """A fresh, empty bucket on the session's GCS server, as 'gs://<name>'."""
  name = f'test-{uuid.uuid4().hex[:16]}'
  fs, _ = storage.filesystem(f'gs://{name}')
  fs.mkdir(name)
  return f'gs://{name}'

"""One process of tests/test_benchmark_suite.py's two-process evaluation: uneven shares of the images, one
zero-shot score (python tests/multiprocess_eval_worker.py PORT PROCESS_ID OUT)."""

import json
import sys

import jax
import numpy as np


def shares():
  """16 images in batches of 4: process 0 gets three batches, process 1 one (uneven, as a split's tail can be)."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 64, 64, 3)).astype(np.float32)
  labels = np.arange(16) % 3
  batches = [{'image': images[i:i + 4], 'label': labels[i:i + 4]} for i in range(0, 16, 4)]
  return batches[:3], batches[3:]


if __name__ == '__main__':
  jax.config.update('jax_num_cpu_devices', 2)
  jax.distributed.initialize(f'127.0.0.1:{sys.argv[1]}', num_processes=2, process_id=int(sys.argv[2]))
  import eva_clip_jax as ec  # pylint: disable=g-import-not-at-top
  from eva_clip_jax.evaluation import FeatureExtractor, score_zero_shot  # pylint: disable=g-import-not-at-top
  bound = FeatureExtractor.for_model(ec.create_model('tiny', seed=3), batch_size=4)
  mine = shares()[jax.process_index()]
  result = score_zero_shot(bound, ec.get_tokenizer('tiny'), mine, ['red', 'green', 'blue'], ['a {} thing'])
  with open(sys.argv[3], 'w') as f:
    json.dump(result, f)

"""Source mixing as the reference's loader does it: whole global batches alternate between sources
(mixing='batch'), shards drawn with replacement (resampled=True); resume stays exact under both."""

import numpy as np

from eva_clip_jax import data
from helpers import write_shards

STEPS = 20


def _source_of(batch):
  """0 or 1 for a batch from one source (labels < 1000 are source a's), -1 for a mixed batch."""
  sources = set((np.asarray(batch['label']) >= 1000).astype(int).tolist())
  return sources.pop() if len(sources) == 1 else -1


def _dataset(tmp_path, process_index=0, process_count=1, **options):
  return data.make_dataset([(str(tmp_path / 'a'), 0.5), (str(tmp_path / 'b'), 0.5)], batch_size=4, image_size=16,
                           context_length=16, seed=5, shuffle_buffer=4, process_index=process_index,
                           process_count=process_count, **options)


def test_global_batches_alternate_between_sources_and_resume_exactly(tmp_path):
  write_shards(tmp_path / 'a', 24, 4, start=0)
  write_shards(tmp_path / 'b', 24, 4, start=1000)
  for resampled in (False, True):
    # Two processes, each with its share of every global batch: every share of step i is from the same source.
    shares = []
    for process in range(2):
      it = iter(_dataset(tmp_path, process, 2, mixing='batch', resampled=resampled))
      shares.append([_source_of(next(it)) for _ in range(STEPS)])
    assert shares[0] == shares[1] == [i % 2 for i in range(STEPS)], (resampled, shares)
    # Resume mid-way: the next batches are exactly those of the uninterrupted iterator.
    it = iter(_dataset(tmp_path, mixing='batch', resampled=resampled))
    for _ in range(STEPS // 2 - 1):
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(STEPS // 2 + 1)]  # 24 samples a source: crosses an epoch
    resumed = iter(_dataset(tmp_path, mixing='batch', resampled=resampled))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(len(expected))]):
      np.testing.assert_array_equal(a['label'], b['label'])
      np.testing.assert_array_equal(a['image'], b['image'])


def test_sample_mixing_puts_both_sources_in_a_batch(tmp_path):
  write_shards(tmp_path / 'a', 24, 4, start=0)
  write_shards(tmp_path / 'b', 24, 4, start=1000)
  it = iter(_dataset(tmp_path))
  assert -1 in [_source_of(next(it)) for _ in range(6)]


def test_resampled_shards_are_drawn_with_replacement(tmp_path):
  """Within one pass's worth of shards, resampling repeats some shards and skips others; without it, a process
  reads each of its shards once per epoch."""
  write_shards(tmp_path / 'a', 40, 2, start=0)  # 20 shards of 2 samples
  def shard_ids(resampled):
    ds = data.make_dataset(str(tmp_path / 'a'), batch_size=2, image_size=16, context_length=16, seed=5,
                           shuffle_buffer=0, cycle_length=1, resampled=resampled)
    it = iter(ds)
    return [int(next(it)['label'][0]) // 2 for _ in range(20)]
  assert sorted(shard_ids(False)) == list(range(20))
  drawn = shard_ids(True)
  assert len(set(drawn)) < 20 and all(0 <= s < 20 for s in drawn)

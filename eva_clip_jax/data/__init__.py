"""Input: webdataset shards read with grain, the shard writer, the demo set, synthetic input."""

from eva_clip_jax.data.pipeline import (SKIP_REASONS, make_dataset, make_dataset_from_config, make_synthetic_dataset,
                                        resolve_num_workers, skipped_counts)
from eva_clip_jax.data.shards import expand_braces, list_shards
from eva_clip_jax.data.writer import ShardWriter, write_from_csv, write_from_folder

__all__ = ['SKIP_REASONS', 'ShardWriter', 'expand_braces', 'list_shards', 'make_dataset', 'make_dataset_from_config',
           'make_synthetic_dataset', 'resolve_num_workers', 'skipped_counts', 'write_from_csv', 'write_from_folder']

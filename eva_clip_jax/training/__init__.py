"""The training recipe: optimizer, loss, sharding, train state and step, checkpoints, metrics."""

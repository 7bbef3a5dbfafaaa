"""The training side of goat_dist: run config, data, model loading, the loop, checkpoints, logging."""

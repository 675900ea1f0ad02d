"""What a run leaves on disk: atomic files, the run directory, weights, training states, the lock, metrics, plots."""

"""files: feature shards and their manifest, loading any input, atomic writes, the run directory, feature checks."""

"""benchmarks (`make bench`), performance measurements and their synthetic models."""

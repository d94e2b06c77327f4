"""Job entry points: `python -m jobs.<name> CONFIG.yaml` (or through `ray job submit`)."""

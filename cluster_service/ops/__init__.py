"""what users run: the CLI, the pipeline steps the jobs call, job configs, job submission, the local cluster."""

"""What every job entry point does first: take ONE config path, validate it into the job's typed config
(cluster_service.ops.jobconfig) before any Ray or GPU work, and turn errors into a clear message and exit 2.

    python -m jobs.<name> CONFIG.yaml
    ray job submit --working-dir . -- python -m jobs.<name> CONFIG.yaml
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from cluster_service.config import ConfigError
from cluster_service.ops.jobconfig import load_job_config

EXIT_BAD_CONFIG = 2


def load(job: str, argv: list[str] | None = None):
    """Parse argv (exactly one CONFIG path) and return the validated config, or exit 2 with why not."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(f"usage: python -m jobs.{job} CONFIG.yaml", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    try:
        cfg = load_job_config(job, args[0])
    except ConfigError as e:
        print(f"error: invalid {job} job config: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_CONFIG)
    print(f"{job}: config {args[0]} is valid", flush=True)
    return cfg


def run(job: str, body: Callable[[object], dict], argv: list[str] | None = None) -> None:
    """Validate the config, run `body(cfg)`, print its result as JSON. Bad input (ValueError,
    FileNotFoundError, ConfigError) ends the job with a one-line message and exit 2."""
    cfg = load(job, argv)
    try:
        result = body(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {job} job: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_CONFIG)
    print(f"{job}: result {json.dumps(result, default=str)}", flush=True)

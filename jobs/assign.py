"""Feature shards -> assignment shards of a fitted model.  python -m jobs.assign CONFIG.yaml
(config: assign and tracking sections). Exits 1 when any shard could not be assigned."""

from __future__ import annotations

import sys

from cluster_service.ops.pipeline import assign_step
from jobs._common import run


def _assign(cfg) -> dict:
    report = assign_step(cfg.assign, cfg.tracking)
    if report.failed:
        for o in report.failed:
            print(f"error: shard {o.shard} not assigned: {o.error}", file=sys.stderr, flush=True)
        sys.exit(1)
    return report.as_dict()


def main(argv: list[str] | None = None) -> None:
    run("assign", _assign, argv)


if __name__ == "__main__":
    main()

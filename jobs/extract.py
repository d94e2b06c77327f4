"""Images -> MoCo feature shards.  python -m jobs.extract CONFIG.yaml   (config: extract section)"""

from __future__ import annotations

from cluster_service.ops.pipeline import extract_step
from jobs._common import run


def main(argv: list[str] | None = None) -> None:
    run("extract", lambda cfg: extract_step(cfg.extract), argv)


if __name__ == "__main__":
    main()

"""Feature shards (or an .npz) -> fitted model on Ray Train workers.  python -m jobs.fit CONFIG.yaml

    ray job submit --working-dir . -- python -m jobs.fit configs/laptop-smoke.yaml

Config sections: train (data, out, workers, use_gpu, checkpoint_every, max_failures, storage_path),
fit (the FitConfig tree), tracking. Inside a Ray job the fit runs on that cluster; run locally it
starts a local Ray instance (or joins RAY_ADDRESS). Re-running it on the same train.out resumes from
the last checkpoint.
"""

from __future__ import annotations

from cluster_service.ops.pipeline import fit_job
from jobs._common import run


def main(argv: list[str] | None = None) -> None:
    run("fit", lambda cfg: fit_job(cfg.train, cfg.fit, cfg.tracking), argv)


if __name__ == "__main__":
    main()

"""Distributed epoch benchmark: Ray Train workers on generated shards (make bench: distributed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cluster_service.config import FitConfig
from cluster_service.io.runs import read_history
from cluster_service.io.shards import manifest_path
from cluster_service.runtime.trainer import fit_distributed


def bench_epoch_distributed(
    n_samples: int = 100_000,
    n_features: int = 32,
    n_clusters: int = 50,
    workers: Sequence[int] = (1, 2),
    epochs: int = 4,
    use_gpu: bool = False,
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Epoch time of the distributed fit with each worker count, K fixed (k-means init of
    `n_clusters`, no moves), on a generated mixture written as 4 shards per worker of the largest
    count. One row per worker count: median over epochs after the first of the epoch time and its
    parts (seconds, rank 0's clock): train (nets, incl. DDP's gradient all-reduce), stats
    (responsibilities + local statistics), reduce (the statistics all_reduce, incl. waiting for
    the slowest rank), mstep, moves; plus the statistics' size in MB.
    """
    import warnings

    from cluster_service.datasets import make_mixture
    from cluster_service.io.shards import write_shards

    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench-dist-"))
    shards = root / "shards"
    if not manifest_path(shards).is_file():
        x, _ = make_mixture(n_samples, n_features, n_clusters, seed=seed)
        rows = -(-n_samples // (4 * max(workers)))
        write_shards(shards, np.arange(n_samples, dtype=np.int64), x, rows_per_shard=rows)
        del x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedule has no split on purpose
        cfg = FitConfig().replace(**{
            "k_init": n_clusters, "seed": seed, "schedule.epochs": epochs, "schedule.warmup_epochs": 0,
            "schedule.subcluster_start": 0, "schedule.first_split": epochs, "schedule.final_epochs": 0,
            "moves.prune_below": 0.0,
        })
    out = []
    for w in workers:
        run_dir = root / f"run-{w}w"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_distributed(shards, run_dir, cfg, w, use_gpu=use_gpu, checkpoint_every=epochs, max_failures=0)
        history = read_history(run_dir)
        history = history[1:] if len(history) > 1 else history  # the first epoch warms caches up
        med = {k: float(np.median([r[f"time_{k}"] for r in history]))
               for k in ("total", "train", "stats", "reduce", "mstep", "moves")}
        k = history[-1]["n_clusters"]
        out.append({
            "workers": w, "use_gpu": use_gpu, "n_samples": n_samples, "n_features": n_features,
            "n_clusters": k, "epoch_s": med["total"], "train_s": med["train"],
            "stats_s": med["stats"], "reduce_s": med["reduce"], "mstep_s": med["mstep"],
            "moves_s": med["moves"],
            "stats_mb": round(8 * 3 * k * (1 + n_features + n_features**2) / 1e6, 2),  # K + 2K sets
        })
    return out

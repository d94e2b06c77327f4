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


class RankLog:
    """Epoch callback run on every rank: appends the rank's record (bytes, peak memory, epoch time,
    whether it was a split round) to DIR/rank<r>.jsonl, so that per-worker figures survive the fit."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = str(directory)

    def __call__(self, rec, engine) -> None:
        import json

        row = {k: getattr(rec, k) for k in ("epoch", "n_clusters", "comm_bytes", "grad_bytes", "peak_memory",
                                            "peak_device_memory", "time_total")}
        row["split"] = rec.splits_proposed > 0
        with open(Path(self.directory) / f"rank{engine.comm.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def bench_workers_scaling(n_samples: int = 40_000, n_features: int = 32, n_clusters: int = 50,
                          workers: Sequence[int] = (1, 2), seed: int = 0, row_dtype: str = "float32",
                          work_dir: str | os.PathLike | None = None, config: dict | None = None) -> list[dict]:
    """W Ray Train CPU workers against one worker on a small ImageNet-like proxy (defaults, moves
    included), one row per worker count: each worker's peak RSS (MB), comm_bytes per epoch
    (median of split rounds and of the other epochs, KB), DDP gradient bytes per epoch (KB), median
    epoch time (s), K, NMI, and ARI against the W = 1 run's assignments. config: FitConfig overrides
    (e.g. a short schedule)."""
    import json
    import warnings

    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from cluster_service.datasets import make_imagenet_proxy
    from cluster_service.io.runs import read_assignments
    from cluster_service.io.shards import write_shards

    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    x, y = make_imagenet_proxy(n_samples, n_features, n_clusters, seed=seed)
    shards = root / "shards"
    if not manifest_path(shards).is_file():
        write_shards(shards, np.arange(n_samples, dtype=np.int64), x, y,
                     rows_per_shard=-(-n_samples // (2 * max(workers))))
    cfg = FitConfig(seed=seed, row_dtype=row_dtype).replace(**(config or {}))
    out, ref = [], None
    for w in workers:
        run_dir, logs = root / f"run-{w}w", root / f"ranks-{w}w"
        if not (run_dir / "summary.json").is_file():  # a finished run in a kept work_dir is read back
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(logs, ignore_errors=True)
            logs.mkdir(parents=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # more workers than cores: each gets its share (Ray would otherwise wait for free CPUs)
                fit_distributed(shards, run_dir, cfg, w, max_failures=0, callbacks=[RankLog(logs)],
                                cpus_per_worker=min(1.0, (os.cpu_count() or 1) / w))
        ranks = [[json.loads(line) for line in (logs / f"rank{r}.jsonl").read_text().splitlines()] for r in range(w)]
        z = read_assignments(run_dir, ["cluster"]).column("cluster").to_numpy()
        ref = z if ref is None else ref
        r0 = ranks[0]
        split = [r["comm_bytes"] for r in r0 if r["split"]]
        other = [r["comm_bytes"] for r in r0[1:] if not r["split"]]
        out.append({
            "workers": w, "n_samples": n_samples, "n_features": n_features, "row_dtype": row_dtype,
            "peak_rss_mb_per_worker": "/".join(f"{max(r['peak_memory'] for r in rk) / 1e6:.0f}" for rk in ranks),
            "peak_bytes": max(max(r["peak_memory"] for r in rk) for rk in ranks),
            "K_median": int(np.median([r["n_clusters"] for r in r0])),
            "comm_kb_split_epoch": round(float(np.median(split)) / 1e3, 1) if split else 0.0,
            "comm_kb_other_epoch": round(float(np.median(other)) / 1e3, 1) if other else 0.0,
            "grad_kb_epoch": round(float(np.median([r["grad_bytes"] for r in r0])) / 1e3, 1),
            "epoch_s": round(float(np.median([r["time_total"] for r in r0[1:]])), 3),
            "K": r0[-1]["n_clusters"], "NMI": round(float(normalized_mutual_info_score(y, z)), 4),
            "ARI_vs_W1": round(float(adjusted_rand_score(ref, z)), 4),
        })
    return out


SHORT_SCHEDULE = {"schedule.epochs": 12, "schedule.warmup_epochs": 2, "schedule.subcluster_start": 2,
                  "schedule.first_split": 5, "schedule.move_period": 4, "schedule.final_epochs": 3,
                  "schedule.freeze_epochs": 1}


def bench_scaling_table(scales: Sequence[tuple[int, Sequence[int]]] = ((128_000, (1, 2, 4)), (1_280_000, (1, 2))),
                        n_features: int = 128, n_clusters: int = 100, seed: int = 0,
                        work_dir: str | os.PathLike | None = None) -> str:
    """The scaling table of issue 42: make_imagenet_proxy(N, 128, 100) at each N with each worker
    count W (Ray Train CPU workers, the defaults on a 12-epoch schedule with one split and one merge
    round, SHORT_SCHEDULE), and beside each measured point the cost model (ops.cost) with its CPU
    constants fitted to all the points of this run."""

    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench-scale-table-"))
    rows = []
    for n, workers in scales:
        for r in bench_workers_scaling(n, n_features, n_clusters, workers, seed, work_dir=root / f"n{n}",
                                       config=SHORT_SCHEDULE):
            rows.append(r)
    import json

    (root / "scaling_rows.json").write_text(json.dumps(rows, indent=1))
    return scaling_markdown(rows, n_features)


def scaling_markdown(rows: list[dict], n_features: int = 128) -> str:
    """The scaling table from bench_workers_scaling rows, the cost model fitted to them beside each."""
    from cluster_service.ops import cost

    def workload(r: dict) -> cost.Workload:
        return cost.Workload.from_config(FitConfig(), r["n_samples"], n_features, r["K_median"], r["workers"])

    device = cost.fit_device([(workload(r), r["epoch_s"], r["peak_bytes"]) for r in rows], cost.DEVICES["cpu"])
    lines = [f"Fitted CPU constants: {device.flops / 1e9:.1f} Gflop/s a worker ({device.parallel:g} at full speed), "
             f"{device.step_overhead * 1e3:.2f} ms a step (+{device.sync_overhead * 1e3:.2f} ms with W > 1), "
             f"{device.epoch_overhead:.2f} s an epoch; base memory {device.base_memory / 1e9:.2f} GB "
             f"(+{device.dist_memory / 1e9:.2f} GB with W > 1); bandwidth {device.bandwidth / 1e9:.0f} GB/s assumed.",
             "", "| rows | W | peak RSS per worker MB (model) | comm KB split epoch / other | grad KB epoch | "
             "epoch s (model) | K | NMI | ARI vs W = 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = cost.estimate(workload(r), device)
        lines.append(f"| {r['n_samples']:,} | {r['workers']} | {r['peak_rss_mb_per_worker']} "
                     f"({e.memory_bytes / 1e6:,.0f}) | {r['comm_kb_split_epoch']:,} / {r['comm_kb_other_epoch']:,} | "
                     f"{r['grad_kb_epoch']:,} | {r['epoch_s']:.2f} ({e.epoch_seconds:.2f}) | {r['K']} | {r['NMI']} | "
                     f"{r['ARI_vs_W1']} |")
    return "\n".join(lines)

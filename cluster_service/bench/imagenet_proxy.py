"""The whole job at ImageNet scale, as a user runs it (make bench: imagenet_proxy, opt-in).

`datasets.make_imagenet_proxy` (1.28M x 128, unit rows, 1,000 components) -> nine tenths as
Parquet shards -> `cluster-service fit shards/` in one process and with `--workers 2` ->
`cluster-service assign` of the held-back tenth; the fits' agreement (ARI of the fit rows against
the first fit: one process, when run). Each command is its own process (wall time and
peak RSS per command); FAISS k-means given the true K is the peer, measured in the same run.

    python -m cluster_service.bench.imagenet_proxy [--n 1280000] [--k 1000] [--workers 1,2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _run(cmd: list[str]) -> tuple[float, float]:
    """Run a CLI command; (wall s, peak RSS GiB of the largest child process so far)."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def _scores(y: np.ndarray, z: np.ndarray) -> dict:
    from cluster_service.report.evaluate import score

    s = score(y, z)
    return {"NMI": round(s.nmi, 3), "ARI": round(s.ari, 3), "ACC": round(s.acc, 3)}


def _assigned(out_dir: Path, ids: np.ndarray) -> np.ndarray:
    import pyarrow.parquet as pq

    from cluster_service.io.runs import assignment_parts

    files = assignment_parts(out_dir) or sorted(out_dir.glob("*.parquet"))
    tables = [pq.read_table(p, columns=["id", "cluster"]) for p in files]
    got = {int(i): int(c) for t in tables for i, c in zip(t["id"].to_numpy(), t["cluster"].to_numpy(), strict=True)}
    return np.array([got[int(i)] for i in ids])


def bench_imagenet_proxy(n: int = 1_280_000, workers: tuple[int, ...] = (1, 2), work: str | None = None,
                         n_clusters: int = 1000) -> list[dict]:
    from sklearn.metrics import adjusted_rand_score

    from cluster_service import index
    from cluster_service.datasets import make_imagenet_proxy
    from cluster_service.io.shards import write_shards

    root = Path(work or tempfile.mkdtemp(prefix="bench-imagenet-proxy-"))
    x, y = make_imagenet_proxy(n, n_clusters=n_clusters)
    k_true = int(y.max()) + 1
    perm = np.random.default_rng(0).permutation(n)
    held, train = np.sort(perm[: n // 10]), np.sort(perm[n // 10 :])
    if not (root / "train" / "_manifest.json").exists():
        write_shards(root / "train", train, x[train], y[train], rows_per_shard=65_536)
        write_shards(root / "held", held, x[held], y[held], rows_per_shard=65_536)
    cli = str(Path(sys.executable).with_name("cluster-service"))
    rows = []
    first = None  # the first run's assignment of the fit rows: the others' ARI against it
    for w in workers:
        run_dir = root / f"fit-w{w}"
        cmd = [cli, "fit", str(root / "train"), "--out", str(run_dir), "--no-report", "--quiet", "--no-tracking"]
        cmd += ["--workers", str(w)] if w > 1 else []
        wall, rss = _run(cmd)
        summary = json.loads((run_dir / "summary.json").read_text())
        fit_z = _assigned(run_dir, train)
        first = fit_z if first is None else first
        held_z = None
        a_wall, a_rss = _run([cli, "assign", str(run_dir), str(root / "held"), "--out", str(root / f"assign-w{w}"),
                              "--local", "--quiet"])
        held_z = _assigned(root / f"assign-w{w}", held)
        rows.append({"run": f"cluster-service fit, {'one process' if w == 1 else f'--workers {w}'}",
                     "rows": f"{train.size:,} fit / {held.size:,} assigned", "K found": summary.get("k_found"),
                     "true K": k_true, **{f"fit {k}": v for k, v in _scores(y[train], fit_z).items()},
                     **{f"held-out {k}": v for k, v in _scores(y[held], held_z).items()},
                     "epochs": summary.get("epochs"), "fit wall s": round(wall, 1), "assign wall s": round(a_wall, 1),
                     "peak RSS GiB (one process)": round(max(rss, a_rss), 2) if w == 1 else "per worker: see note",
                     "stopped": summary.get("stopped", ""),
                     "fit ARI vs the first fit": round(float(adjusted_rand_score(first, fit_z)), 4)})
    t = time.perf_counter()
    centroids = index.kmeans(x[train], k_true, seed=0)
    km_fit = index.assign_nearest(x[train], centroids)
    km_held = index.assign_nearest(x[held], centroids)
    rows.append({"run": "FAISS k-means given the true K", "rows": rows[0]["rows"] if rows else "", "K found": k_true,
                 "true K": k_true, **{f"fit {k}": v for k, v in _scores(y[train], km_fit).items()},
                 **{f"held-out {k}": v for k, v in _scores(y[held], km_held).items()},
                 "epochs": "", "fit wall s": round(time.perf_counter() - t, 1), "assign wall s": "",
                 "peak RSS GiB (one process)": "", "stopped": "", "fit ARI vs the first fit": ""})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_280_000)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (1 = one process)")
    ap.add_argument("--work", default=os.environ.get("BENCH_WORK"), help="working directory (kept)")
    ap.add_argument("--k", type=int, default=1000, help="components of the proxy (a smaller run: --n 128000 --k 100)")
    args = ap.parse_args(argv)
    for r in bench_imagenet_proxy(args.n, tuple(int(w) for w in args.workers.split(",")), args.work, args.k):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

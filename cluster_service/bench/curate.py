"""Near-duplicate detection measured on planted duplicates, and the time of each curation command.

    python -m cluster_service.bench.curate duplicates [--n 1280000] [--k 1000]
        the ImageNet proxy (unit rows, 128-d) with 1 % exact copies, 1 % copies with small noise
        (noise of 10-30 % of the row's length: cosine .96-.995) and 1 % near misses (40-50 %: cosine
        .89-.93) planted; clusters: the generator's components (a fit's stand-in: the search cost
        depends on n, K and d only); precision, recall and seconds at a sweep of thresholds.
    python -m cluster_service.bench.curate moco
        the same on ImageNet-50 MoCo (../shared/data), whose 2,501 rows hold 1,507 distinct ones:
        the repeated rows count as duplicates too.
    python -m cluster_service.bench.curate synthetic-run DIR --n 128000 --k 100
        a run directory without a fit (`synthetic_run`) to time the commands on
    python -m cluster_service.bench.curate commands RUN_DIR
        seconds of `duplicates`, `outliers`, `sample` and `export` on a run, each as its own process.

A pair is right when both rows come from the same original row; precision counts every
(member, representative) pair the grouping made, recall every planted copy grouped with its source.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THRESHOLDS = (0.85, 0.9, 0.93, 0.95, 0.97, 0.99)


def plant(x: np.ndarray, share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (n, d) -> (rows with copies appended, origin (m,) the row each came from, kind (m,) 0 base,
    1 exact copy, 2 noisy copy, 3 near miss (its own origin), source (m,) the copied row or -1)."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    per = int(share * n)
    src = rng.choice(n, 3 * per, replace=False)
    norms = np.linalg.norm(x[src], axis=1, keepdims=True)

    def noisy(rows, lo, hi):
        g = rng.normal(size=(rows.size, d))
        g *= rng.uniform(lo, hi, size=(rows.size, 1)) * norms[: rows.size] / np.linalg.norm(g, axis=1, keepdims=True)
        return x[rows] + g

    parts = [x, x[src[:per]], noisy(src[per:2 * per], 0.1, 0.3), noisy(src[2 * per:], 0.4, 0.5)]
    out = np.concatenate(parts).astype(np.float32)
    if np.allclose(np.linalg.norm(x[:100], axis=1), 1, atol=1e-4):  # unit rows stay unit rows
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    origin = np.concatenate([np.arange(n), src[:2 * per], n + 2 * per + np.arange(per)])
    kind = np.repeat([0, 1, 2, 3], [n, per, per, per])
    source = np.concatenate([np.full(n, -1), src])
    return out, origin, kind, source


def score(dup, origin: np.ndarray, kind: np.ndarray, source: np.ndarray) -> dict:
    """Precision of the (member, representative) pairs, recall of the planted copies (and of all the
    rows that have an identical original), near misses grouped with their source."""
    rows = np.flatnonzero(dup.group >= 0)
    reps = dup.representative[dup.group[rows]]
    pairs = rows != reps
    right = origin[rows[pairs]] == origin[reps[pairs]]
    copies = np.flatnonzero((kind == 1) | (kind == 2))
    found = (dup.group[copies] >= 0) & (dup.group[copies] == dup.group[source[copies]])
    misses = np.flatnonzero(kind == 3)
    joined = (dup.group[misses] >= 0) & (dup.group[misses] == dup.group[source[misses]])
    return {"pairs": int(pairs.sum()), "precision": float(right.mean()) if pairs.any() else 1.0,
            "recall": float(found.mean()), "recall exact": float(found[kind[copies] == 1].mean()),
            "recall noisy": float(found[kind[copies] == 2].mean()), "near misses joined": float(joined.mean())}


def sweep(x, clusters, means, origin, kind, source, thresholds=THRESHOLDS) -> list[dict]:
    from cluster_service.curate.duplicates import find_duplicates

    out = []
    for t in thresholds:
        t0 = time.perf_counter()
        dup = find_duplicates(x, clusters, means, t)
        out.append({"threshold": t, "seconds": round(time.perf_counter() - t0, 1), **score(dup, origin, kind, source)})
        print(json.dumps(out[-1]), flush=True)
    return out


def label_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k = int(y.max()) + 1
    return np.stack([x[y == c].mean(0) if (y == c).any() else np.zeros(x.shape[1]) for c in range(k)])


def bench_proxy(n: int, k: int, thresholds=THRESHOLDS) -> list[dict]:
    from cluster_service.datasets import make_imagenet_proxy

    t0 = time.perf_counter()
    base, y = make_imagenet_proxy(int(n / 1.03), n_clusters=k)
    x, origin, kind, source = plant(base, 0.01)
    clusters = np.concatenate([y, y[source[base.shape[0]:]]])
    print(f"proxy {x.shape[0]} x {x.shape[1]}, K {k}: made in {time.perf_counter() - t0:.0f} s", flush=True)
    return sweep(x, clusters, label_means(x, clusters), origin, kind, source, thresholds)


def bench_moco(path: str = "../shared/data/imagenet50_imb_moco.npz", thresholds=THRESHOLDS) -> list[dict]:
    z = np.load(path)
    base, y = z["X"].astype(np.float32), z["y"].astype(np.int64)
    _, first = np.unique(base, axis=0, return_index=True)
    _, inv = np.unique(base, axis=0, return_inverse=True)
    x, origin, kind, source = plant(base, 0.03)
    origin[: base.shape[0]] = first[inv.ravel()]  # the set's own repeated rows share an origin
    n0 = base.shape[0]
    origin[n0:] = np.where(kind[n0:] == 3, origin[n0:], first[inv.ravel()][source[n0:]])
    clusters = np.concatenate([y, y[source[n0:]]])
    print(f"ImageNet-50 MoCo {x.shape[0]} rows ({len(first)} distinct originals)", flush=True)
    return sweep(x, clusters, label_means(x, clusters), origin, kind, source, thresholds)


def bench_commands(run_dir: str) -> dict:
    """Seconds of each curation command on RUN_DIR as its own process (without the report rebuild)."""
    cli = [sys.executable, "-m", "cluster_service.ops.cli"]
    times = {}
    for name, args in [("duplicates", ["duplicates", run_dir, "--no-report", "--quiet"]),
                       ("outliers", ["outliers", run_dir, "--no-report"]),
                       ("sample", ["sample", run_dir, "--n", "10000", "--no-report"]),
                       ("export csv", ["export", run_dir, "--level", "10", "--out", f"{run_dir}/export.csv"]),
                       ("report (gallery)", ["gallery", run_dir])]:
        t0 = time.perf_counter()
        r = subprocess.run([*cli, *args], capture_output=True, text=True)
        times[name] = round(time.perf_counter() - t0, 1)
        print(name, times[name], r.stdout.strip()[-400:], r.stderr.strip()[-400:], flush=True)
    return times


def spherical_mixture(n: int, k: int, d: int = 128, noise: float = 0.12, seed: int = 0):
    """A fast stand-in for the ImageNet proxy: k random unit means, rows = mean + N(0, noise^2 I),
    L2-normalised (two rows of a component at cosine ~.35, as the proxy's). -> x (n, d) float32, y (n,)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    x = (means[y] + noise * rng.normal(size=(n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


def synthetic_run(out: str | Path, n: int, k: int, seed: int = 0) -> Path:
    """A run directory without a fit, for timing the commands: `spherical_mixture` with 1 % of each
    planted kind, written as shards with (absent) image paths; the model is the components' own
    Gaussians (sample mean and covariance of their rows), its merge tree and novelty calibration
    built as a fit builds them; assignments by that model."""
    import torch

    from cluster_service.core.hierarchy import merge_tree
    from cluster_service.core.niw import NIWPrior, SuffStats
    from cluster_service.io.runs import write_run, write_summary
    from cluster_service.io.shards import write_shards
    from cluster_service.serve.model import FittedModel

    out = Path(out)
    base, y = spherical_mixture(int(n / 1.03), k, seed=seed)
    x, origin, kind, source = plant(base, 0.01, seed)
    y = np.concatenate([y, y[source[base.shape[0]:]]])
    paths = np.array([f"{out}/images/img_{i:07d}.jpg" for i in range(x.shape[0])])
    write_shards(out / "shards", np.arange(x.shape[0]), x, y, paths=paths)
    d = x.shape[1]
    xd = x.astype(np.float64)
    count = np.bincount(y, minlength=k).astype(np.float64)
    total = np.zeros((k, d))
    np.add.at(total, y, xd)
    scatter = np.stack([xd[y == c].T @ xd[y == c] for c in range(k)])
    means = total / count[:, None]
    cov = scatter / count[:, None, None] - means[:, :, None] * means[:, None, :] + 1e-4 * np.eye(d)
    within = (cov * count[:, None, None]).sum(0) / count.sum()
    prior = NIWPrior(1.0, d + 2.0, torch.from_numpy(xd.mean(0)), torch.from_numpy(within))
    tree = merge_tree(prior, 1.0, SuffStats(*(torch.from_numpy(a) for a in (count, total, scatter))))
    model = FittedModel(log_weights=np.log(count / count.sum()), means=means, chol=np.linalg.cholesky(cov),
                        prior={"alpha": 1.0, "kappa": 1.0, "nu": d + 2.0, "mean": xd.mean(0), "psi": within},
                        tree_linkage=tree.linkage, tree_log_ratios=tree.log_ratios, version="synthetic")
    clusters, log_prob, margin = (np.empty(x.shape[0], t) for t in (np.int64, np.float64, np.float64))
    for sl, lj in model._log_joint_blocks(x):
        top2 = np.sort(lj, axis=1)[:, -2:]
        clusters[sl], log_prob[sl], margin[sl] = lj.argmax(1), top2[:, 1], top2[:, 1] - top2[:, 0]
    model.calibrate_novelty(clusters, log_prob)
    write_run(out / "run", model, np.arange(x.shape[0]), clusters, log_prob, margin, {}, [])
    write_summary(out / "run", {"n_samples": x.shape[0], "n_features": d, "k_found": k,
                                "data": str((out / "shards").resolve()), "synthetic": "components as the model"})
    np.savez(out / "truth.npz", origin=origin, kind=kind, source=source)
    return out / "run"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["duplicates", "moco", "commands", "synthetic-run"])
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--n", type=int, default=1_280_000)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    a = p.parse_args(argv)
    ts = tuple(float(t) for t in a.thresholds.split(","))
    if a.what == "duplicates":
        bench_proxy(a.n, a.k, ts)
    elif a.what == "moco":
        bench_moco(thresholds=ts)
    elif a.what == "synthetic-run":
        print(synthetic_run(a.run_dir, a.n, a.k))
    else:
        print(json.dumps(bench_commands(a.run_dir)))


if __name__ == "__main__":
    main()

"""Time to a trustworthy K (make bench: speed), and the CPU scale rows (make bench: scale).

speed: the median of 3 fits with the default settings next to the median of 3 sklearn
BayesianGaussianMixture fits (DP prior, full covariances, 2 x true K components) measured in the
same run, on the sets of the speed issue: a USPS-sized UMAP set (9,298 rows of the shared MNIST
UMAP embeddings; a generated 10-d mixture of that size where ../shared/data is absent), MNIST
UMAP (70k x 10, shared), sklearn digits (PCA-16) and the 60k x 32, K 37 mixture of the quality
section. The reference DeepDPM's times on this machine (its README command) are the issue's:
USPS about 4-5 min, MNIST about 20 min.

scale: one epoch at N = 1.28M, d = 128, K = 1000 and a full default fit at N = 1M, d = 32,
K = 100 (a generated mixture), each in its own process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

from cluster_service.bench.krecovery import SHARED

USPS_ROWS = 9298  # the USPS set's size (train + test)


def speed_sets() -> dict[str, tuple]:
    """name -> loader returning (X float32 (n, d), y (n,))."""
    from cluster_service.datasets import load_digits_pca, make_mixture, make_overlap_mixture

    mnist = SHARED / "mnist_umap.npz"

    def usps_size():
        if not mnist.is_file():
            return make_overlap_mixture(USPS_ROWS, 10, 10, seed=103)
        z = np.load(mnist)
        idx = np.random.default_rng(0).choice(len(z["y"]), USPS_ROWS, replace=False)
        return z["X"][idx].astype(np.float32), z["y"][idx].astype(np.int64)

    out = {f"USPS-size UMAP ({USPS_ROWS} x 10{'' if mnist.is_file() else ', generated'})": usps_size}
    if mnist.is_file():
        out["MNIST UMAP (70k x 10)"] = lambda: (lambda z: (z["X"].astype(np.float32), z["y"]))(np.load(mnist))
    out["sklearn digits PCA-16 (1.8k x 16)"] = lambda: load_digits_pca(16, seed=0)
    out["mixture 60k x 32, K 37 (imbalance 4)"] = lambda: make_mixture(60000, 32, 37, seed=1)
    return out


def _bgm(x: np.ndarray, k_true: int, seed: int) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import BayesianGaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return BayesianGaussianMixture(n_components=2 * k_true, covariance_type="full", max_iter=200,
                                       weight_concentration_prior_type="dirichlet_process",
                                       random_state=seed).fit(x).predict(x)


def bench_speed(reps: int = 3, seed: int = 0) -> list[dict]:
    """One row per (set, method): K, NMI, epochs, median and range of `reps` wall times, ratio to BGM."""
    from cluster_service.config import FitConfig
    from cluster_service.report.evaluate import score
    from cluster_service.train.fit import fit

    rows = []
    for name, load in speed_sets().items():
        x, y = load()
        k_true = int(np.unique(y).size)
        times, res = [], None
        for _ in range(reps):
            t = time.perf_counter()
            res = fit(x, FitConfig(seed=seed))
            times.append(time.perf_counter() - t)
        bgm_times, pred = [], None
        for _ in range(reps):
            t = time.perf_counter()
            pred = _bgm(x, k_true, seed)
            bgm_times.append(time.perf_counter() - t)
        base = statistics.median(bgm_times)
        for method, labels, ts, epochs in (("cluster_service (defaults)", res.clusters, times, len(res.history)),
                                           (f"sklearn BGM ({2 * k_true} comps)", pred, bgm_times, None)):
            s = score(y, labels)
            rows.append({"data": name, "method": method, "K": s.k_found, "NMI": round(s.nmi, 3),
                         "epochs": epochs if epochs is not None else "-",
                         "median s": round(statistics.median(ts), 2),
                         "range s": f"{min(ts):.1f}-{max(ts):.1f}",
                         "time / BGM": round(statistics.median(ts) / base, 2)})
    return rows


# ---- scale rows (each in its own process: peak RSS is per process) ---------------------------------


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def scale_epoch(n: int = 1_280_000, d: int = 128, k: int = 1000) -> dict:
    """One planned epoch without moves at ImageNet scale on this CPU (perf.synthetic_engine)."""
    import torch

    from cluster_service.bench.perf import synthetic_engine, time_epoch

    t = time.perf_counter()
    eng = synthetic_engine(n, d, k, "cpu")
    init_s = time.perf_counter() - t
    rec = time_epoch(eng, repeats=3)  # the first epoch also finds the rows' first candidates
    return {"row": f"one epoch, N={n:,} d={d} K={k}", "threads": torch.get_num_threads(),
            "init s (k-means start)": round(init_s, 1), **{key: round(v, 1) for key, v in rec.items() if key != "K"},
            "peak RSS GiB": round(_peak_rss_gib(), 2)}


def scale_fit(n: int = 1_000_000, d: int = 32, k: int = 100) -> dict:
    """A full fit with the default settings on a generated K-component mixture."""
    from cluster_service.config import FitConfig
    from cluster_service.datasets import make_mixture
    from cluster_service.report.evaluate import score
    from cluster_service.train.fit import fit

    x, y = make_mixture(n, d, k, seed=5)
    t = time.perf_counter()
    res = fit(x, FitConfig(seed=0))
    s = score(y, res.clusters)
    return {"row": f"full fit, N={n:,} d={d} K={k} (defaults)", "wall s": round(time.perf_counter() - t, 1),
            "epochs": len(res.history), "K found": res.n_clusters, "NMI": round(s.nmi, 3),
            "s / epoch": round(float(np.median([r.time_total for r in res.history])), 2),
            "peak RSS GiB": round(_peak_rss_gib(), 2), "stopped": res.history[-1].stopped}


def bench_scale() -> list[dict]:
    """Both scale rows, each measured in a fresh interpreter."""
    rows = []
    for what in ("epoch", "fit"):
        out = subprocess.run([sys.executable, "-m", "cluster_service.bench.speed", "--scale", what],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("epoch", "fit"), help="one scale row, printed as JSON")
    ap.add_argument("--n", type=int, help="rows (default: the row's own)")
    args = ap.parse_args(argv)
    if args.scale == "epoch":
        print(json.dumps(scale_epoch(**({"n": args.n} if args.n else {}))))
    elif args.scale == "fit":
        print(json.dumps(scale_fit(**({"n": args.n} if args.n else {}))))
    else:
        for r in bench_speed():
            print(r)


if __name__ == "__main__":
    main()

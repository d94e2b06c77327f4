"""K recovery across regimes (make bench: krecovery): cluster_service with its defaults against
sklearn's BayesianGaussianMixture (2 x true K components), a GMM and k-means given the true K, on
the real embeddings in ../shared/data (when present; a user's clone has none) and generated hard
mixtures (imbalanced 20:1, overlapping at Bayes accuracy 0.97), plus sklearn digits. One row per
(data set, method): K found, NMI / ARI / ACC, wall seconds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def datasets(include_large: bool = True) -> dict[str, tuple]:
    """name -> (loader, true K). Loaders return (X float32 (n, d), y (n,))."""
    from cluster_service.datasets import load_digits_pca, make_overlap_mixture

    out = {
        "overlap mixture 60k x 32, K 37": (lambda: make_overlap_mixture(60_000, 32, 37, seed=101), 37),
        "sklearn digits PCA-16": (lambda: load_digits_pca(16, seed=0), 10),
    }
    if include_large:
        out["overlap mixture 200k x 64, K 200"] = (lambda: make_overlap_mixture(200_000, 64, 200, seed=102), 200)
    for name, file in (("MNIST UMAP (shared)", "mnist_umap.npz"), ("Fashion UMAP (shared)", "fashion_umap.npz"),
                       ("ImageNet-50-IMB MoCo (shared)", "imagenet50_imb_moco.npz")):
        if (SHARED / file).is_file():
            def load(f=SHARED / file):
                z = np.load(f)
                return z["X"].astype(np.float32), z["y"].astype(np.int64)
            out[name] = (load, None)
    return out


def _peers(x, y, k_true: int, seed: int) -> list[tuple[str, np.ndarray, float]]:
    from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

    from cluster_service import index

    rows = []
    t = time.perf_counter()
    rows.append(("k-means, true K", index.assign_nearest(x, index.kmeans(x, k_true, seed)), time.perf_counter() - t))
    t = time.perf_counter()
    gmm = GaussianMixture(k_true, covariance_type="full", random_state=seed, reg_covar=1e-4).fit(x)
    rows.append(("GMM, true K", gmm.predict(x), time.perf_counter() - t))
    t = time.perf_counter()
    bgm = BayesianGaussianMixture(n_components=2 * k_true, covariance_type="full", random_state=seed,
                                  max_iter=200, reg_covar=1e-4).fit(x)
    rows.append(("sklearn BGM (2 x K comps)", bgm.predict(x), time.perf_counter() - t))
    return rows


def bench_k_recovery(seeds: Sequence[int] = (0, 1, 2), include_large: bool = True) -> list[dict]:
    from cluster_service.config import FitConfig
    from cluster_service.report.evaluate import score
    from cluster_service.train.fit import fit

    table = []
    for name, (load, k_true) in datasets(include_large).items():
        x, y = load()
        k_true = k_true or int(np.unique(y).size)
        for seed in seeds:
            t = time.perf_counter()
            res = fit(x, FitConfig(seed=seed))
            runs = [("cluster_service (defaults)", res.clusters, time.perf_counter() - t)]
            if res.model.tree_linkage is not None and res.n_clusters > k_true:
                runs.append((f"cluster_service, tree cut at K={k_true}", res.model.cut(k_true)[res.clusters], 0.0))
            runs += _peers(x, y, k_true, seed)
            for method, labels, seconds in runs:
                s = score(y, np.asarray(labels))
                table.append({"data": name, "true K": k_true, "seed": seed, "method": method, "K": s.k_found,
                              "NMI": round(s.nmi, 3), "ARI": round(s.ari, 3), "ACC": round(s.acc, 3),
                              "seconds": round(seconds, 1)})
    return table

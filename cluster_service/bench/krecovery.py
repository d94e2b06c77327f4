"""K recovery across regimes (make bench: krecovery; krecovery_large is opt-in): cluster_service
with its defaults against sklearn's BayesianGaussianMixture (2 x true K components), a GMM and
k-means given the true K, on the real embeddings in ../shared/data (when present; a user's clone
has none) and generated hard mixtures (imbalanced 20:1, overlapping at Bayes accuracy 0.97), plus
sklearn digits. Every (data set, method) is run for each seed; the table gives the mean and the
range over seeds of K found, NMI / ARI / ACC, and the mean wall seconds, all from one run."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LARGE = "overlap mixture 200k x 64, K 200"
log = logging.getLogger(__name__)


def datasets(large: bool = False) -> dict[str, tuple]:
    """name -> (loader, true K or None = the labels' count). Loaders return (X float32 (n, d), y (n,)).
    large: only the 200-component mixture (a full fit takes about an hour on 2 cores); else the rest."""
    from cluster_service.datasets import load_digits_pca, make_overlap_mixture

    if large:
        return {LARGE: (lambda: make_overlap_mixture(200_000, 64, 200, seed=102), 200)}
    out = {
        "overlap mixture 60k x 32, K 37": (lambda: make_overlap_mixture(60_000, 32, 37, seed=101), 37),
        "sklearn digits PCA-16": (lambda: load_digits_pca(16, seed=0), 10),
    }
    for name, file in (("MNIST UMAP (shared)", "mnist_umap.npz"), ("Fashion UMAP (shared)", "fashion_umap.npz"),
                       ("ImageNet-50-IMB MoCo (shared)", "imagenet50_imb_moco.npz")):
        if (SHARED / file).is_file():
            def load(f=SHARED / file):
                z = np.load(f)
                return z["X"].astype(np.float32), z["y"].astype(np.int64)
            out[name] = (load, None)
    return out


def _peers(x, y, k_true: int, seed: int, bgm: bool = True) -> list[tuple[str, np.ndarray, float]]:
    from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

    from cluster_service import index

    rows = []
    t = time.perf_counter()
    rows.append(("k-means, true K", index.assign_nearest(x, index.kmeans(x, k_true, seed)), time.perf_counter() - t))
    t = time.perf_counter()
    gmm = GaussianMixture(k_true, covariance_type="full", random_state=seed, reg_covar=1e-4).fit(x)
    rows.append(("GMM, true K", gmm.predict(x), time.perf_counter() - t))
    if bgm:
        t = time.perf_counter()
        model = BayesianGaussianMixture(n_components=2 * k_true, covariance_type="full", random_state=seed,
                                        max_iter=200, reg_covar=1e-4).fit(x)
        rows.append(("sklearn BGM (2 x K comps)", model.predict(x), time.perf_counter() - t))
    return rows


def k_recovery_rows(seeds: Sequence[int], sets: dict[str, tuple], bgm: bool = True) -> list[dict]:
    """One row per (data set, seed, method): K found, NMI / ARI / ACC, wall seconds."""
    from cluster_service.config import FitConfig
    from cluster_service.report.evaluate import score
    from cluster_service.train.fit import fit

    table = []
    for name, (load, k_true) in sets.items():
        x, y = load()
        k_true = k_true or int(np.unique(y).size)
        for seed in seeds:
            t = time.perf_counter()

            def progress(rec, _engine, name=name, seed=seed, t=t):
                log.info("%s seed %d: epoch %d K %d (%.0f s)", name, seed, rec.epoch, rec.n_clusters,
                         time.perf_counter() - t)

            res = fit(x, FitConfig(seed=seed), callbacks=[progress])
            runs = [("cluster_service (defaults)", res.clusters, time.perf_counter() - t)]
            family = res.engine.prior.family
            if res.model.tree_linkage is not None and res.n_clusters > k_true:
                runs.append(("cluster_service, tree cut at true K", res.model.cut(k_true)[res.clusters], 0.0))
            log.info("%s seed %d: K %d after %.0f s; peers next", name, seed, res.n_clusters, runs[0][2])
            runs += _peers(x, y, k_true, seed, bgm)
            for method, labels, seconds in runs:
                s = score(y, np.asarray(labels))
                table.append({"data": name, "true K": k_true, "seed": seed, "method": method, "K": s.k_found,
                              "NMI": s.nmi, "ARI": s.ari, "ACC": s.acc, "seconds": seconds,
                              "family": family if method.startswith("cluster_service") else "-"})
    return table


def summary_table(rows: list[dict]) -> str:
    """Markdown: per (data set, method) the mean (min-max) over seeds."""
    groups: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["data"], r["true K"], r["method"])].append(r)

    def spread(vals: list[float], fmt: str) -> str:
        lo, hi, mean = min(vals), max(vals), float(np.mean(vals))
        return format(mean, fmt) if lo == hi else f"{mean:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"

    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean (min-max) over seeds. The tree cut row is the same fit "
             "cut at the true K (absent when K found <= true K on every seed).", "",
             "| data | true K | method | K found | NMI | ARI | ACC | family | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (data, k_true, method), rs in groups.items():
        lines.append(f"| {data} | {k_true} | {method} | {spread([r['K'] for r in rs], '.1f')} | "
                     f"{spread([r['NMI'] for r in rs], '.3f')} | {spread([r['ARI'] for r in rs], '.3f')} | "
                     f"{spread([r['ACC'] for r in rs], '.3f')} | {'/'.join(sorted({r['family'] for r in rs}))} | "
                     f"{np.mean([r['seconds'] for r in rs]):.1f} |")
    return "\n".join(lines)


def bench_k_recovery(seeds: Sequence[int] = (0, 1, 2)) -> str:
    """Every set but the 200-component mixture, each seed, defaults and all peers."""
    return summary_table(k_recovery_rows(seeds, datasets()))


def bench_k_recovery_large(seeds: Sequence[int] = (0,)) -> str:
    """The 200-component mixture (200k x 64): defaults, k-means and a GMM given K = 200 (sklearn's BGM
    with 400 components is left out: hours on 2 cores)."""
    return summary_table(k_recovery_rows(seeds, datasets(large=True), bgm=False))


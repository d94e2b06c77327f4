"""Novelty: how unusual a row is for the cluster it was assigned to, calibrated on the training data.

At fit time the model stores, for every cluster k, quantiles of log N(x; mu_k, Sigma_k) over its own
training rows (`novelty_table`). A new row x assigned to k gets its tail probability

    tail(x) = P_train[ log N(x'; mu_k, Sigma_k) <= log N(x; mu_k, Sigma_k) | x' in cluster k ]

read off those quantiles (piecewise linear), `novelty = 1 - tail`, and `novel = tail < fpr`. With the
default fpr = 0.01, about 1% of training-like rows are flagged (the false-positive rate on training
data, by construction), and rows far from every cluster (tail ~ 0) are. The cluster's own density,
not the mixture's, is compared, so small clusters are not flagged for being small. Clusters with fewer
than `min_members` training rows use the quantiles pooled over all clusters.
"""

from __future__ import annotations

import numpy as np

from cluster_service.config import NOVELTY_FPR

DEFAULT_FPR = NOVELTY_FPR
# Tail levels at which quantiles are stored: fine in the lower tail, where thresholds live.
LEVELS = np.array([0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])


def novelty_table(clusters: np.ndarray, log_density: np.ndarray, n_clusters: int,
                  min_members: int = 50) -> dict[str, np.ndarray]:
    """Calibration from the training rows: clusters (n,) assigned cluster; log_density (n,)
    log N(x; mu_k, Sigma_k) of that cluster. Returns arrays: levels (L,), quantiles (K, L) (rows of
    small clusters are the pooled quantiles), train_counts (K,)."""
    clusters, log_density = np.asarray(clusters), np.asarray(log_density, dtype=np.float64)
    pooled = np.quantile(log_density, LEVELS) if log_density.size else np.zeros(LEVELS.size)
    quantiles = np.tile(pooled, (n_clusters, 1))
    counts = np.bincount(clusters, minlength=n_clusters).astype(np.int64)
    order = np.argsort(clusters, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    for k in np.flatnonzero(counts >= min_members):
        quantiles[k] = np.quantile(log_density[order[bounds[k]:bounds[k + 1]]], LEVELS)
    return {"levels": LEVELS.copy(), "quantiles": quantiles, "train_counts": counts}


def tail_probability(table: dict[str, np.ndarray], clusters: np.ndarray, log_density: np.ndarray) -> np.ndarray:
    """(n,) fraction of the assigned cluster's training rows whose log-density is at most the row's."""
    q, levels = table["quantiles"][clusters], table["levels"]  # (n, L): each row's own cluster's quantiles
    x = np.asarray(log_density, dtype=np.float64)
    # np.interp per row, vectorised: the bracketing quantiles and a linear step between them
    hi = np.clip((q <= x[:, None]).sum(1), 1, levels.size - 1)
    rows = np.arange(x.size)
    q0, q1 = q[rows, hi - 1], q[rows, hi]
    frac = np.where(q1 > q0, (x - q0) / np.where(q1 > q0, q1 - q0, 1.0), 1.0)
    tail = levels[hi - 1] + np.clip(frac, 0.0, 1.0) * (levels[hi] - levels[hi - 1])
    return np.where(x < q[:, 0], 0.0, np.where(x >= q[:, -1], 1.0, tail))


def share_drift(counts: np.ndarray, train_counts: np.ndarray) -> float:
    """Total variation distance between the clusters' shares of `counts` and of the training rows."""
    p = counts / max(counts.sum(), 1)
    t = train_counts / max(train_counts.sum(), 1)
    return float(0.5 * np.abs(p - t).sum())

"""Novelty: how unusual a row is for the cluster it was assigned to, calibrated on the training data.

At fit time the model stores, for every cluster k, quantiles of log N(x; mu_k, Sigma_k) over its own
training rows, each scored as if it had been held out (`leave_one_out_log_density`: the cluster's NIW
MAP estimate without that row: a covariance fitted on a row flatters it, so with few rows per
dimension held-out rows of the same class would otherwise look novel; measured in
docs/ARCHITECTURE.md, "Novelty"), in `novelty_table`. A new row x assigned to k gets its tail
probability

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


def leave_one_out_log_density(log_density: np.ndarray, counts: np.ndarray, logdet: np.ndarray, kappa: float,
                              nu: float, n_features: int, family: str = "full") -> np.ndarray:
    """log N(x_i; mu_-i, Sigma_-i) of training rows under their cluster's NIW MAP estimate without row i.

    log_density (n,): log N(x_i; mu, Sigma) with the fitted cluster; counts (n,): rows N of that
    cluster; logdet (n,): log |Sigma| of it; kappa, nu: the NIW prior's. With the posterior scale
    A = nu_N psi_N = (nu_N + d + 2) Sigma (the MAP form, niw.map_estimate), removing x gives
    A_-i = A - c u u^T with u = x - mu and c = kappa_N / (kappa_N - 1), and x - mu_-i = c u; the
    Mahalanobis term and log-determinant follow from q = u^T A^-1 u by Sherman-Morrison and the
    matrix determinant lemma, so each row costs O(1) given its density. (The fitted Sigma is taken
    as the MAP of its N hard rows; the net's soft weights make that approximate.) family "diag": the
    same rank-one correction of the diagonal scale A = (nu_N + 3) Sigma, which leaves out the
    off-diagonal part of u u^T (an approximation that needs only the density)."""
    d = n_features
    ld, n, logdet = (np.asarray(v, dtype=np.float64) for v in (log_density, counts, logdet))
    const = -0.5 * d * np.log(2 * np.pi)
    maha2 = np.maximum(-2.0 * (ld - const + 0.5 * logdet), 0.0)
    kappa_n, scale = kappa + n, nu + n + (d + 2 if family == "full" else 3)
    c = kappa_n / (kappa_n - 1.0)
    q = maha2 / scale
    rest = np.maximum(1.0 - c * q, 1e-12)  # > 0 for a PD A_-i; a row that alone spans a direction
    maha2_loo = c * c * (scale - 1.0) * q / rest
    logdet_loo = logdet + d * np.log(scale) + np.log(rest) - d * np.log(scale - 1.0)
    return const - 0.5 * logdet_loo - 0.5 * maha2_loo


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


def share_drift(counts: np.ndarray, train_counts: np.ndarray) -> float | None:
    """Total variation distance between the clusters' shares of `counts` (K,) and of the training
    rows (K,); None when either has no rows (shares of nothing are not a distribution)."""
    if counts.sum() == 0 or train_counts.sum() == 0:
        return None
    return float(0.5 * np.abs(counts / counts.sum() - train_counts / train_counts.sum()).sum())

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
# Bins of each cluster's calibration histogram (novelty_table): quantiles within 1/1024 of the
# cluster's log-density range; the all-reduced summary is (K + 1) x 1024 float64.
HIST_BINS = 1024
# The coarse grid that finds each cluster's lower tail: COARSE_BINS bins of sign(x) log(1 + |x|)
# over +-COARSE_LIMIT (|x| up to 1e26; a bin is a factor 1.13 in 1 + |x|).
COARSE_BINS, COARSE_LIMIT = 1024, 60.0


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


def _same(a: np.ndarray) -> np.ndarray:
    return a


def novelty_table(clusters: np.ndarray, log_density: np.ndarray, n_clusters: int, min_members: int = 50,
                  reduce_sum=_same, reduce_max=_same, n_bins: int = HIST_BINS) -> dict[str, np.ndarray]:
    """Calibration from the training rows: clusters (n,) assigned cluster; log_density (n,)
    log N(x; mu_k, Sigma_k) of that cluster. Returns arrays: levels (L,), quantiles (K, L) (rows of
    small clusters are the pooled quantiles), train_counts (K,).

    The quantiles are read off mergeable summaries, so that the rows may sit in many processes
    (`reduce_sum` / `reduce_max`: identity in one process, all-reduces of (K + 1, ...) arrays in a
    distributed fit, whatever n is): each cluster's exact range (and the pooled one, row K); a
    coarse histogram on a fixed grid of sign(x) log(1 + |x|), which finds where each cluster's
    lowest stored level (LEVELS[1]) lies whatever outliers the range holds (a row alone on a
    direction scores -1e20); then n_bins equal bins from there to the maximum, the rows below in
    one more bin. A quantile is within one fine bin of the rows' exact one; level 0 is the exact
    minimum."""
    clusters, log_density = np.asarray(clusters, dtype=np.int64), np.asarray(log_density, dtype=np.float64)
    groups = np.concatenate([clusters, np.full(clusters.size, n_clusters)])  # each row in its cluster and pooled
    values = np.concatenate([log_density, log_density])
    ranges = reduce_max(density_ranges(groups, values, n_clusters + 1))
    lo, hi = -ranges[:, 0], ranges[:, 1]
    t_edges = np.linspace(-COARSE_LIMIT, COARSE_LIMIT, COARSE_BINS + 1)
    coarse = reduce_sum(_histograms(groups, _signed_log(values), t_edges[:1], t_edges[-1:], COARSE_BINS,
                                    n_clusters + 1))
    counts = coarse.sum(1)
    cum = np.cumsum(coarse, axis=1)
    j = (cum < (LEVELS[1] * counts)[:, None]).sum(1)  # the coarse bin holding level LEVELS[1]
    start = np.clip(_signed_exp(t_edges[j]), lo, hi)  # fewer than LEVELS[1] of the rows lie below
    fine = reduce_sum(_histograms(groups, values, start, hi, n_bins, n_clusters + 1, underflow=True))
    pooled = _histogram_quantiles(fine[-1], lo[-1], start[-1], hi[-1]) if counts[-1] > 0 else np.zeros(LEVELS.size)
    quantiles = np.tile(pooled, (n_clusters, 1))
    for k in np.flatnonzero(counts[:-1] >= min_members):
        quantiles[k] = _histogram_quantiles(fine[k], lo[k], start[k], hi[k])
    return {"levels": LEVELS.copy(), "quantiles": quantiles, "train_counts": np.rint(counts[:-1]).astype(np.int64)}


def density_ranges(groups: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, 2) float64: (-min, max) of values (n,) per group of groups (n,); -inf where a
    group has no row. Both columns merge by a maximum."""
    out = np.full((n_groups, 2), -np.inf)
    np.maximum.at(out[:, 0], groups, -values)
    np.maximum.at(out[:, 1], groups, values)
    return out


def _histograms(groups: np.ndarray, values: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_bins: int,
                n_groups: int, underflow: bool = False) -> np.ndarray:
    """(n_groups, n_bins [+ 1]) float64 counts of values (n,) on each group's n_bins equal bins over
    [lo, hi] ((n_groups,) or (1,) each; values outside go to the end bins), with underflow a first
    bin of the values below lo."""
    lo, hi = (np.broadcast_to(v, (n_groups,))[groups] for v in (lo, hi))
    width = np.where(hi > lo, hi - lo, 1.0)
    b = np.clip(np.floor((values - lo) / width * n_bins), 0, n_bins - 1).astype(np.int64)
    if underflow:
        b = np.where(values < lo, 0, b + 1)
    size = n_bins + underflow
    return np.bincount(groups * size + b, minlength=n_groups * size).reshape(n_groups, size).astype(np.float64)


def _histogram_quantiles(hist: np.ndarray, lo: float, start: float, hi: float) -> np.ndarray:
    """(L,) the LEVELS quantiles of the rows counted in hist (1 + n_bins,): the rows in [lo, start)
    then n_bins equal bins over [start, hi]; rows spread evenly inside a bin."""
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    edges = np.concatenate([[lo], np.linspace(start, hi, hist.size)])
    target = LEVELS * cum[-1]
    j = np.clip(np.searchsorted(cum, target, side="left"), 1, hist.size)  # first edge with cum >= target
    step = cum[j] - cum[j - 1]
    frac = np.where(step > 0, (target - cum[j - 1]) / np.where(step > 0, step, 1.0), 0.0)
    out = edges[j - 1] + frac * (edges[j] - edges[j - 1])
    out[0] = lo  # level 0: the minimum itself
    return out


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.clip(np.sign(x) * np.log1p(np.abs(x)), -COARSE_LIMIT, COARSE_LIMIT)


def _signed_exp(t: np.ndarray) -> np.ndarray:
    return np.sign(t) * np.expm1(np.abs(t))


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

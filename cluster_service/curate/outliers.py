"""Outliers: every row's calibrated outlier score, and the most unusual rows per cluster and overall.

The score is the model's novelty (serve.novelty): 1 - the row's tail probability among its
cluster's training rows by log N(x; mu_k, Sigma_k), each training row scored as if held out. The
run's own rows are training rows, so each is scored held out too (its leave-one-out density against
the held-out quantiles, the calibration's own comparison; its in-sample density would flatter it:
with 3 rows per dimension no row of a 128-d cluster reached the 1 % tail). A score of .99 means 99 %
of the cluster's training rows are more typical; rows with the same score to 3 decimals (those
beyond every stored quantile score 1) are ordered by their log-density (lowest first).
"""

from __future__ import annotations

import numpy as np

from cluster_service.config import NOVELTY_FPR
from cluster_service.curate.run import FittedRun, id_column, members, path_column


def outlier_scores(run: FittedRun) -> tuple[np.ndarray, np.ndarray]:
    """(score (n,) in [0, 1], log_density (n,) held-out log N(x; mu_k, Sigma_k) of the assigned cluster)."""
    import torch

    from cluster_service.core.niw import logdet_from_cholesky
    from cluster_service.serve.novelty import leave_one_out_log_density, tail_probability

    model = run.model
    if model.novelty is None:
        raise ValueError(f"{run.run_dir}: its model has no novelty calibration (fitted before it existed); "
                         "refit it with this version")
    c = run.clusters
    counts = np.bincount(c, minlength=model.n_clusters)
    logdet = logdet_from_cholesky(torch.from_numpy(model.chol)).numpy()
    held_out = leave_one_out_log_density(run.log_prob - model.log_weights[c], counts[c], logdet[c],
                                         float(model.prior["kappa"]), float(model.prior["nu"]), model.n_features,
                                         model.prior["family"])
    return 1.0 - tail_probability(model.novelty, c, held_out), held_out


def flagged(run: FittedRun, fpr: float = NOVELTY_FPR) -> np.ndarray:
    """(n,) bool: rows in their cluster's `fpr` tail (held out), the outliers `sample --drop-outliers` leaves out."""
    return outlier_scores(run)[0] > 1.0 - fpr


def rank_outliers(score: np.ndarray, log_density: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`rows` most unusual first: highest score to 3 decimals, then lowest log-density. (Scores are
    interpolated between 12 stored quantiles; a cluster's least typical training row sits at its
    lowest quantile and scores 1 - 1e-6 or so, not 1, which must not put it behind a row of another
    cluster that is far less unusual.)"""
    return rows[np.lexsort((log_density[rows], -np.round(score[rows], 3)))]


def top_outliers(run: FittedRun, per_cluster: int, overall: int):
    """outliers.parquet: the `per_cluster` most unusual rows of every cluster and the `overall` most
    unusual of all: id, cluster, score, log_density, rank_in_cluster (1 = most unusual),
    rank_overall (null outside the overall top), path (null when unknown); most unusual first."""
    import pyarrow as pa

    if per_cluster < 0 or overall < 0 or per_cluster + overall == 0:
        raise ValueError(f"--per-cluster and --top must be >= 0 and not both 0, got {per_cluster} and {overall}")
    score, log_density = outlier_scores(run)
    n = run.n_rows
    rank_in = np.zeros(n, np.int64)
    for rows in members(run.clusters, run.n_clusters):
        ranked = rank_outliers(score, log_density, rows)
        rank_in[ranked] = np.arange(1, ranked.size + 1)
    ranked_all = rank_outliers(score, log_density, np.arange(n))
    rank_all = np.zeros(n, np.int64)
    rank_all[ranked_all[:overall]] = np.arange(1, min(overall, n) + 1)
    chosen = np.flatnonzero(((rank_in >= 1) & (rank_in <= per_cluster)) | (rank_all > 0))
    chosen = rank_outliers(score, log_density, chosen)
    return pa.table({
        "id": id_column(run.ids[chosen]),
        "cluster": pa.array(run.clusters[chosen].astype(np.int32)),
        "score": pa.array(score[chosen].astype(np.float32)),
        "log_density": pa.array(log_density[chosen].astype(np.float32)),
        "rank_in_cluster": pa.array(rank_in[chosen].astype(np.int32)),
        "rank_overall": pa.array(rank_all[chosen].astype(np.int32), mask=rank_all[chosen] == 0),
        "path": path_column(run.paths, chosen),
    })

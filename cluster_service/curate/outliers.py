"""Outliers: every row's calibrated outlier score, and the most unusual rows per cluster and overall.

The score is the model's novelty (serve.novelty): 1 - the row's tail probability among its
cluster's training rows by log N(x; mu_k, Sigma_k), each training row scored as if held out. A
score of .99 means 99 % of the cluster's training rows are more typical; rows beyond every stored
quantile score 1 and are ordered among themselves by their log-density (lowest first).
"""

from __future__ import annotations

import numpy as np

from cluster_service.curate.run import FittedRun, id_column, members, path_column


def outlier_scores(run: FittedRun) -> tuple[np.ndarray, np.ndarray]:
    """(score (n,) in [0, 1], log_density (n,) log N(x; mu_k, Sigma_k) of the assigned cluster)."""
    model = run.model
    if model.novelty is None:
        raise ValueError(f"{run.run_dir}: its model has no novelty calibration (fitted before it existed); "
                         "refit it with this version")
    log_density = run.log_prob - model.log_weights[run.clusters]
    score, _ = model.novelty_of(run.clusters, run.log_prob, 0.0)
    return score, log_density


def rank_outliers(score: np.ndarray, log_density: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`rows` most unusual first: highest score, then lowest log-density."""
    return rows[np.lexsort((log_density[rows], -score[rows]))]


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

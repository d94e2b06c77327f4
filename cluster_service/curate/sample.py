"""Balanced samples: M rows spread as evenly as the clusters allow, optionally first over the groups
of a level of the merge tree and then over each group's clusters (the hierarchical balancing of
Vo et al. 2024, "Automatic data curation for self-supervised learning", used for DINOv2's data).

    balanced_counts(available, n)   how many rows each group gives: equal shares, capped at what a
                                    group holds, the rest shared again among the groups left
    draw_sample(...)                the rows: within a cluster uniformly at random (seeded)
"""

from __future__ import annotations

import numpy as np

from cluster_service.curate.run import FittedRun, id_column, members, path_column


def balanced_counts(available: np.ndarray, n: int) -> np.ndarray:
    """(G,) rows available per group, n to draw -> (G,) int64 rows per group summing to
    min(n, available.sum()): every group gets the same count or all it has; when the count does
    not divide evenly, the groups with the most rows left give one more."""
    available = np.asarray(available, np.int64)
    take = np.zeros_like(available)
    remaining = min(int(n), int(available.sum()))
    while remaining > 0:
        open_ = np.flatnonzero(take < available)
        share = remaining // open_.size
        if share == 0:
            left = (available - take)[open_]
            take[open_[np.argsort(-left, kind="stable")[:remaining]]] += 1
            break
        add = np.minimum(share, available[open_] - take[open_])
        take[open_] += add
        remaining -= int(add.sum())
    return take


def rows_of_ids(run: FittedRun, ids: np.ndarray) -> np.ndarray:
    """Row indices of `ids` in the run's assignments (ids not there are dropped)."""
    order = np.argsort(run.ids, kind="stable")
    pos = np.clip(np.searchsorted(run.ids[order], ids), 0, max(run.n_rows - 1, 0))
    hit = run.ids[order][pos] == ids
    return order[pos[hit]]


def draw_sample(run: FittedRun, n: int, level: int | None = None, exclude: np.ndarray | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows (m,) of the sample, ascending; group (K,) of each cluster at `level`, or None).

    Balanced over clusters, or over the `level` groups of the merge tree and within each over its
    clusters; `exclude` (n,) bool rows never drawn (duplicates kept once, outliers)."""
    eligible = np.ones(run.n_rows, bool) if exclude is None else ~np.asarray(exclude, bool)
    if n <= 0:
        raise ValueError(f"--n must be > 0, got {n}")
    if n > int(eligible.sum()):
        left_out = run.n_rows - int(eligible.sum())
        raise ValueError(f"--n {n} is more than the {int(eligible.sum())} rows of {run.run_dir} that can be drawn"
                         + (f" ({run.n_rows} rows, {left_out} left out as duplicates or outliers)" if left_out else ""))
    k = run.n_clusters
    pool = [rows[eligible[rows]] for rows in members(run.clusters, k)]
    available = np.array([p.size for p in pool], np.int64)
    group = None
    if level is None:
        per_cluster = balanced_counts(available, n)
    else:
        group = run.model.cut(run.model.cut_level(k=level))
        per_group = balanced_counts(np.bincount(group, weights=available, minlength=level).astype(np.int64), n)
        per_cluster = np.zeros(k, np.int64)
        for g in range(level):
            inside = np.flatnonzero(group == g)
            per_cluster[inside] = balanced_counts(available[inside], per_group[g])
    rng = np.random.default_rng(seed)
    picked = [rng.choice(pool[c], size=per_cluster[c], replace=False) for c in range(k) if per_cluster[c]]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64), group


def sample_table(run: FittedRun, rows: np.ndarray, group: np.ndarray | None):
    """sample.parquet: id, path (null when unknown), cluster, and with a tree level its group."""
    import pyarrow as pa

    cols = {"id": id_column(run.ids[rows]), "path": path_column(run.paths, rows),
            "cluster": pa.array(run.clusters[rows].astype(np.int32))}
    if group is not None:
        cols["group"] = pa.array(group[run.clusters[rows]].astype(np.int32))
    return pa.table(cols)

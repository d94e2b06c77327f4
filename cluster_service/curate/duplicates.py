"""Near-duplicate groups: rows whose cosine similarity is at least a threshold, found with FAISS
inside each cluster and its nearest clusters (never all pairs), grouped without chaining.

Similarity is the cosine of the rows after subtracting the data's mean, so that features sharing
one direction (ReLU backbones, un-normalised data) do not all look alike; an exact copy has 1.

    find_duplicates(x, clusters, means, threshold)  -> Duplicates (group and similarity per row)
    duplicates_table(run, dup)                      the rows of duplicates.parquet

Grouping (`group_pairs`): rows are taken in order of how many near-duplicates they have (most
first); a row not yet grouped becomes a representative and takes every ungrouped row within the
threshold of itself. So every member is within the threshold of its group's representative; a
chain a ~ b ~ c with a !~ c never puts a and c together through b.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cluster_service import index
from cluster_service.config import DUPLICATE_THRESHOLD
from cluster_service.curate.run import FittedRun, id_column, members, path_column

DEFAULT_THRESHOLD = DUPLICATE_THRESHOLD
# Clusters searched beside a row's own: near-duplicates on a border fall in a neighbour.
NEIGHBOUR_CLUSTERS = 3


@dataclass(frozen=True)
class Duplicates:
    """group (n,) int64, -1 for rows in no group; representative (G,) row index of each group's
    representative; similarity (n,) float32 cosine to the representative (1 for it, NaN outside
    groups); pairs: near-duplicate pairs found (each once)."""

    group: np.ndarray
    representative: np.ndarray
    similarity: np.ndarray
    pairs: int

    @property
    def n_groups(self) -> int:
        return int(self.representative.size)

    @property
    def n_rows(self) -> int:
        return int((self.group >= 0).sum())

    @property
    def removable(self) -> np.ndarray:
        """Rows that are near-duplicates of another row kept: in a group, not its representative."""
        keep = np.zeros(self.group.size, bool)
        keep[self.representative] = True
        return (self.group >= 0) & ~keep


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1] (a cosine similarity; 1: exact copies), got {threshold}")
    return float(threshold)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, d) float32 rows minus the data mean, scaled to unit length (cosine = inner product)."""
    z = np.asarray(x, dtype=np.float32) - np.asarray(x, dtype=np.float64).mean(0).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)


def candidate_pairs(z: np.ndarray, clusters: np.ndarray, means: np.ndarray, threshold: float,
                    n_neighbours: int = NEIGHBOUR_CLUSTERS,
                    progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b) of unit rows z (n, d) with z_a . z_b >= threshold, searching each cluster's rows
    against its own and its `n_neighbours` nearest clusters' (by mean, means (K, d)) rows.
    -> (a (p,), b (p,), similarity (p,)), each pair once."""
    k = means.shape[0]
    rows_of = members(clusters, k)
    near = index.nearest_clusters(means, min(n_neighbours, k - 1)).numpy() if k > 1 else np.zeros((1, 0), int)
    found_a, found_b, found_s = [], [], []
    done = 0
    for c in range(k):
        own = rows_of[c]
        if own.size == 0:
            continue
        pool = np.concatenate([own, *(rows_of[b] for b in near[c] if b >= 0)])
        qi, ki, sims = index.pairs_within(z[own], z[pool], threshold)
        a, b = own[qi], pool[ki]
        keep = a < b  # each pair once; a row's match with itself dropped
        found_a.append(a[keep])
        found_b.append(b[keep])
        found_s.append(sims[keep])
        done += own.size
        if progress is not None:
            progress(done, clusters.size)
    if not found_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)
    # a pair across two clusters that list each other as neighbours is found twice
    _, first = np.unique(a * clusters.size + b, return_index=True)
    return a[first], b[first], s[first]


def group_pairs(n: int, a: np.ndarray, b: np.ndarray, sims: np.ndarray) -> Duplicates:
    """Groups of n rows from near-duplicate pairs (a, b, similarity), without chaining (module doc)."""
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    sim = np.concatenate([sims, sims]).astype(np.float32)
    order = np.lexsort((dst, src))
    src, dst, sim = src[order], dst[order], sim[order]
    starts = np.searchsorted(src, np.arange(n + 1))
    degree = np.diff(starts)
    group = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    reps = []
    for r in np.lexsort((np.arange(n), -degree))[: int((degree > 0).sum())]:  # most pairs first, then row
        if group[r] >= 0:
            continue
        nbr, s = dst[starts[r]:starts[r + 1]], sim[starts[r]:starts[r + 1]]
        free = group[nbr] < 0
        if not free.any():
            continue
        group[r], similarity[r] = len(reps), 1.0
        group[nbr[free]], similarity[nbr[free]] = len(reps), s[free]
        reps.append(r)
    return Duplicates(group, np.asarray(reps, np.int64), similarity, int(a.size))


def find_duplicates(x: np.ndarray, clusters: np.ndarray, means: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                    n_neighbours: int = NEIGHBOUR_CLUSTERS,
                    progress: Callable[[int, int], None] | None = None) -> Duplicates:
    """Near-duplicate groups of rows x (n, d) assigned to clusters (n,) with cluster means (K, d)."""
    check_threshold(threshold)
    a, b, s = candidate_pairs(unit_rows(x), clusters, means, threshold, n_neighbours, progress)
    return group_pairs(x.shape[0], a, b, s)


def duplicates_table(run: FittedRun, dup: Duplicates):
    """duplicates.parquet: one row per member of a group, representative first, then by similarity:
    id, group, representative (its id), similarity, cluster, path (null when unknown)."""
    import pyarrow as pa

    rows = np.flatnonzero(dup.group >= 0)
    rows = rows[np.lexsort((-dup.similarity[rows], dup.group[rows]))]
    return pa.table({
        "id": id_column(run.ids[rows]),
        "group": pa.array(dup.group[rows]),
        "representative": id_column(run.ids[dup.representative[dup.group[rows]]]),
        "similarity": pa.array(dup.similarity[rows]),
        "cluster": pa.array(run.clusters[rows].astype(np.int32)),
        "path": path_column(run.paths, rows),
    })

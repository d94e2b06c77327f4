"""The moves of an epoch as the engine runs them: statistics all-reduced, rank 0 decides
(core.moves, with the engine's move generator), the decision is broadcast, and every rank applies
it through the one change-of-K event, `Engine.rebuild_for_k`. Each step takes the engine
(train.engine.Engine) whose epoch it is.

    prune_step   clusters below moves.prune_below points go
    split_step   each cluster's two subclusters, or the best level of the merge tree of its k-means cells
    merge_step   nearest cluster pairs (FAISS), each cluster in at most one merge
    delete_step  the largest clusters' rows regrouped by their runner-up clusters
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cluster_service import index as faiss_index
from cluster_service.core import moves as mv
from cluster_service.core.gaussian import add_grouped_stats_, add_hard_stats_, iter_chunks, stats_chunk_rows
from cluster_service.core.niw import STAT_DTYPE, SuffStats


def split_cells(count: int, n_features: int, max_cells: int) -> int:
    """k-means cells used to propose splits of a cluster of `count` rows: one per 2 (d + 2) rows
    (enough for a full covariance), at least 2, at most max_cells (moves.split_cells)."""
    return max(2, min(max_cells, int(count) // (2 * (n_features + 2))))


def cells_per_cluster(engine, counts: torch.Tensor) -> list[int]:
    """split_cells of each cluster. counts: (K,)."""
    return [split_cells(c, engine.n_features, engine.cfg.moves.split_cells) for c in counts.tolist()]


@torch.no_grad()
def cell_stats(engine, n_cells: list[int]) -> SuffStats:
    """Statistics of k-means cells inside every cluster, batch shape (K, max n_cells).

    Rows go to their exact MAP cluster; rank 0 runs k-means (n_cells[k] cells) on a sample of
    cluster k, its moves.split_sample_per_cell * n_cells[k] rows of smallest key
    (train.rows.sample_per_group: the same rows in every worker layout, at most that many from
    each rank), and broadcasts the
    centroids; every rank bins its own rows by the nearest centroid of their cluster; one
    all-reduce. Unused cells stay empty.
    """
    K, d, M = engine.n_clusters, engine.n_features, max(n_cells)
    z = torch.from_numpy(engine.assign()[0]).to(engine.device)
    # keyed rows: k-means starts from each cluster's rows of smallest key, so a boundary row that
    # another worker layout puts in another cluster (float rounding) rarely changes a cluster's
    # start (index.kmeans)
    cap = engine.cfg.moves.split_sample_per_cell * torch.tensor(n_cells, device=engine.device)
    xs, zs, keys = engine.rows.sample_per_group(z, cap, engine.cfg.seed)
    centroids = None
    if engine.comm.rank == 0:
        centroids = np.full((K, M, d), np.inf, dtype=np.float32)
        zc, keys = zs.cpu().numpy(), keys.cpu().numpy()
        order = np.argsort(zc, kind="stable")  # rows grouped by cluster once, not K scans of all rows
        bounds = np.searchsorted(zc[order], np.arange(K + 1))
        for k in range(K):
            rows = order[bounds[k] : bounds[k + 1]]
            m = min(n_cells[k], rows.size // 2)
            if m >= 2:
                centroids[k, :m] = faiss_index.kmeans(xs[rows], m, seed=engine.cfg.seed + k, keys=keys[rows])
            elif rows.size:
                centroids[k, 0] = xs[rows].mean(0).float().cpu().numpy()
    centroids = torch.from_numpy(engine.comm.broadcast_object(centroids)).to(engine.device, engine.dtype)
    n = engine.x.shape[0]
    bins = torch.empty(n, dtype=torch.long, device=engine.device)
    for sl in iter_chunks(n, stats_chunk_rows(d, M, engine.cfg.chunk_size)):
        xc, zc = engine.x[sl].to(engine.dtype), z[sl]
        dist = (xc[:, None, :] - centroids[zc]).square().sum(-1)  # (n, M); inf for unused cells
        bins[sl] = zc * M + torch.nan_to_num(dist, nan=math.inf).argmin(-1)
    # summed grouped by cell: K M cells of a few rows each per chunk would be many tiny matmuls
    stats = SuffStats.zeros((K * M,), d, device=engine.device)
    add_grouped_stats_(stats, engine.x, torch.arange(n, device=engine.device), bins,
                         torch.ones(n, dtype=STAT_DTYPE, device=engine.device))
    stats = engine.rows.reduce_stats(stats)
    return SuffStats(stats.count.reshape(K, M), stats.sum.reshape(K, M, d), stats.scatter.reshape(K, M, d, d))


def split_step(engine, sub_stats: SuffStats, stats: SuffStats) -> tuple[int, int]:
    """Split proposals per cluster: the subnets' two subclusters and, with moves.split_cells,
    the best level of the merge tree of its k-means cells (a many-way split); rank 0 decides
    (moves.decide_splits, u from move_gen), every rank applies the decision."""
    m = engine.cfg.moves
    cells = tree = None
    if m.split_cells >= 2:
        cells = cell_stats(engine, cells_per_cluster(engine, stats.count))
        tree = mv.tree_split_proposals(engine.prior, engine.cfg.prior.alpha, cells)
    decision = None
    if engine.comm.rank == 0:
        decision = mv.decide_splits(
            engine.prior, engine.cfg.prior.alpha, sub_stats, tree, m.min_cluster_size, m.max_clusters, engine.move_gen
        )
    decision = engine.comm.broadcast_object(decision)
    parts = {
        k: mv.group_cells(cells[k], tree.labels[k], tree.n_parts[k]) if decision.kind(k) == "tree" else sub_stats[k]
        for k in decision.accepted
    }
    if parts:
        engine.rebuild_for_k(mv.apply_multi_splits(parts, engine.params, engine.sub_params, engine.prior))
    return len(decision.proposed), len(parts)


def merge_step(engine, stats: SuffStats) -> tuple[int, int]:
    """Merge proposals among each cluster's moves.merge_neighbors nearest means; rank 0 decides
    (moves.propose_merges), every rank applies the decision."""
    decision = None
    if engine.comm.rank == 0:
        if engine.n_clusters < 2:
            decision = mv.MergeDecision((), (), ())
        else:
            neighbors = faiss_index.nearest_clusters(engine.params.means, engine.cfg.moves.merge_neighbors)
            decision = mv.propose_merges(engine.prior, engine.cfg.prior.alpha, stats, neighbors, engine.move_gen)
    decision = engine.comm.broadcast_object(decision)
    if decision.accepted:
        absorbed = {j: i for i, j in decision.accepted}
        engine.rebuild_for_k(mv.apply_merges(decision, engine.params, engine.sub_params, engine.prior, stats), absorbed)
    return len(decision.proposed), len(decision.accepted)


@torch.no_grad()
def delete_step(engine) -> tuple[int, int]:
    """Delete proposals for the moves.delete_largest largest clusters of the hard partition:
    each one's rows regrouped by their runner-up cluster (assign_top2; statistics
    all-reduced), rank 0 decides (moves.propose_deletes, u from move_gen), every rank removes
    the accepted clusters; the next E-step gives their rows to the other clusters."""
    K, d = engine.n_clusters, engine.n_features
    if engine.cfg.moves.delete_largest == 0 or K < 2:
        return 0, 0
    z, _, second, _ = engine.assign_top2()
    z, second = torch.from_numpy(z).to(engine.device), torch.from_numpy(second).to(engine.device)
    hard = engine.rows.hard_stats(z, K)
    proposed = tuple(sorted(hard.count.topk(min(engine.cfg.moves.delete_largest, K)).indices.tolist()))
    slot = torch.full((K,), -1, dtype=torch.long, device=engine.device)  # cluster -> its proposal, or -1
    slot[list(proposed)] = torch.arange(len(proposed), device=engine.device)
    rows = torch.nonzero(slot[z] >= 0).flatten()
    moved = SuffStats.zeros((len(proposed) * K,), d, device=engine.device)
    add_hard_stats_(moved, engine.x[rows], slot[z[rows]] * K + second[rows],
                    torch.ones(rows.numel(), dtype=STAT_DTYPE, device=engine.device))
    moved = engine.rows.reduce_stats(moved)
    moved = SuffStats(moved.count.reshape(-1, K), moved.sum.reshape(-1, K, d), moved.scatter.reshape(-1, K, d, d))
    decision = None
    if engine.comm.rank == 0:
        decision = mv.propose_deletes(engine.prior, engine.cfg.prior.alpha, hard, moved, proposed, engine.move_gen)
    decision = engine.comm.broadcast_object(decision)
    if decision.accepted:
        engine.rebuild_for_k(mv.apply_prunes(mv.PruneDecision(decision.accepted), engine.params, engine.sub_params))
    return len(decision.proposed), len(decision.accepted)


def prune_step(engine, stats: SuffStats) -> int:
    """Remove the clusters below moves.prune_below points (the same statistics on every rank)."""
    decision = mv.propose_prunes(stats.count, engine.cfg.moves.prune_below)  # same numbers on all ranks
    if decision.removed:
        engine.rebuild_for_k(mv.apply_prunes(decision, engine.params, engine.sub_params))
    return len(decision.removed)

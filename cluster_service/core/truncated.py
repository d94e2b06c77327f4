"""The truncated E-step: each row is scored against a few candidate clusters, not all K.

Truncated variational EM for mixtures (Forster & Lücke, AISTATS 2018; Hirschberger, Forster &
Lücke, TPAMI 2022): a row's responsibility is negligible for all but a handful of clusters, so
each row keeps a candidate set — its best clusters of the last scoring, the neighbours of its
best cluster in a cluster graph rebuilt from the current parameters, and one pseudo-random
cluster — and only those get exact full-covariance log-densities. Responsibilities are
renormalised over the candidates; statistics are summed from the sparse (row, cluster, weight)
triples grouped by cluster, never through an (n, K) matrix. Cost per pass: 2 n C d^2 flops for
C candidates instead of 2 n K d^2.

Pure functions over tensors. Candidate tables are (n, C) int64 with -1 in unused slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cluster_service.core.gaussian import WhitenedGaussians
from cluster_service.core.niw import STAT_DTYPE

# Slots of the candidate set filled from the row's best clusters of the last scoring, and from
# its nearest cluster means (Euclidean, searched afresh for every parameter set); the rest of
# `candidates` (minus the pseudo-random slot) are graph neighbours of the best cluster.
# N_NEAR is large because a row's 2nd-5th best clusters are near in Euclidean rank but far in graph
# rank (the graph ranks broad clusters first at every mean; BENCHMARKS.md, the E-step mass missed).
N_KEEP = 3
N_NEAR = 8
# Responsibilities below this are left out of the statistics (the row's best always counts).
MIN_WEIGHT = 1e-6
# A row's posterior has decayed inside its candidates when those past its best half hold less than
# TAIL_MASS of its mass (`tail_held`): the nets' loss then holds the mass off the candidates to the
# target's 0 (nets.candidate_logits). TAIL_MASS is the smallest weight the statistics keep, so a held
# row's rest is below what any statistic would see.
TAIL_MASS = MIN_WEIGHT


def dedupe_rows(cand: torch.Tensor) -> torch.Tensor:
    """Each row's distinct cluster ids, ascending, then -1 (empty) slots; trailing columns that
    are empty in every row are dropped. cand: (n, C) int64 -> (n, C' <= C)."""
    s = cand.sort(dim=1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    big = torch.iinfo(torch.int64).max
    key = torch.where(dup | (s < 0), big, s).sort(dim=1).values
    width = max(1, int((key != big).sum(1).max())) if key.numel() else 1
    return key[:, :width].masked_fill(key[:, :width] == big, -1)


def cluster_graph(scorer: WhitenedGaussians, means: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """Each cluster's nearest clusters, itself first: the clusters l with the highest
    log pi_l + log N(mu_k; mu_l, Sigma_l) at cluster k's mean (the clusters that compete for the
    rows around mu_k). scorer: the clusters' whitened Gaussians; means: (K, d) in the scorer's
    coordinates. -> (K, min(n_neighbors, K)) int64. K^2 d^2 flops."""
    K = scorer.n_clusters
    every = torch.arange(K, device=means.device).expand(K, K)
    ll = scorer.score_pairs(means.to(scorer.dtype), every)  # (K, K): row k scored against every cluster
    ll.fill_diagonal_(math.inf)  # itself first
    return ll.topk(min(n_neighbors, K), dim=1).indices


def row_hash(global_index: torch.Tensor, salt: int) -> torch.Tensor:
    """A pseudo-random key per row from (global row index, salt): the same row gets the same key
    in every worker layout. global_index: (n,) int64 -> (n,) int64 in [0, 2^62)."""
    mask = (1 << 62) - 1  # int64 products wrap; keep the hash non-negative
    h = (global_index * 6364136223846793005 + (salt * 1442695040888963407) % mask) & mask
    h = h ^ (h >> 29)
    return (h * 2654435761) & mask


def pseudo_random_clusters(global_index: torch.Tensor, salt: int, n_clusters: int) -> torch.Tensor:
    """One cluster id per row from `row_hash`: the same row gets the same draw in every worker
    layout. global_index: (n,) int64 -> (n,) int64 in [0, n_clusters)."""
    return row_hash(global_index, salt) % n_clusters


def near_slots(n_candidates: int) -> int:
    """How many of a row's nearest means `build_candidates` takes at this candidate budget."""
    return max(0, min(N_NEAR, n_candidates - N_KEEP - 2))


def build_candidates(
    best: torch.Tensor, graph: torch.Tensor, random_ids: torch.Tensor, n_candidates: int,
    nearest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Candidate table: a row's best clusters of the last scoring (best: (n, B) int64, -1 =
    none, best first), its nearest cluster means (nearest: (n, N) int64, nearest first; at most
    n_candidates - N_KEEP - 2 of them), the graph neighbours of its best cluster (graph: (K, G))
    filling the rest, and one pseudo-random cluster (random_ids: (n,)).
    -> (n, <= n_candidates + split children) int64, deduplicated.

    The nearest means keep a row from losing its best cluster for good: the graph reaches only
    clusters that compete around the best one's mean, and a broad cluster's tail rows lie far
    from it (without them, stale candidates grow a catch-all cluster: BENCHMARKS.md)."""
    near = nearest[:, : near_slots(n_candidates)] if nearest is not None else best[:, :0]
    n_nbr = max(1, n_candidates - N_KEEP - near.shape[1] - 1)
    top = best[:, :N_KEEP]
    first = best[:, 0].clamp_min(0)
    nbrs = graph[first, : min(n_nbr, graph.shape[1])]
    nbrs = nbrs.masked_fill((best[:, :1] < 0).expand_as(nbrs), -1)
    extra = best[:, N_KEEP:]  # e.g. the children of a split, kept for one scoring
    table = torch.cat([top, near, nbrs, random_ids[:, None], extra], dim=1)
    return dedupe_rows(table)


def remap_best(best: torch.Tensor, children: list[list[int]]) -> torch.Tensor:
    """Map a best-cluster table (n, B) of the old clusters through a K change: old cluster k ->
    the new clusters children[k] (a split's parts, a merge's survivor, [] when removed).
    -> (n, B') int64, each row's old order kept, a split's parts side by side, -1 padded."""
    width = max(1, max((len(c) for c in children), default=1))
    lut = torch.full((len(children) + 1, width), -1, dtype=torch.long)
    for k, c in enumerate(children):
        lut[k, : len(c)] = torch.as_tensor(c, dtype=torch.long)
    lut = lut.to(best.device)
    mapped = lut[torch.where(best < 0, len(children), best)]  # (n, B, width)
    return mapped.reshape(best.shape[0], -1)


def truncate(
    index: torch.Tensor, log_r: torch.Tensor, min_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The statistics' sparse weights: each row's responsibilities normalised over its slots,
    those of at least min_weight (its best always), renormalised to sum 1. index, log_r: (n, C)
    log-responsibilities up to a per-row constant, -1 / -inf at empty slots.
    -> flat (row (P,), cluster (P,), weight (P,) float64), rows ascending."""
    w = (log_r.to(STAT_DTYPE) - log_r.max(1, keepdim=True).values.to(STAT_DTYPE)).exp()  # best = 1
    w = w / w.sum(1, keepdim=True)
    keep = (w >= min_weight) & (index >= 0)
    keep |= (w == w.max(1, keepdim=True).values) & (index >= 0)
    w = torch.where(keep, w, torch.zeros_like(w))
    w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
    rows, slots = torch.nonzero(keep, as_tuple=True)
    return rows, index[rows, slots], w[rows, slots]


def tail_held(log_r: torch.Tensor, tail_from: int) -> torch.Tensor:
    """Rows whose posterior has decayed inside their candidates: the candidates past the row's
    best tail_from (half the candidate budget) hold less than TAIL_MASS of its mass. log_r: (n, C)
    log-responsibilities normalised over the candidates (-inf at empty slots) -> (n,) bool."""
    p = log_r.exp().sort(dim=1, descending=True).values
    return p[:, tail_from:].sum(1) < TAIL_MASS


def on_candidates(log_r: torch.Tensor, cand: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-responsibilities over all K (the net's, up to a per-row constant: its logits) on a
    row's E-step candidates and on its own best cluster (no sort or top-k over K). log_r: (n, K);
    cand: (n, C) int64, -1 = empty; best: (n,) log_r's argmax -> (index (n, C + 1), log_r there
    (n, C + 1)), -1 / -inf at empty or repeated slots; `truncate` then normalises them over
    those slots and floors them."""
    top = best[:, None]
    top = top.masked_fill((cand == top).any(1, keepdim=True), -1)
    index = torch.cat([cand, top], 1)
    return index, log_r.gather(1, index.clamp_min(0)).masked_fill(index < 0, -math.inf)


def calibrate_mass(target: torch.Tensor, mass: Callable[[torch.Tensor], torch.Tensor], steps: int) -> torch.Tensor:
    """Per-cluster log factors log c (K,) such that responsibilities r_ik c_k / sum_l r_il c_l
    have the target total masses (K,): `steps` Sinkhorn steps log c += log target - log mass(log c),
    where mass(log c) gives the reweighted responsibilities' totals (K,). A cluster the
    reweighted responsibilities give no mass gets no update; a target below 1e-3 counts as 1e-3
    (c stays finite). float64."""
    log_c = torch.zeros_like(target, dtype=STAT_DTYPE)
    log_target = torch.log(target.to(STAT_DTYPE).clamp_min(1e-3))
    for _ in range(steps):
        m = mass(log_c).to(STAT_DTYPE)
        log_c = log_c + torch.where(m > 0, log_target - torch.log(m.clamp_min(1e-300)), torch.zeros_like(m))
    return log_c


def reweight(rows: torch.Tensor, bins: torch.Tensor, w: torch.Tensor, log_c: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sparse weights w (P,) of (rows, bins) times c[bins], renormalised to sum 1 per row."""
    # index_select: advanced indexing takes torch's slow general gather path
    w = w * log_c.exp().to(w.dtype).index_select(0, bins)
    return w / torch.bincount(rows, w, minlength=n_rows).index_select(0, rows)

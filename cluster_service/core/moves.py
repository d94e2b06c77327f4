"""Split and merge moves: pure decisions (statistics + seeded generator -> record), then surgery.

A decision never touches nets or optimizers. `apply_*` returns the new mixture parameters plus
`source` (for every new cluster, the old cluster whose net rows it inherits) and `fresh` (new
clusters whose subclusters and subnets start over); the engine turns those into one K-change
event for the nets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from cluster_service.core.niw import (
    STAT_DTYPE,
    GaussianParams,
    NIWPrior,
    SuffStats,
    log_merge_ratio,
    log_partition_evidence,
    log_split_ratio,
    map_estimate,
    safe_cholesky,
)

# The split a cluster is proposed: its subnets' two subclusters, or a level of the merge tree of
# its k-means cells (TreeSplitProposal, a g-way split).
SplitKind = Literal["subnets", "tree"]


@dataclass(frozen=True)
class SplitDecision:
    """Split decisions of one round. proposed, kinds and log_ratios are aligned."""

    proposed: tuple[int, ...]  # clusters with a split proposal (ascending)
    kinds: tuple[SplitKind, ...]  # the proposal each of them faced the test with
    log_ratios: tuple[float, ...]  # its log H_s
    accepted: tuple[int, ...]  # clusters to split (ascending)
    dropped: tuple[int, ...] = ()  # passed the test but dropped: no room under max_clusters

    def kind(self, k: int) -> SplitKind:
        """The proposal cluster k (one of `proposed`) faced the test with."""
        return self.kinds[self.proposed.index(k)]


@dataclass(frozen=True)
class MergeDecision:
    proposed: tuple[tuple[int, int], ...]  # candidate pairs (i < j) evaluated
    log_ratios: tuple[float, ...]  # log H_m of each proposed pair
    accepted: tuple[tuple[int, int], ...]  # disjoint pairs to merge


@dataclass(frozen=True)
class DeleteDecision:
    proposed: tuple[int, ...]  # clusters tested for deletion (ascending)
    log_ratios: tuple[float, ...]  # log H_d of each
    accepted: tuple[int, ...]  # clusters to delete (ascending)


@dataclass(frozen=True)
class PruneDecision:
    removed: tuple[int, ...]  # clusters with (almost) no points


@dataclass(frozen=True)
class MoveResult:
    """Outcome of applying a decision. source: (K_new,) int64; fresh: (n_fresh,) int64."""

    params: GaussianParams
    sub_params: GaussianParams
    source: torch.Tensor
    fresh: torch.Tensor


# ---- decisions ------------------------------------------------------------------------------


def decide_splits(
    prior: NIWPrior,
    alpha: float,
    sub_stats: SuffStats,
    tree: TreeSplitProposal | None,
    min_cluster_size: float,
    max_clusters: int,
    generator: torch.Generator,
) -> SplitDecision:
    """Metropolis-Hastings split decisions for every cluster (DeepDPM eq. 9).

    sub_stats: batch shape (K, 2), the subclusters' statistics; tree: the cell-tree proposals
    (batch (K,)) or None. The subnets' split is proposed when both subclusters hold at least
    `min_cluster_size` points; the tree's when it has >= 2 parts. Of the two, the one with the
    higher log H_s faces the test, accepted when log u_k < log H_s with u ~ U(0, 1)^K drawn
    from `generator` (always K draws). Room rule: accepted splits that would make more than
    `max_clusters` clusters are dropped, the ones making the most new clusters first (ties: the
    lowest index first), until the rest fit.
    """
    K = sub_stats.count.shape[0]
    log_h = log_split_ratio(prior, alpha, sub_stats[:, 0], sub_stats[:, 1]).cpu()  # (K,)
    eligible = (sub_stats.count >= min_cluster_size).all(-1).cpu() & torch.isfinite(log_h)
    u = torch.rand(K, generator=generator, dtype=STAT_DTYPE)
    proposed, kinds, ratios, n_parts = [], [], [], {}
    for k in range(K):
        kind, r, g = ("subnets", float(log_h[k]), 2) if bool(eligible[k]) else (None, -math.inf, 0)
        if tree is not None and tree.n_parts[k] >= 2 and tree.log_ratios[k] > r:
            kind, r, g = "tree", tree.log_ratios[k], tree.n_parts[k]
        if kind is not None:
            proposed.append(k)
            kinds.append(kind)
            ratios.append(r)
            n_parts[k] = g
    passed = [k for k, r in zip(proposed, ratios, strict=True) if math.log(float(u[k])) < r]
    accepted, dropped = _fit_room(passed, n_parts, max_clusters - K)
    return SplitDecision(tuple(proposed), tuple(kinds), tuple(ratios), tuple(accepted), tuple(dropped))


def _fit_room(passed: list[int], n_parts: dict[int, int], room: int) -> tuple[list[int], list[int]]:
    """Drop the splits with the most parts first (stable: lowest index first among equals) until
    the new clusters (parts - 1 per split) fit in `room`. -> (kept ascending, dropped)."""
    kept = list(passed)
    dropped = []
    for k in sorted(passed, key=lambda k: -n_parts[k]):
        if sum(n_parts[j] - 1 for j in kept) <= room:
            break
        kept.remove(k)
        dropped.append(k)
    return kept, dropped


def propose_merges(
    prior: NIWPrior,
    alpha: float,
    stats: SuffStats,
    neighbors: torch.Tensor,
    generator: torch.Generator,
) -> MergeDecision:
    """Metropolis-Hastings merge decisions among nearest-neighbour pairs.

    stats: batch shape (K,); neighbors: (K, M) int64 indices of each cluster's nearest other
    clusters (-1 = none). Pairs are evaluated in order of decreasing log H_m and accepted with
    probability min(1, H_m); a cluster takes part in at most one accepted merge per round.
    """
    K = stats.count.shape[0]
    pairs = sorted(
        {(min(i, int(j)), max(i, int(j))) for i in range(K) for j in neighbors[i].tolist() if 0 <= j != i}
    )
    if not pairs:
        return MergeDecision((), (), ())
    idx = torch.tensor(pairs, dtype=torch.long, device=stats.count.device)
    log_h = log_merge_ratio(prior, alpha, stats[idx[:, 0]], stats[idx[:, 1]]).cpu()
    u = torch.rand(len(pairs), generator=generator, dtype=STAT_DTYPE)
    order = torch.argsort(log_h, descending=True, stable=True).tolist()
    used: set[int] = set()
    accepted = []
    for p in order:
        i, j = pairs[p]
        if i in used or j in used or not math.isfinite(float(log_h[p])):
            continue
        if math.log(float(u[p])) < float(log_h[p]):
            accepted.append((i, j))
            used.update((i, j))
    return MergeDecision(tuple(pairs), tuple(log_h.tolist()), tuple(sorted(accepted)))


def propose_deletes(
    prior: NIWPrior,
    alpha: float,
    hard: SuffStats,
    moved: SuffStats,
    proposed: tuple[int, ...],
    generator: torch.Generator,
) -> DeleteDecision:
    """Metropolis-Hastings delete decisions (the delete move of memoized DP mixtures, Hughes &
    Sudderth 2013): cluster c goes, and each of its rows joins its runner-up cluster.

    hard: batch (K,), the hard partition's statistics (each row in its MAP cluster); moved: batch
    (P, K), the rows of proposed[p] grouped by their runner-up. log H_d = log p(X, partition
    without c) - log p(X, partition) (`log_partition_evidence`: CRP x NIW), over c and the
    clusters that receive its rows; -inf when some row of c has no runner-up. Tested in order of
    decreasing log H_d, accepted with probability min(1, H_d); a delete whose cluster or
    receivers touch an accepted one's waits for the next round (the ratios would not add up).
    """
    log_h, touched = [], []
    for p, c in enumerate(proposed):
        recv = torch.nonzero(moved.count[p] > 0).flatten()
        if bool((recv == c).any()) or recv.numel() == 0:
            log_h.append(-math.inf)
            touched.append(set())
            continue
        before = log_partition_evidence(prior, alpha, hard[torch.cat([recv.new_tensor([c]), recv])])
        after = log_partition_evidence(prior, alpha, hard[recv] + moved[p][recv])
        log_h.append(float(after - before))
        touched.append({c, *recv.tolist()})
    u = torch.rand(len(proposed), generator=generator, dtype=STAT_DTYPE)
    used: set[int] = set()
    accepted = []
    for p in sorted(range(len(proposed)), key=lambda p: -log_h[p]):
        if not math.isfinite(log_h[p]) or touched[p] & used:
            continue
        if math.log(float(u[p])) < log_h[p]:
            accepted.append(proposed[p])
            used |= touched[p]
    return DeleteDecision(tuple(proposed), tuple(log_h), tuple(sorted(accepted)))


def propose_prunes(counts: torch.Tensor, prune_below: float) -> PruneDecision:
    """Clusters with weighted count below `prune_below`; never removes every cluster. counts: (K,)."""
    small = torch.nonzero(counts.cpu() < prune_below).flatten()
    if small.numel() == counts.numel():  # keep the largest one: K >= 1 always
        small = small[small != int(torch.argmax(counts.cpu()))]
    return PruneDecision(tuple(small.tolist()))


@dataclass(frozen=True)
class TreeSplitProposal:
    """Multi-way split proposals of every cluster from its k-means cells (batch (K,))."""

    labels: tuple[tuple[int, ...], ...]  # per cluster: group of each of its M cells (-1 = empty)
    n_parts: tuple[int, ...]  # groups per cluster (1 = no split proposed)
    log_ratios: tuple[float, ...]  # log H_s of the g-way split vs the whole cluster


def tree_split_proposals(prior: NIWPrior, alpha: float, cell_stats: SuffStats) -> TreeSplitProposal:
    """Per cluster: merge its k-means cells greedily by log H_m (hierarchy.merge_tree) and take
    the level of the tree whose split of the cluster scores best.

    cell_stats: batch shape (K, M), statistics of up to M cells of each cluster (empty allowed).
    The g-way split ratio alpha^(g-1) prod_j Gamma(N_j) f(X_j) / (Gamma(N) f(X)) telescopes
    along the tree, so level g scores -sum of the log ratios of the merges after it. Unlike the
    subnets' single cut this proposes many-way splits (a cloud of 20 components is never split
    well in two) and separates a small component from a large one cut in half. Deterministic:
    every rank computes the same proposals from the same reduced statistics.
    """
    from cluster_service.core.hierarchy import cut_tree, merge_tree

    K, M = cell_stats.count.shape
    labels, n_parts, ratios = [], [], []
    for k in range(K):
        nonempty = torch.nonzero(cell_stats.count[k] > 0).flatten()
        lab = [-1] * M
        if nonempty.numel() < 2:
            if nonempty.numel():
                lab[int(nonempty[0])] = 0
            labels.append(tuple(lab))
            n_parts.append(1)
            ratios.append(-math.inf)
            continue
        tree = merge_tree(prior, alpha, cell_stats[k][nonempty])
        # tail[m]: log H_s of the level after m merges = -(sum of the later merges' log ratios)
        tail = -torch.flip(torch.cumsum(torch.flip(torch.as_tensor(tree.log_ratios), [0]), 0), [0])
        m = int(torch.argmax(tail))
        g = tree.n_leaves - m
        group = cut_tree(tree, g)
        for c, gi in zip(nonempty.tolist(), group.tolist(), strict=True):
            lab[c] = int(gi)
        labels.append(tuple(lab))
        n_parts.append(g)
        ratios.append(float(tail[m]))
    return TreeSplitProposal(tuple(labels), tuple(n_parts), tuple(ratios))


def group_cells(cell_stats: SuffStats, labels: tuple[int, ...], n_parts: int) -> SuffStats:
    """Statistics of the groups of one cluster's cells: cell_stats (M,), labels (M,) -> (n_parts,)."""
    lab = torch.as_tensor(labels, dtype=torch.long, device=cell_stats.count.device)
    keep = lab >= 0
    out = SuffStats.zeros((n_parts,), cell_stats.n_features, device=cell_stats.count.device)
    out.count.index_add_(0, lab[keep], cell_stats.count[keep])
    out.sum.index_add_(0, lab[keep], cell_stats.sum[keep])
    out.scatter.index_add_(0, lab[keep], cell_stats.scatter[keep])
    return out


def apply_multi_splits(
    accepted: dict[int, SuffStats], params: GaussianParams, sub_params: GaussianParams, prior: NIWPrior
) -> MoveResult:
    """Cluster k -> g_k clusters from the statistics of its parts (accepted[k]: batch (g_k,)).

    k keeps part 0, parts 1.. are appended (in ascending k). Parameters are the parts' NIW
    modes, weights pi_k * N_j / N_k; every part gets fresh principal-axis subclusters.
    """
    K = params.n_clusters
    if not accepted:
        return MoveResult(params, sub_params, torch.arange(K), torch.empty(0, dtype=torch.long))
    dev = params.means.device
    keys = sorted(accepted)
    parts = SuffStats.concat([accepted[k] for k in keys])
    owner = torch.cat([torch.full((accepted[k].count.shape[0],), k, dtype=torch.long) for k in keys]).to(dev)
    first = torch.cat([torch.arange(accepted[k].count.shape[0]) == 0 for k in keys]).to(dev)
    means, chol = map_estimate(prior, parts)
    frac = parts.count / torch.zeros(K, dtype=STAT_DTYPE, device=dev).index_add_(0, owner, parts.count)[owner]
    log_w_parts = params.log_weights[owner] + torch.log(frac.clamp_min(1e-300))
    subs = principal_axis_subclusters(prior, parts)
    n_new = int((~first).sum())
    log_w, mu, L = params.log_weights.clone(), params.means.clone(), params.chol.clone()
    slw, smu, sL = sub_params.log_weights.clone(), sub_params.means.clone(), sub_params.chol.clone()
    kept = owner[first]
    log_w[kept], mu[kept], L[kept] = log_w_parts[first], means[first], chol[first]
    slw[kept], smu[kept], sL[kept] = subs.log_weights[first], subs.means[first], subs.chol[first]
    new = ~first
    source = torch.cat([torch.arange(K, device=dev), owner[new]])
    fresh = torch.cat([kept, torch.arange(K, K + n_new, device=dev)])
    return MoveResult(
        GaussianParams(torch.cat([log_w, log_w_parts[new]]), torch.cat([mu, means[new]]), torch.cat([L, chol[new]])),
        GaussianParams(
            torch.cat([slw, subs.log_weights[new]]), torch.cat([smu, subs.means[new]]), torch.cat([sL, subs.chol[new]])
        ),
        source.cpu(),
        fresh.cpu(),
    )


# ---- subcluster initialisation --------------------------------------------------------------


def principal_axis_subclusters(prior: NIWPrior, stats: SuffStats) -> GaussianParams:
    """Two subclusters per cluster by a 1-D split along the principal axis of its statistics.

    stats: batch shape (K,). For cluster mean mu, covariance C with top eigenpair (lambda, v):
    mu_{1,2} = mu -/+ sqrt(2 lambda / pi) v (the half-normal means), covariance
    C - (2/pi) lambda v v^T, equal weights. Returns params with batch shape (K, 2).
    """
    mean, chol = map_estimate(prior, stats)
    cov = chol @ chol.transpose(-1, -2)
    evals, evecs = torch.linalg.eigh(cov)
    lam, v = evals[..., -1].clamp_min(0), evecs[..., :, -1]  # (K,), (K, d)
    shift = math.sqrt(2 / math.pi) * lam.sqrt()[..., None] * v
    means = torch.stack([mean - shift, mean + shift], dim=-2)  # (K, 2, d)
    sub_cov = cov - (2 / math.pi) * lam[..., None, None] * v[..., :, None] * v[..., None, :]
    d = mean.shape[-1]
    sub_cov = sub_cov + 1e-6 * lam[..., None, None].clamp_min(1e-30) * torch.eye(d, dtype=cov.dtype, device=cov.device)
    sub_chol = safe_cholesky(sub_cov, "subcluster init covariance")
    chols = torch.stack([sub_chol, sub_chol], dim=-3)
    log_w = torch.full(means.shape[:-1], -math.log(2), dtype=STAT_DTYPE, device=means.device)
    return GaussianParams(log_w, means, chols)


def normalize_sub_weights(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """log pi~ within each cluster from subcluster counts (K, 2): Dirichlet(alpha/2) posterior mean."""
    a = counts.to(STAT_DTYPE).clamp_min(0) + alpha / 2
    return torch.log(a) - torch.log(a.sum(-1, keepdim=True))


# ---- surgery --------------------------------------------------------------------------------


def apply_merges(
    decision: MergeDecision, params: GaussianParams, sub_params: GaussianParams, prior: NIWPrior, stats: SuffStats
) -> MoveResult:
    """Pair (i, j), i < j -> one cluster at index i from the summed statistics; j is removed.

    The merged cluster's subclusters are its two former clusters (weights by counts).
    """
    K = params.n_clusters
    if not decision.accepted:
        return MoveResult(params, sub_params, torch.arange(K), torch.empty(0, dtype=torch.long))
    dev = params.means.device
    ii = torch.tensor([p[0] for p in decision.accepted], dtype=torch.long, device=dev)
    jj = torch.tensor([p[1] for p in decision.accepted], dtype=torch.long, device=dev)
    merged_mean, merged_chol = map_estimate(prior, stats[ii] + stats[jj])
    log_w = params.log_weights.clone()
    means, chol = params.means.clone(), params.chol.clone()
    log_w[ii] = torch.logaddexp(params.log_weights[ii], params.log_weights[jj])
    means[ii], chol[ii] = merged_mean, merged_chol
    sub_lw, sub_means, sub_chol = sub_params.log_weights.clone(), sub_params.means.clone(), sub_params.chol.clone()
    pair_counts = torch.stack([stats.count[ii], stats.count[jj]], dim=-1)
    sub_lw[ii] = normalize_sub_weights(pair_counts, 1e-3)
    sub_means[ii] = torch.stack([params.means[ii], params.means[jj]], dim=1)
    sub_chol[ii] = torch.stack([params.chol[ii], params.chol[jj]], dim=1)
    keep = torch.ones(K, dtype=torch.bool, device=dev)
    keep[jj] = False
    source = torch.arange(K, device=dev)[keep]
    new_index = torch.cumsum(keep.long(), 0) - 1  # old index -> new index for kept clusters
    return MoveResult(
        GaussianParams(log_w[keep], means[keep], chol[keep]),
        GaussianParams(sub_lw[keep], sub_means[keep], sub_chol[keep]),
        source.cpu(),
        new_index[ii].cpu(),
    )


def apply_prunes(decision: PruneDecision, params: GaussianParams, sub_params: GaussianParams) -> MoveResult:
    """Remove clusters; weights renormalised."""
    K = params.n_clusters
    keep = torch.ones(K, dtype=torch.bool)
    keep[list(decision.removed)] = False
    keep_d = keep.to(params.means.device)
    lw = params.log_weights[keep_d]
    return MoveResult(
        GaussianParams(lw - torch.logsumexp(lw, 0), params.means[keep_d], params.chol[keep_d]),
        sub_params[keep_d],
        torch.arange(K)[keep],
        torch.empty(0, dtype=torch.long),
    )

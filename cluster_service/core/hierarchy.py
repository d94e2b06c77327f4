"""Greedy agglomeration of clusters by the DPGMM merge ratio, and cuts of the resulting tree.

Pure functions over `SuffStats` (hard or weighted statistics of K clusters):

    merge_tree(prior, alpha, stats)  repeatedly merge the pair with the highest log H_m
                                     (DeepDPM eq. 9, H_m = 1 / H_s) -> MergeTree
    cut_tree(tree, n_clusters)       labels (K,) of the leaves at a coarser level

Used twice: at initialisation (an over-clustered k-means partition merged while log H_m > 0,
so K starts near what the model supports without a guessed K_init), and after a fit (the
whole tree down to one cluster, stored with the model so users can ask for a coarser level
without refitting). The tree uses scipy's linkage format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cluster_service.core.niw import NIWPrior, SuffStats, log_cluster_score

# Pairs whose union statistics are evaluated in one batch (memory: chunk * d^2 float64).
_PAIR_CHUNK = 2048
# With borders, a cluster that borders more than this many others is scored against part of
# them only (merge_tree's max_partners).
MAX_PARTNERS = 32


@dataclass(frozen=True)
class MergeTree:
    """Greedy merges of K leaves.

    linkage: (n_merges, 4) float64 scipy rows [a, b, height, size]: leaves are 0..K-1, the
        node made by row i is K + i; height is non-decreasing (running max of -log H_m, shifted
        to be >= 0) so scipy can draw it; size is the number of leaves under the new node.
    log_ratios: (n_merges,) log H_m of each merge as it was made (may rise and fall).
    n_leaves: K.
    """

    linkage: np.ndarray
    log_ratios: np.ndarray
    n_leaves: int

    @property
    def n_merges(self) -> int:
        return int(self.linkage.shape[0])


def _log_score(prior: NIWPrior, stats: SuffStats) -> torch.Tensor:
    """niw.log_cluster_score of each set, in chunks of _PAIR_CHUNK sets. -> (...,)."""
    out = torch.empty(stats.count.shape, dtype=stats.count.dtype, device=stats.count.device)
    flat = out.reshape(-1)
    n = flat.numel()
    c, s, S = stats.count.reshape(-1), stats.sum.reshape(n, -1), stats.scatter.reshape(n, *stats.scatter.shape[-2:])
    for i in range(0, n, _PAIR_CHUNK):
        part = SuffStats(c[i : i + _PAIR_CHUNK], s[i : i + _PAIR_CHUNK], S[i : i + _PAIR_CHUNK])
        # an empty set (a cluster no row is assigned to) scores lgamma(tiny): finite, merged first
        flat[i : i + _PAIR_CHUNK] = log_cluster_score(prior, part, min_count=1e-8)
    return out


def merge_tree(
    prior: NIWPrior, alpha: float, stats: SuffStats,
    adjacency: torch.Tensor | np.ndarray | None = None, max_partners: int | None = MAX_PARTNERS,
) -> MergeTree:
    """Greedy agglomeration: merge the pair with the highest log H_m until one cluster is left.

    stats: batch shape (K,) with counts > 0. log H_m(i, j) = lgamma(N_ij) + log f(X_ij)
    - lgamma(N_i) - log f(X_i) - lgamma(N_j) - log f(X_j) - log alpha. Cost: K^2 / 2 union
    marginal likelihoods up front, then K per merge; with an adjacency, at most max_partners
    per cluster up front and per merge (the rest only if the borders run out). Memory:
    _PAIR_CHUNK union statistics at a time.

    adjacency: optional (K, K), which clusters border each other and how strongly (bool, or
    weights such as export.cluster_tree's count of rows on the border; 0 / False = not
    bordering). Only bordering pairs merge; a merged node borders what either part bordered
    (weights add); when no bordering pair is left (separate components), any pair may merge.
    Why: without it, small clusters far apart merge with each other first (a broad Gaussian
    over a few hundred scattered rows costs less than putting them in the tail of a tight large
    cluster), and a coarse cut then joins two true classes through them (docs/ARCHITECTURE.md,
    "Merge hierarchy").

    max_partners: with an adjacency, a cluster that borders more than max_partners others is
    scored against some of them only (None: all of them): at the start, the pairs where one is
    among the other's max_partners most strongly bordering; after a merge, the merged node
    against its parts' 2 x max_partners best-scoring partners and its max_partners // 4
    strongest borders. A merged node inherits the union of its parts' borders; without the cap
    the large nodes near the root border almost every cluster and the tree scores ~K^2 / 2
    unions. Where no cluster borders more than the cap, the tree is the exact greedy one; where
    some do, its cuts stay close to the exact tree's (docs/ARCHITECTURE.md, "The merge tree at
    large K").
    """
    K = int(stats.count.shape[0])
    dev = stats.count.device
    c, s, S = stats.count.clone(), stats.sum.clone(), stats.scatter.clone()
    single = _log_score(prior, SuffStats(c, s, S))  # (K,)
    log_alpha = math.log(alpha)
    # ratio[i, j]: log H_m of the pair, -inf where not (yet) scored. With an adjacency only the
    # bordering pairs are scored (all K^2 / 2 pairs' union statistics do not fit at large K);
    # the other pairs are scored only if the bordering ones run out (separate components).
    ratio = torch.full((K, K), -math.inf, dtype=c.dtype, device=dev)

    def score_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
        for lo in range(0, a.numel(), _PAIR_CHUNK):  # union statistics of _PAIR_CHUNK pairs at a time
            i, j = a[lo : lo + _PAIR_CHUNK], b[lo : lo + _PAIR_CHUNK]
            union = _log_score(prior, SuffStats(c[i] + c[j], s[i] + s[j], S[i] + S[j]))
            ratio[i, j] = ratio[j, i] = union - single[i] - single[j] - log_alpha

    adj = None
    if adjacency is not None:
        adj = torch.as_tensor(np.asarray(adjacency, dtype=np.float64), device=dev).clone()
        adj = torch.maximum(adj, adj.T).clamp_min_(0)
        adj.fill_diagonal_(0)
        score_pairs(*torch.triu(_strongest(adj, max_partners), 1).nonzero(as_tuple=True))
    else:
        iu = torch.triu_indices(K, K, 1, device=dev)
        score_pairs(iu[0], iu[1])
    node = list(range(K))  # scipy id of the node currently held in slot i
    leaves = [1] * K
    active = torch.ones(K, dtype=torch.bool, device=dev)
    rows, logs = [], []
    for step in range(K - 1):
        if adj is not None and not bool((adj > 0).any()):  # no bordering pair left: any pair may merge
            adj = None
            unscored = ratio == -math.inf  # (a scored pair that came out -inf is scored again: harmless)
            score_pairs(*torch.triu(active[:, None] & active[None, :] & unscored, 1).nonzero(as_tuple=True))
        # (until the borders run out, only bordering pairs are ever scored: the argmax is over them)
        best = int(torch.argmax(ratio))
        if adj is not None and not math.isfinite(float(ratio.view(-1)[best])):
            # bordering pairs are left but none is scored (each one's partners beyond the cap)
            pending = _strongest(adj, max_partners) & (ratio == -math.inf)
            score_pairs(*torch.triu(pending | pending.T, 1).nonzero(as_tuple=True))
            best = int(torch.argmax(ratio))
        i, j = divmod(best, K)
        r = float(ratio[i, j])
        if not math.isfinite(r):
            break
        i, j = min(i, j), max(i, j)
        # the merged node's partners: its parts' best-scoring partners (before their rows are reset)
        prev = torch.maximum(ratio[i], ratio[j])
        c[i], s[i], S[i] = c[i] + c[j], s[i] + s[j], S[i] + S[j]
        active[j] = False
        ratio[j, :] = ratio[:, j] = ratio[i, :] = ratio[:, i] = -math.inf
        if adj is not None:
            _merge_borders_(adj, i, j)
        leaves[i] += leaves[j]
        rows.append((node[i], node[j], leaves[i]))
        logs.append(r)
        node[i] = K + step
        single[i] = _log_score(prior, SuffStats(c[i : i + 1], s[i : i + 1], S[i : i + 1]))[0]
        if adj is None:
            others = torch.nonzero(active).flatten()
        else:
            others = torch.nonzero(adj[i] > 0).flatten()
            if max_partners is not None and others.numel() > max_partners:
                others = _partners(prev, adj[i], i, j, max_partners)
        others = others[others != i]
        if others.numel():
            score_pairs(torch.full_like(others, i), others)
    log_ratios = np.asarray(logs, dtype=np.float64)
    heights = np.maximum.accumulate(-log_ratios) if logs else log_ratios
    if heights.size:
        heights = heights - min(0.0, float(heights[0]))
    linkage = np.zeros((len(rows), 4), dtype=np.float64)
    for n, (a, b, size) in enumerate(rows):
        linkage[n] = (a, b, heights[n], size)
    return MergeTree(linkage, log_ratios, K)


def _partners(prev: torch.Tensor, border: torch.Tensor, i: int, j: int, m: int) -> torch.Tensor:
    """The clusters a merged node i (= i + j) is scored against when it borders more than m:
    the 2m best merge partners of either part (prev: the larger of the parts' log H_m rows,
    -inf where unscored), and its m // 4 strongest borders. -> (<= 2m + m // 4,) int64."""
    prev = prev.clone()
    prev[i] = prev[j] = -math.inf
    best = prev.topk(min(2 * m, prev.numel())).indices
    best = best[torch.isfinite(prev[best]) & (border[best] > 0)]
    strong = border.topk(max(1, m // 4)).indices
    return torch.unique(torch.cat([best, strong[border[strong] > 0]]))


def _strongest(adj: torch.Tensor, m: int | None) -> torch.Tensor:
    """(K, K) bool, symmetric: the pairs where either cluster is among the other's m most
    strongly bordering clusters (all bordering pairs when m is None or no cluster has more)."""
    border = adj > 0
    if m is None or m >= adj.shape[0] - 1 or int(border.sum(1).max()) <= m:
        return border
    val, idx = adj.topk(m, dim=1)
    top = torch.zeros_like(border).scatter_(1, idx, val > 0)
    return top | top.T


def _merge_borders_(adj: torch.Tensor, i: int, j: int) -> None:
    """In place: node i (now i + j) borders what either part bordered (weights add); slot j is gone."""
    adj[i] += adj[j]
    adj[:, i] += adj[:, j]
    adj[i, i] = 0
    adj[j, :] = 0
    adj[:, j] = 0


def cut_tree(tree: MergeTree, n_clusters: int) -> np.ndarray:
    """Leaf labels after the first K - n_clusters merges: (K,) int64 in 0..n_clusters-1, numbered
    by each group's smallest leaf. n_clusters below K - n_merges is an error."""
    K = tree.n_leaves
    if not 1 <= n_clusters <= K:
        raise ValueError(f"n_clusters must be in 1..{K}, got {n_clusters}")
    steps = K - n_clusters
    if steps > tree.n_merges:
        raise ValueError(f"the tree has {tree.n_merges} merges; the coarsest level is {K - tree.n_merges} clusters")
    parent = list(range(K + steps))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for n in range(steps):
        a, b = int(tree.linkage[n, 0]), int(tree.linkage[n, 1])
        parent[find(a)] = K + n
        parent[find(b)] = K + n
    roots = np.array([find(k) for k in range(K)])
    _, labels = np.unique(roots, return_inverse=True)
    # number groups by their smallest leaf so the labelling is stable
    first = {}
    for g in labels:
        first.setdefault(int(g), len(first))
    return np.array([first[int(g)] for g in labels], dtype=np.int64)

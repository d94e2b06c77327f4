"""Greedy merge hierarchy over cluster statistics, cuts, the empirical-Bayes prior and the
hard-mixture generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, is_valid_linkage
from stats_helpers import stats_from_points

from cluster_service.core.hierarchy import MergeTree, cut_tree, merge_tree
from cluster_service.core.niw import (
    SuffStats,
    log_merge_ratio,
    make_prior,
    pooled_within_covariance,
)
from cluster_service.datasets import make_overlap_mixture

D = torch.float64


def blobs_in_cells(seed: int = 0):
    """3 well-separated Gaussians in 4-d, each cut into 4 k-means-like cells along its first axis.
    Returns x (1200, 4), cell statistics (12,) and the blob of each cell (12,)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0, 0, 0], [12, 0, 0, 0], [0, 12, 0, 0]], dtype=D)
    xs, cells, blob = [], [], []
    for b in range(3):
        x = torch.randn(400, 4, generator=g, dtype=D) + centres[b]
        x0 = x[:, 0].contiguous()
        cell = torch.bucketize(x0, torch.quantile(x0, torch.tensor([0.25, 0.5, 0.75], dtype=D)))
        w = torch.nn.functional.one_hot(cell, 4).to(D)
        cells.append(stats_from_points(x, w))
        xs.append(x)
        blob += [b] * 4
    return torch.cat(xs), SuffStats.concat(cells), np.array(blob)


def prior_from(x: torch.Tensor, stats: SuffStats):
    return make_prior(x.mean(0), x.var(0), 1e-4, 2.0, "pooled", 1.0, pooled_within_covariance(stats))


def test_greedy_merges_favour_the_true_blobs_first():
    x, cells, blob = blobs_in_cells()
    tree = merge_tree(prior_from(x, cells), 10.0, cells)
    # 12 cells -> 3 blobs by favoured merges (log H_m > 0); the first merge across blobs is disfavoured
    assert (tree.log_ratios[:9] > 0).all() and tree.log_ratios[9] < 0
    labels = cut_tree(tree, 3)
    assert len(set(zip(labels.tolist(), blob.tolist(), strict=True))) == 3  # cut = blobs (up to relabelling)


def test_full_tree_is_a_valid_scipy_linkage_and_cuts_match_fcluster():
    x, cells, blob = blobs_in_cells(1)
    prior = prior_from(x, cells)
    tree = merge_tree(prior, 10.0, cells)
    assert tree.n_merges == 11 and is_valid_linkage(tree.linkage)
    assert np.all(np.diff(tree.linkage[:, 2]) >= 0) and tree.linkage[-1, 3] == 12
    # the first merge is the pair with the highest log merge ratio among all pairs
    i, j = torch.triu_indices(12, 12, 1)
    best = float(log_merge_ratio(prior, 10.0, cells[i], cells[j]).max())
    assert tree.log_ratios[0] == pytest.approx(best, rel=1e-9)
    for k in (1, 2, 3, 5, 12):
        ours = cut_tree(tree, k)
        assert np.unique(ours).size == k
        if k < 12:  # same partition as scipy's maxclust cut of the same tree (heights monotone)
            theirs = fcluster(tree.linkage, k, criterion="maxclust")
            assert len(set(zip(ours.tolist(), theirs.tolist(), strict=True))) == k


def test_dendrogram_draws_every_cluster_and_marks_the_first_rejected_merge():
    from cluster_service.report.plots import plot_merge_tree

    x, cells, blob = blobs_in_cells(1)
    tree = merge_tree(prior_from(x, cells), 10.0, cells)
    sizes = cells.count.numpy().round().astype(int)
    fig = plot_merge_tree(tree.linkage, tree.log_ratios, sizes)
    ax = fig.axes[0]
    leaves = [t.get_text() for t in ax.get_xticklabels()]
    assert sorted(leaves) == sorted(f"{c} ({sizes[c]})" for c in range(12))
    # cells of one blob sit side by side under the tree: the leaf order groups the blobs
    order = [blob[int(t.split()[0])] for t in leaves]
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) == 2
    # the 9 merges inside blobs are accepted (log H_m > 0), the 10th is rejected: K 3 there
    first_rejected = int(np.flatnonzero(tree.log_ratios < 0)[0])
    assert first_rejected == 9
    line = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(line) == 1 and line[0].get_ydata()[0] == pytest.approx(tree.linkage[9, 2])
    assert "K 3" in ax.get_legend().get_texts()[0].get_text()
    many = plot_merge_tree(tree.linkage, tree.log_ratios, sizes, max_leaves=4)
    assert len(many.axes[0].get_xticklabels()) == 4  # truncated to the last merges


def test_cut_beyond_a_stopped_tree_is_refused():
    x, cells, _ = blobs_in_cells()
    full = merge_tree(prior_from(x, cells), 10.0, cells)
    tree = MergeTree(full.linkage[:9], full.log_ratios[:9], full.n_leaves)  # a tree stopped at 3 clusters
    with pytest.raises(ValueError, match="coarsest level is 3"):
        cut_tree(tree, 2)


def test_pooled_within_covariance_is_the_scatter_about_each_cell_mean():
    x, cells, _ = blobs_in_cells()
    ref = 0.0
    for k in range(12):
        c, s, S = cells.count[k], cells.sum[k], cells.scatter[k]
        ref = ref + S - torch.outer(s, s) / c
    torch.testing.assert_close(pooled_within_covariance(cells), ref / cells.count.sum())


def test_overlap_mixture_hits_its_bayes_accuracy():
    from cluster_service.datasets import bayes_accuracy  # noqa: F401 - the calibration's own yardstick

    x, y = make_overlap_mixture(6000, 8, 10, seed=3, bayes_target=0.95, imbalance=20.0)
    sizes = np.bincount(y)
    assert x.shape == (6000, 8) and sizes.size == 10 and sizes.max() / sizes.min() > 10
    # overlap is real: k-means given K cannot be perfect; well-separated data would be
    from sklearn.mixture import GaussianMixture

    acc = (GaussianMixture(10, random_state=0).fit(x).predict(x) == y).mean()
    assert acc < 0.99


def test_tree_split_proposes_the_three_blobs_of_one_cluster_and_surgery_adds_them():
    from cluster_service.core import moves as mv
    from cluster_service.core.niw import GaussianParams, map_estimate

    x, cells, blob = blobs_in_cells()
    prior = prior_from(x, cells)
    cell_stats = SuffStats(cells.count[None], cells.sum[None], cells.scatter[None])  # one cluster, 12 cells
    prop = mv.tree_split_proposals(prior, 10.0, cell_stats)
    assert prop.n_parts == (3,) and prop.log_ratios[0] > 100
    groups = np.array(prop.labels[0])
    assert len(set(zip(groups.tolist(), blob.tolist(), strict=True))) == 3
    parts = mv.group_cells(cell_stats[0], prop.labels[0], 3)
    assert parts.count.sum() == pytest.approx(1200) and (parts.count == 400).all()
    # surgery: cluster 1 of two becomes three clusters; weights keep their total
    whole = SuffStats(cells.count.sum(0), cells.sum.sum(0), cells.scatter.sum(0))
    two = SuffStats.concat([SuffStats(whole.count[None], whole.sum[None], whole.scatter[None])] * 2)
    means, chol = map_estimate(prior, two)
    params = GaussianParams(torch.log(torch.tensor([0.5, 0.5], dtype=D)), means, chol)
    sub = mv.principal_axis_subclusters(prior, two)
    res = mv.apply_multi_splits({1: parts}, params, sub, prior)
    assert res.params.n_clusters == 4 and res.source.tolist() == [0, 1, 1, 1]
    assert sorted(res.fresh.tolist()) == [1, 2, 3]
    assert float(torch.logsumexp(res.params.log_weights, 0)) == pytest.approx(0.0, abs=1e-9)


def test_tree_split_of_one_gaussian_scores_below_zero():
    from cluster_service.core import moves as mv

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 4, generator=g, dtype=D)
    cell = torch.bucketize(x[:, 0].contiguous(), torch.linspace(-1.5, 1.5, 7, dtype=D))
    cells = stats_from_points(x, torch.nn.functional.one_hot(cell, 8).to(D))
    prior = prior_from(x, cells)
    prop = mv.tree_split_proposals(prior, 10.0, SuffStats(cells.count[None], cells.sum[None], cells.scatter[None]))
    assert prop.log_ratios[0] < 0


def test_bordering_pairs_keep_small_clusters_with_the_cluster_they_touch():
    """Two tight large clusters far apart, each with a small cluster of rows on its edge. By merge
    ratio alone the two small clusters merge with each other first (a broad Gaussian over 60
    scattered rows is cheaper than 30 rows in a tight cluster's tail), so the cut at 2 puts the
    small ones together; with the bordering pairs (runner-up adjacency) each joins its neighbour."""
    g = torch.Generator().manual_seed(4)
    parts = [((0.0, 0.0), 0.3, 3000), ((40.0, 0.0), 0.3, 3000), ((0.0, 2.5), 0.1, 30), ((40.0, 2.5), 0.1, 30)]
    stats = []
    for (cx, cy), sd, n in parts:
        x = torch.randn(n, 2, generator=g, dtype=D) * sd + torch.tensor([cx, cy], dtype=D)
        stats.append(stats_from_points(x, torch.ones(n, 1, dtype=D)))
    stats = SuffStats.concat(stats)
    prior = make_prior(torch.zeros(2, dtype=D), torch.ones(2, dtype=D) * 100, 1e-4, 2.0, "data_diag", 0.001)
    plain = merge_tree(prior, 10.0, stats)
    assert set(plain.linkage[0, :2].tolist()) == {2, 3}  # the failure the adjacency fixes: small ones first
    assert cut_tree(plain, 2)[2] == cut_tree(plain, 2)[3]
    touching = np.zeros((4, 4), dtype=bool)
    touching[0, 2] = touching[2, 0] = touching[1, 3] = touching[3, 1] = True
    tree = merge_tree(prior, 10.0, stats, adjacency=touching)
    np.testing.assert_array_equal(cut_tree(tree, 2), [0, 1, 0, 1])
    assert tree.n_merges == 3 and is_valid_linkage(tree.linkage)  # the separate components still join at the top


def test_multivariate_t_em_matches_scipy_and_recovers_nu():
    from scipy.stats import multivariate_t

    from cluster_service.bench.tails import fit_t, tail_merge_bic

    rng = np.random.default_rng(0)
    shape = np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]])
    x = multivariate_t(loc=[1.0, -2.0, 0.5], shape=shape, df=4.0).rvs(6000, random_state=rng)
    ll, mu, scale, nu = fit_t(x)
    assert ll == pytest.approx(multivariate_t(loc=mu, shape=scale, df=nu).logpdf(x).sum(), rel=1e-9)
    assert 3.2 < nu < 5.0 and np.allclose(mu, [1.0, -2.0, 0.5], atol=0.05)
    # a heavy-tailed blob cut in two along its tail: one t explains both parts (merge);
    # two separated Gaussians: kept apart
    far = np.linalg.norm(x - mu, axis=1) > 3.0
    assert tail_merge_bic(x[~far], x[far])[0] > 0
    g = rng.normal(size=(3000, 3))
    assert tail_merge_bic(g, rng.normal(size=(300, 3)) + [6.0, 0, 0])[0] < 0


def test_modal_em_finds_one_mode_below_two_sigma_and_two_above():
    """Two equal-weight unit Gaussians in 1-d are unimodal iff their means are < 2 sigma apart; in
    3-d the same along the line joining them. A third component far away is its own mode."""
    from cluster_service.bench.tails import mixture_modes

    chol = np.stack([np.eye(3)] * 3)
    lw = np.log(np.full(3, 1 / 3))
    for gap, n_modes in ((1.8, 2), (2.2, 3)):
        means = np.array([[0.0, 0, 0], [gap, 0, 0], [0, 20, 0]])
        labels = mixture_modes(means, chol, lw)
        assert labels.max() + 1 == n_modes, (gap, labels)
        assert labels[2] not in labels[:2]


def _greedy_reference(prior, alpha, stats, adjacency):
    """The greedy merge order by brute force: every step scores every active pair from scratch
    (niw.log_cluster_score), bordering pairs first while any is left."""
    from cluster_service.core.niw import log_cluster_score

    groups = [[k] for k in range(stats.count.shape[0])]
    adj = adjacency.copy()
    np.fill_diagonal(adj, False)
    order = []

    def score(members):
        m = torch.tensor(members)
        part = SuffStats(stats.count[m].sum(0, keepdim=True), stats.sum[m].sum(0, keepdim=True),
                         stats.scatter[m].sum(0, keepdim=True))
        return float(log_cluster_score(prior, part, min_count=1e-8)[0])

    while len(groups) > 1:
        pairs = [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))]
        near = [(a, b) for a, b in pairs if adj[np.ix_(groups[a], groups[b])].any()]
        best = max(near or pairs, key=lambda p: score(groups[p[0]] + groups[p[1]]) - score(groups[p[0]])
                   - score(groups[p[1]]))
        a, b = best
        order.append(sorted(groups[a] + groups[b]))
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return order


@pytest.mark.parametrize("bordering", [False, True])
def test_merge_tree_follows_the_brute_force_greedy_order(bordering):
    """Random cell statistics (14 cells of 3 blobs); with a sparse adjacency in two components
    (the tree must fall back to non-bordering pairs once): the same merge order as scoring every
    pair from scratch at every step."""
    x, cells, _ = blobs_in_cells(seed=5)
    extra = stats_from_points(torch.randn(40, 4, dtype=D) * 3 + 20, torch.ones(40, 2, dtype=D) * 0.5)
    cells = SuffStats.concat([cells, extra])
    K = cells.count.shape[0]
    prior = prior_from(x, cells)
    adj = np.zeros((K, K), dtype=bool)
    if bordering:
        for a in range(K - 1):
            if a != 6:  # two chains: cells 0..6 and 7..13
                adj[a, a + 1] = adj[a + 1, a] = True
    else:
        adj[:] = True
    tree = merge_tree(prior, 10.0, cells, adjacency=adj if bordering else None)
    members = {k: [k] for k in range(K)}
    got = []
    for n, (a, b, _, _) in enumerate(tree.linkage):
        members[K + n] = sorted(members[int(a)] + members[int(b)])
        got.append(members[K + n])
    assert got == _greedy_reference(prior, 10.0, cells, adj)


def test_merge_tree_with_borders_scores_pairs_of_neighbours_only(monkeypatch):
    """With an adjacency the tree never scores all K^2 / 2 pairs (at K 1000, d 128 their union
    statistics alone were 52 GB): K 200 cells in a ring, each bordering 2 others."""
    from cluster_service.core import hierarchy

    g = torch.Generator().manual_seed(7)
    K = 200
    x = torch.randn(K * 20, 3, generator=g, dtype=D) + torch.arange(K, dtype=D).repeat_interleave(20)[:, None]
    cells = stats_from_points(x, torch.nn.functional.one_hot(torch.arange(K).repeat_interleave(20), K).to(D))
    scored = []
    real = hierarchy._log_score
    monkeypatch.setattr(hierarchy, "_log_score", lambda p, s: scored.append(s.count.numel()) or real(p, s))
    ring = np.zeros((K, K), dtype=bool)
    idx = np.arange(K)
    ring[idx, (idx + 1) % K] = ring[(idx + 1) % K, idx] = True
    tree = merge_tree(prior_from(x, cells), 10.0, cells, adjacency=ring)
    assert tree.n_merges == K - 1 and is_valid_linkage(tree.linkage)
    assert sum(scored) < 10 * K  # singles, the ring's pairs, and ~2 neighbours of each merged node


def test_merge_tree_partner_cap_keeps_the_exact_trees_cuts_with_fewer_unions(monkeypatch):
    """Every cluster borders every other (weights: rows on the border, decaying with distance),
    so the cap binds: 60 cells of 6 blobs in 8-d, max_partners 6. The capped tree scores fewer
    unions than the exact one (max_partners None) and cuts the same partitions at 6 (the blobs)
    and 30 clusters; the exact one equals the brute-force greedy order (test above)."""
    from sklearn.metrics import adjusted_rand_score

    from cluster_service.core import hierarchy

    g = torch.Generator().manual_seed(11)
    centres = torch.randn(6, 8, generator=g, dtype=D) * 10
    sub = centres.repeat_interleave(10, 0) + torch.randn(60, 8, generator=g, dtype=D) * 1.5
    label = torch.arange(60).repeat_interleave(50)
    x = sub[label] + torch.randn(3000, 8, generator=g, dtype=D)
    cells = stats_from_points(x, torch.nn.functional.one_hot(label, 60).to(D))
    border = torch.exp(-torch.cdist(sub, sub) / 4).numpy() * 100 + 1e-3  # > 0 everywhere
    prior = prior_from(x, cells)
    scored = []
    real = hierarchy._log_score
    monkeypatch.setattr(hierarchy, "_log_score", lambda p, s: scored.append(s.count.numel()) or real(p, s))
    exact = merge_tree(prior, 10.0, cells, adjacency=border, max_partners=None)
    n_exact = sum(scored)
    scored.clear()
    capped = merge_tree(prior, 10.0, cells, adjacency=border, max_partners=6)
    assert sum(scored) < 0.6 * n_exact
    assert capped.n_merges == 59 and is_valid_linkage(capped.linkage)
    blob = np.arange(60) // 10
    assert adjusted_rand_score(blob, cut_tree(exact, 6)) == 1.0
    for level in (6, 30):
        assert adjusted_rand_score(cut_tree(exact, level), cut_tree(capped, level)) > 0.95, level

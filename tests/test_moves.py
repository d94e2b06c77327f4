"""Split/merge decisions and surgery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stats_helpers import stats_from_points

from cluster_service import index
from cluster_service.core import moves as mv
from cluster_service.core.nets import ClusterNet, SubclusterNets, resize_cluster_net, resize_subnets
from cluster_service.core.niw import GaussianParams, SuffStats, make_prior, map_estimate

D = torch.float64


def prior_for(x: torch.Tensor):
    return make_prior(x.mean(0), x.var(0), 1e-4, 2.0, "data_diag", 0.005)


def two_way(x: torch.Tensor, z: torch.Tensor) -> SuffStats:
    """(1, 2) subcluster statistics from a hard 2-way labelling."""
    s = stats_from_points(x, torch.nn.functional.one_hot(z, 2).to(D))
    return SuffStats(s.count[None], s.sum[None], s.scatter[None])


def decide(sub_stats, prior, tree=None, min_size=10, max_clusters=100, seed=1):
    return mv.decide_splits(prior, 10.0, sub_stats, tree, min_size, max_clusters, torch.Generator().manual_seed(seed))


def small_subclusters(K: int, count: float = 1.0, d: int = 2) -> SuffStats:
    """(K, 2) subcluster statistics of `count` points each, at the origin with unit scatter."""
    eye = torch.eye(d, dtype=D).expand(K, 2, d, d)
    return SuffStats(torch.full((K, 2), count, dtype=D), torch.zeros(K, 2, d, dtype=D), count * eye.clone())


def tree_proposal(n_parts, log_ratios) -> mv.TreeSplitProposal:
    """Cell-tree proposals with given parts and ratios (labels are not read by the decision)."""
    return mv.TreeSplitProposal(tuple(() for _ in n_parts), tuple(n_parts), tuple(float(r) for r in log_ratios))


def test_split_of_two_gaussians_is_accepted():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=g, dtype=D)
    b = torch.randn(300, 4, generator=g, dtype=D) + torch.tensor([6.0, 0, 0, 0], dtype=D)
    x = torch.cat([a, b])
    z = torch.cat([torch.zeros(300), torch.ones(300)]).long()
    dec = decide(two_way(x, z), prior_for(x))
    assert dec.accepted == (0,) and dec.kinds == ("subnets",)
    assert dec.log_ratios[0] > 50


def test_split_of_one_gaussian_is_rejected_over_seeds():
    """Its best 2-way split (principal-axis halves) is rejected for every seed tried."""
    accepted = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(400, 4, generator=g, dtype=D) @ torch.diag(torch.tensor([3.0, 1, 1, 0.5], dtype=D))
        z = (x[:, 0] > x[:, 0].median()).long()  # the split a subclustering net would find
        accepted += len(decide(two_way(x, z), prior_for(x), seed=seed).accepted)
    assert accepted == 0


def test_the_better_scoring_proposal_faces_the_test():
    """Per cluster the subnets' or the tree's split, whichever has the higher log H_s; a tree of
    one part is no proposal."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 2, generator=g, dtype=D), torch.randn(300, 2, generator=g, dtype=D) + 8])
    z = torch.cat([torch.zeros(300), torch.ones(300)]).long()
    subs = SuffStats.concat([two_way(x, z)] * 3)  # three clusters, the same good subnet split
    prior = prior_for(x)
    h = decide(subs, prior).log_ratios[0]
    dec = decide(subs, prior, tree_proposal([3, 2, 1], [h + 5, h - 5, h + 50]))
    assert dec.proposed == (0, 1, 2)
    assert dec.kinds == ("tree", "subnets", "subnets")
    assert dec.log_ratios == pytest.approx((h + 5, h, h))
    assert dec.kind(0) == "tree" and dec.kind(2) == "subnets"


def test_ratios_below_log_u_are_rejected():
    """Accepted exactly where log u_k < log H_s, with u ~ U(0,1)^K the generator's first K draws."""
    K = 8
    u = torch.rand(K, generator=torch.Generator().manual_seed(3), dtype=D)
    above = torch.tensor([True, False, True, True, False, False, True, False])
    ratios = torch.log(u) + torch.where(above, 1e-6, -1e-6)
    dec = decide(small_subclusters(K), prior_for(torch.randn(50, 2, dtype=D)), tree_proposal([2] * K, ratios), seed=3)
    assert dec.proposed == tuple(range(K)) and set(dec.kinds) == {"tree"}
    assert dec.accepted == tuple(torch.nonzero(above).flatten().tolist())


def test_room_rule_drops_the_largest_splits_first():
    """max_clusters leaves room for 5 new clusters; the accepted splits would add 2 + 4 + 1 + 4 + 1:
    the two 5-way splits go (lowest index first among equals), then the rest fit."""
    K = 5
    tree = tree_proposal([3, 5, 2, 5, 1], [1e3] * 5)
    subs = small_subclusters(K)
    subs = SuffStats(subs.count.clone(), subs.sum.clone(), subs.scatter.clone())
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(300, 2, generator=g, dtype=D), torch.randn(300, 2, generator=g, dtype=D) + 8])
    good = two_way(x, torch.cat([torch.zeros(300), torch.ones(300)]).long())
    subs.count[4], subs.sum[4], subs.scatter[4] = good.count[0], good.sum[0], good.scatter[0]  # cluster 4: subnets
    prior = prior_for(x)
    dec = decide(subs, prior, tree, max_clusters=K + 5)
    assert dec.kinds == ("tree", "tree", "tree", "tree", "subnets")
    assert dec.accepted == (0, 2, 4) and dec.dropped == (1, 3)
    assert decide(subs, prior, tree, max_clusters=K + 12).dropped == ()  # all fit
    full = decide(subs, prior, tree, max_clusters=K)  # no room at all
    assert full.accepted == () and sorted(full.dropped) == [0, 1, 2, 3, 4]


def test_ineligible_clusters_are_never_proposed():
    """Subclusters under min_cluster_size (or a non-finite ratio) and no tree proposal: no proposal,
    whatever u is; the generator still gives K draws."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(300, 2, generator=g, dtype=D), torch.randn(300, 2, generator=g, dtype=D) + 8])
    good = two_way(x, torch.cat([torch.zeros(300), torch.ones(300)]).long())
    subs = SuffStats.concat([good, small_subclusters(1, count=5.0), good])
    subs.count[2, 1] = 0.0  # an empty subcluster: lgamma(0) = inf
    subs.sum[2, 1] = 0.0
    subs.scatter[2, 1] = 0.0
    prior = prior_for(x)
    for seed in range(5):
        dec = decide(subs, prior, seed=seed)
        assert dec.proposed == (0,) and dec.accepted == (0,)
    dec = decide(subs, prior, tree_proposal([1, 2, 1], [0.0, 1e3, 0.0]))  # the tree proposes cluster 1
    assert dec.proposed == (0, 1) and dec.kinds == ("subnets", "tree")


def test_decisions_are_reproducible_with_a_seeded_generator():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 2, generator=g, dtype=D)
    z = (x[:, 0] > 0).long()
    subs = SuffStats.concat([two_way(x, z)] * 30)
    prior = prior_for(x)
    assert decide(subs, prior, min_size=2, seed=9) == decide(subs, prior, min_size=2, seed=9)


def test_min_cluster_size_and_max_clusters_guard_splits():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(8, 2, generator=g, dtype=D)
    b = torch.randn(8, 2, generator=g, dtype=D) + 30
    x = torch.cat([a, b])
    z = torch.cat([torch.zeros(8), torch.ones(8)]).long()
    prior = prior_for(x)
    assert decide(two_way(x, z), prior, min_size=10).accepted == ()
    assert decide(two_way(x, z), prior, min_size=5).accepted == (0,)
    assert decide(two_way(x, z), prior, min_size=5, max_clusters=1).accepted == ()


def test_merge_of_two_halves_of_one_gaussian_is_accepted():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 3, generator=g, dtype=D)
    halves = stats_from_points(x, torch.nn.functional.one_hot((x[:, 0] > 0).long(), 2).to(D))
    far = stats_from_points(torch.randn(300, 3, generator=g, dtype=D) + 20)
    stats = SuffStats.concat([halves, SuffStats(far.count[None], far.sum[None], far.scatter[None])])
    xall = torch.cat([x, torch.randn(300, 3, generator=g, dtype=D) + 20])
    means = stats.sum / stats.count[:, None]
    neighbors = index.nearest_clusters(means, 2)
    dec = mv.propose_merges(prior_for(xall), 10.0, stats, neighbors, torch.Generator().manual_seed(0))
    assert dec.accepted == ((0, 1),)
    # each cluster in at most one merge per round
    flat = [c for pair in dec.accepted for c in pair]
    assert len(flat) == len(set(flat))


def test_each_cluster_merges_at_most_once_per_round():
    """Three halves of one blob: all pairs have H_m > 1, but only one merge is taken."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(900, 2, generator=g, dtype=D)
    z = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-0.43, 0.43], dtype=D))
    stats = stats_from_points(x, torch.nn.functional.one_hot(z, 3).to(D))
    neighbors = torch.tensor([[1, 2], [0, 2], [0, 1]])
    dec = mv.propose_merges(prior_for(x), 10.0, stats, neighbors, torch.Generator().manual_seed(0))
    assert len(dec.accepted) == 1 and len(dec.proposed) == 3


def test_merge_then_split_restores_both_clusters():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(200, 3, generator=g, dtype=D) + 5 * k for k in range(3)]
    x = torch.cat(xs)
    prior = prior_for(x)
    stats = SuffStats.concat(
        [SuffStats(*(t[None] for t in (s.count, s.sum, s.scatter))) for s in map(stats_from_points, xs)]
    )
    means, chol = map_estimate(prior, stats)
    params = GaussianParams(torch.log(stats.count / stats.count.sum()), means, chol)
    subs = mv.principal_axis_subclusters(prior, stats)
    merged = mv.apply_merges(mv.MergeDecision(((0, 2),), (0.0,), ((0, 2),)), params, subs, prior, stats)
    assert merged.params.n_clusters == 2 and merged.source.tolist() == [0, 1]
    # the merged cluster's subclusters are the former clusters 0 and 2 ...
    sub_stats = SuffStats(
        torch.stack([stats.count[[0, 2]], stats.count[[1, 1]]]),
        torch.stack([stats.sum[[0, 2]], stats.sum[[1, 1]]]),
        torch.stack([stats.scatter[[0, 2]], stats.scatter[[1, 1]]]),
    )
    # ... so splitting it again gives back clusters 0 and 2
    split = mv.apply_multi_splits({0: sub_stats[0]}, merged.params, merged.sub_params, prior)
    assert split.params.n_clusters == 3
    torch.testing.assert_close(split.params.means[[0, 2]], torch.stack([params.means[0], params.means[2]]))
    torch.testing.assert_close(split.params.chol[2], params.chol[2])
    torch.testing.assert_close(split.params.means[1], params.means[1])
    torch.testing.assert_close(split.params.log_weights.exp().sum(), torch.tensor(1.0, dtype=D))
    assert split.source.tolist() == [0, 1, 0] and sorted(split.fresh.tolist()) == [0, 2]


def test_prune_never_removes_every_cluster():
    assert mv.propose_prunes(torch.tensor([0.0, 0.2, 0.1], dtype=D), 1.0).removed == (0, 2)
    assert mv.propose_prunes(torch.tensor([5.0, 0.2], dtype=D), 1.0).removed == (1,)


def test_delete_ratio_is_the_change_of_the_whole_partitions_evidence():
    """log H_d of deleting c (its rows to their runner-ups) equals log p(X, partition) of the
    relabelled rows minus that of the original, each from every cluster's statistics; deletes
    that touch an accepted one's clusters wait, one with a row lacking a runner-up is -inf."""
    from cluster_service.core.niw import log_partition_evidence

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g, dtype=D) + 4 * torch.randint(0, 3, (400, 1), generator=g).to(D)
    K = 6
    z = torch.randint(0, K, (400,), generator=g)
    second = (z + torch.randint(1, K, (400,), generator=g)) % K  # never the row's own cluster
    second[(z == 4) & (second == 5)] = 3  # cluster 4's rows go to 0-3; 5 receives none of them
    prior = prior_for(x)

    def partition(labels):
        return stats_from_points(x, torch.nn.functional.one_hot(labels, K).to(D))

    hard = partition(z)
    proposed = (1, 4)
    moved = SuffStats.zeros((len(proposed), K), 3)
    for p, c in enumerate(proposed):
        rows = z == c
        m = stats_from_points(x[rows], torch.nn.functional.one_hot(second[rows], K).to(D))
        moved.count[p], moved.sum[p], moved.scatter[p] = m.count, m.sum, m.scatter
    dec = mv.propose_deletes(prior, 10.0, hard, moved, proposed, torch.Generator().manual_seed(1))
    for p, c in enumerate(proposed):
        relabelled = torch.where(z == c, second, z)
        want = log_partition_evidence(prior, 10.0, partition(relabelled)) - log_partition_evidence(prior, 10.0, hard)
        want = float(want)
        assert dec.log_ratios[p] == pytest.approx(want, rel=1e-9, abs=1e-6)
    # random labels: each delete raises the evidence (H_d > 1, accepted whatever u is), but both
    # send rows to clusters 0-3: only the better one is taken this round
    assert min(dec.log_ratios) > 0
    assert dec.accepted == (proposed[int(np.argmax(dec.log_ratios))],)
    # a proposal whose rows name the cluster itself as runner-up (no other cluster scored) is never taken
    selfish = SuffStats(moved.count.clone(), moved.sum.clone(), moved.scatter.clone())
    selfish.count[0, 1] = 1.0
    dec2 = mv.propose_deletes(prior, 10.0, hard, selfish, proposed, torch.Generator().manual_seed(1))
    assert dec2.log_ratios[0] == -float("inf") and 1 not in dec2.accepted


def test_k_change_surgery_keeps_inherited_rows():
    net = ClusterNet(4, 3, 8)
    new = resize_cluster_net(net, torch.tensor([0, 2, 2]))
    x = torch.randn(5, 4)
    torch.testing.assert_close(new(x)[:, [0, 1]], net(x)[:, [0, 2]])
    torch.testing.assert_close(new(x)[:, 2], net(x)[:, 2])
    subs = SubclusterNets(4, 3, 6, generator=torch.Generator().manual_seed(0))
    z = torch.tensor([0, 1, 2, 1, 0])
    new_subs = resize_subnets(subs, torch.tensor([1, 2]), torch.tensor([1]), torch.Generator().manual_seed(1))
    torch.testing.assert_close(new_subs(x, torch.zeros(5, dtype=torch.long)), subs(x, torch.ones(5, dtype=torch.long)))
    assert not torch.allclose(new_subs(x, torch.ones(5, dtype=torch.long)), subs(x, torch.full((5,), 2)))
    assert subs(x, z).shape == (5, 2)


def test_principal_axis_subclusters_split_along_the_long_axis():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2000, 3, generator=g, dtype=D) * torch.tensor([5.0, 1.0, 1.0], dtype=D)
    prior = prior_for(x)
    s = stats_from_points(x)
    subs = mv.principal_axis_subclusters(prior, SuffStats(s.count[None], s.sum[None], s.scatter[None]))
    diff = (subs.means[0, 1] - subs.means[0, 0]).abs()
    assert diff[0] > 6 and diff[1:].max() < 0.5
    assert np.isclose(float(subs.log_weights.exp().sum()), 1.0)


def test_a_uniform_draw_of_zero_accepts_every_finite_ratio(monkeypatch):
    """torch.rand draws from [0, 1): u = 0 (log u = -inf) must accept splits, merges and deletes
    with any finite log H, however low, and never raise."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 2, generator=g, dtype=D), torch.randn(300, 2, generator=g, dtype=D) + 8])
    prior = prior_for(x)
    monkeypatch.setattr(torch, "rand", lambda n, generator=None, dtype=None: torch.zeros(n, dtype=dtype))
    dec = decide(small_subclusters(3), prior, tree_proposal([2, 2, 2], [-1e6, -5.0, float("-inf")]))
    assert dec.accepted == (0, 1)
    one = stats_from_points(x[:300])
    stats = SuffStats.concat([SuffStats(one.count[None], one.sum[None], one.scatter[None])] * 2)
    far = stats_from_points(x[300:])
    stats = SuffStats.concat([stats, SuffStats(far.count[None], far.sum[None], far.scatter[None])])
    merges = mv.propose_merges(prior, 10.0, stats, torch.tensor([[1], [2], [1]]), g)
    assert merges.accepted == ((0, 1),)  # 1 and 2 also pass the test, but 1 is taken
    hard = stats_from_points(x, torch.nn.functional.one_hot((x[:, 0] > 4).long(), 2).to(D))
    moved = SuffStats.zeros((1, 2), 2)
    moved.count[0, 1], moved.sum[0, 1], moved.scatter[0, 1] = hard.count[0], hard.sum[0], hard.scatter[0]
    deletes = mv.propose_deletes(prior, 10.0, hard, moved, (0,), g)
    assert deletes.log_ratios[0] < -100 and deletes.accepted == (0,)

"""The truncated E-step (core/truncated.py) against dense references, and the engine's use of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from cluster_service.config import FitConfig
from cluster_service.core import gaussian
from cluster_service.core import truncated as tr
from cluster_service.core.gaussian import WhitenedGaussians, add_grouped_stats_, add_weighted_stats_, blocks
from cluster_service.core.niw import STAT_DTYPE, GaussianParams, SuffStats
from cluster_service.core.schedule import EpochPlan
from cluster_service.datasets import make_overlap_mixture
from cluster_service.train.engine import Engine


def _random_params(K: int, d: int, seed: int = 0) -> GaussianParams:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, d, d, generator=g, dtype=STAT_DTYPE) / math.sqrt(d)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=STAT_DTYPE)
    lw = torch.log_softmax(torch.randn(K, generator=g, dtype=STAT_DTYPE), 0)
    return GaussianParams(lw, 3 * torch.randn(K, d, generator=g, dtype=STAT_DTYPE), torch.linalg.cholesky(cov))


def test_candidate_scores_match_scipy():
    K, d, n = 7, 4, 50
    p = _random_params(K, d)
    x = torch.randn(n, d, dtype=STAT_DTYPE, generator=torch.Generator().manual_seed(1)) * 3
    cand = torch.randint(0, K, (n, 3), generator=torch.Generator().manual_seed(2))
    cand[::5, 2] = -1  # empty slots score -inf
    got = WhitenedGaussians(p, STAT_DTYPE).score_pairs(x, cand)
    cov = (p.chol @ p.chol.transpose(-1, -2)).numpy()
    for i in range(n):
        for j in range(3):
            k = int(cand[i, j])
            if k < 0:
                assert got[i, j] == -math.inf
                continue
            ref = float(p.log_weights[k]) + multivariate_normal(p.means[k].numpy(), cov[k]).logpdf(
                x[i].numpy())
            assert float(got[i, j]) == pytest.approx(ref, rel=1e-10, abs=1e-9)


def test_sparse_stats_equal_dense_when_candidates_cover_all_clusters():
    K, d, n = 6, 5, 400
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g, dtype=STAT_DTYPE)
    log_r = torch.log_softmax(torch.randn(n, K, generator=g, dtype=STAT_DTYPE) * 4, 1)
    dense = SuffStats.zeros((K,), d)
    add_weighted_stats_(dense, x, log_r.exp())
    index = torch.arange(K).expand(n, K)
    rows, bins, w = tr.truncate(index, log_r, min_weight=0.0)
    sparse = SuffStats.zeros((K,), d)
    add_grouped_stats_(sparse, x, rows, bins, w)
    torch.testing.assert_close(sparse.count, dense.count, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sparse.sum, dense.sum, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sparse.scatter, dense.scatter, rtol=1e-12, atol=1e-10)


def test_truncate_renormalises_and_keeps_the_best():
    log_r = torch.log(torch.tensor([[0.7, 0.3 - 1e-9, 1e-9], [1.0, 0.0, 0.0]], dtype=STAT_DTYPE))
    index = torch.tensor([[4, 2, 9], [1, -1, -1]])
    rows, bins, w = tr.truncate(index, log_r, min_weight=1e-6)
    assert rows.tolist() == [0, 0, 1] and bins.tolist() == [4, 2, 1]
    torch.testing.assert_close(w, torch.tensor([0.7, 0.3 - 1e-9, 1.0], dtype=STAT_DTYPE) / torch.tensor(
        [1 - 1e-9, 1 - 1e-9, 1.0], dtype=STAT_DTYPE))


def test_net_weights_on_candidates_add_the_nets_best_once_and_keep_its_normalisation():
    """on_candidates: the net's log r (normalised over all K) at the row's candidates plus its own
    best cluster; a best that is already a candidate is not counted twice; truncate then
    renormalises over what is kept."""
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]], dtype=STAT_DTYPE)
    cand = torch.tensor([[1, 3, -1], [1, 2, 0]])
    best = probs.argmax(1)
    index, log_r = tr.on_candidates(probs.log(), cand, best)
    assert index.tolist() == [[1, 3, -1, 0], [1, 2, 0, -1]]  # row 0's best (0) added, row 1's (1) is a candidate
    torch.testing.assert_close(log_r.exp(), torch.tensor([[0.2, 0.1, 0.0, 0.5], [0.6, 0.2, 0.1, 0.0]],
                                                         dtype=STAT_DTYPE))
    rows, bins, w = tr.truncate(index, log_r, min_weight=0.0)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1] and bins.tolist() == [1, 3, 0, 1, 2, 0]
    torch.testing.assert_close(w, torch.tensor([0.25, 0.125, 0.625, 2 / 3, 2 / 9, 1 / 9], dtype=STAT_DTYPE))
    # candidates covering every cluster: the net's own responsibilities, unchanged
    full = torch.tensor([[0, 1, 2, 3]] * 2)
    rows, bins, w = tr.truncate(*tr.on_candidates(probs.log(), full, best), min_weight=0.0)
    torch.testing.assert_close(w, probs.flatten())


def test_subcluster_stats_equal_the_hard_weighted_dense_ones():
    """add_grouped_stats_ with two weight columns (the subclusters): row i adds r_ij (1, x, x x^T)
    to subcluster (z_i, j), checked against an explicit sum over rows in float64."""
    g = torch.Generator().manual_seed(5)
    K, d, n = 4, 3, 300
    x = torch.randn(n, d, generator=g, dtype=STAT_DTYPE)
    z = torch.randint(0, K - 1, (n,), generator=g)  # cluster K-1 gets no rows
    r = torch.softmax(torch.randn(n, 2, generator=g, dtype=STAT_DTYPE), 1)
    got = SuffStats.zeros((K, 2), d)
    add_grouped_stats_(got, x, torch.arange(n), z, r)
    onehot = torch.zeros(n, K, 2, dtype=STAT_DTYPE)
    onehot[torch.arange(n), z] = r
    torch.testing.assert_close(got.count, onehot.sum(0))
    torch.testing.assert_close(got.sum, torch.einsum("nkj,nd->kjd", onehot, x))
    torch.testing.assert_close(got.scatter, torch.einsum("nkj,nd,ne->kjde", onehot, x, x))
    assert float(got.count[K - 1].abs().sum()) == 0.0


def test_candidates_dedupe_and_remap_through_moves():
    graph = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    best = torch.tensor([[1, 0, -1], [2, 2, 1]])
    cand = tr.build_candidates(best, graph, torch.tensor([0, 0]), n_candidates=7)
    assert [sorted(int(c) for c in r if c >= 0) for r in cand] == [[0, 1, 2], [0, 1, 2]]
    # old 0 split into new 0 and 3, old 1 merged into old 2 (now index 1), old 2 -> 1
    mapped = tr.remap_best(torch.tensor([[0, 1], [2, -1]]), [[0, 3], [1], [1]])
    assert mapped.tolist() == [[0, 3, 1, -1], [1, -1, -1, -1]]


def test_pseudo_random_clusters_depend_on_the_global_row_only():
    gi = torch.arange(1000)
    a = tr.pseudo_random_clusters(gi, 7, 50)
    b = tr.pseudo_random_clusters(gi[500:], 7, 50)  # another worker's rows
    assert torch.equal(a[500:], b) and a.min() >= 0 and a.max() < 50
    assert len(torch.unique(a)) == 50  # spread over all clusters
    assert not torch.equal(a, tr.pseudo_random_clusters(gi, 8, 50))  # a new draw each epoch


def test_keyed_kmeans_barely_moves_when_a_few_rows_leave():
    """index.kmeans with row keys (the split step's cells) starts from the rows of smallest key:
    10 of 4,000 rows leaving (a cluster's boundary rows in another worker layout) move its
    centroids a little; a start drawn by position is redrawn (measured: 0.15 vs 1.78 here)."""
    from cluster_service import index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 8)).astype(np.float32)  # one blob: many k-means optima
    keys = tr.row_hash(torch.arange(4000), 3).numpy()
    keep = np.setdiff1d(np.arange(4000), rng.choice(np.argsort(keys)[20:], 10, replace=False))

    def shift(a, b):  # the farthest any centroid of a is from its nearest centroid of b
        return float(np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1).max())

    full = index.kmeans(x, 8, 0, keys=keys)
    assert shift(full, index.kmeans(x[keep], 8, 0, keys=keys[keep])) < 0.3

def test_cluster_graph_lists_itself_first_then_the_overlapping_cluster():
    means = torch.tensor([[0.0, 0.0], [0.5, 0.0], [10.0, 0.0], [10.4, 0.0]], dtype=STAT_DTYPE)
    chol = torch.eye(2, dtype=STAT_DTYPE).expand(4, 2, 2).clone()
    p = GaussianParams(torch.full((4,), -math.log(4), dtype=STAT_DTYPE), means, chol)
    graph = tr.cluster_graph(WhitenedGaussians(p, STAT_DTYPE), means, 2)
    assert graph.tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]


def _engine(x: np.ndarray, candidates: int, k: int, responsibilities: str = "net") -> Engine:
    cfg = FitConfig(init="kmeans", k_init=k, seed=0, candidates=candidates,
                    responsibilities=responsibilities).replace(**{"moves.prune_below": 0.0})
    eng = Engine(cfg, torch.from_numpy(x))
    eng.initialize()
    return eng


def test_engine_truncated_statistics_equal_dense_with_full_candidates():
    """Candidates covering all K and no weight floor: the truncated epoch's statistics are the
    dense ones (float32 products summed in float64 in another order)."""
    x, _ = make_overlap_mixture(3000, 6, 8, seed=1)
    eng = _engine(x, candidates=6, k=8)
    eng.estep.min_weight = 0.0
    full = torch.arange(eng.n_clusters).expand(eng.x.shape[0], -1)
    eng.estep.best = full.clone()
    scores = eng.estep.candidates(eng.params, eng.epoch)
    cand = scores.table.index
    assert bool((cand >= 0).all()) and cand.shape[1] == eng.n_clusters  # every cluster a candidate
    for use_estep in (True, False):
        sparse, sparse_sub = eng.accumulate(use_estep, scores)
        dense, dense_sub = eng.accumulate(use_estep, eng.estep.dense(eng.params))
        for a, b in ((sparse, dense), (sparse_sub, dense_sub)):
            scale = float(b.scatter.abs().max())
            torch.testing.assert_close(a.count, b.count, rtol=1e-5, atol=1e-3)
            torch.testing.assert_close(a.sum, b.sum, rtol=1e-5, atol=1e-5 * scale)
            torch.testing.assert_close(a.scatter, b.scatter, rtol=1e-5, atol=1e-5 * scale)


def test_engine_truncated_epoch_stays_close_to_dense_with_small_candidate_sets():
    """K 40 with 6 candidates a row: after one E-step-weighted epoch from the same state the
    truncated statistics differ from the dense ones by a bounded amount, and the final
    assignment is the exact MAP one for almost every row."""
    x, _ = make_overlap_mixture(8000, 6, 40, seed=2)
    eng = _engine(x, candidates=6, k=40, responsibilities="estep")
    state = eng.state_dict()
    dense = _engine(x, candidates=0, k=40, responsibilities="estep")
    dense.load_state_dict(state)
    plan = EpochPlan(epoch=dense.cfg.schedule.warmup_epochs + 1, m_step=True, train_subnets=True, move=None)
    assert eng.estep.truncates(eng.n_clusters) and not dense.estep.truncates(dense.n_clusters)
    rec_t, rec_d = eng.run_epoch(plan), dense.run_epoch(plan)
    assert rec_t.log_densities < 0.25 * rec_d.log_densities  # 6-ish of 40 per row, once
    st, sd = eng.last_stats[0], dense.last_stats[0]
    assert float((st.count - sd.count).abs().sum()) < 0.01 * x.shape[0]  # < 1 % of rows move
    per_row_dim = abs(rec_t.log_marginal - rec_d.log_marginal) / (x.shape[0] * x.shape[1])
    assert per_row_dim < 1e-3
    z_t, _ = eng.assign()
    dense.params = eng.params  # exact MAP under the same parameters
    z_d, _ = dense.assign()
    assert (z_t == z_d).mean() > 0.999


def test_candidates_survive_a_checkpoint():
    x, _ = make_overlap_mixture(3000, 4, 30, seed=3)
    eng = _engine(x, candidates=6, k=30)
    eng.estep.candidates(eng.params, eng.epoch)
    state = eng.state_dict()
    other = _engine(x, candidates=6, k=30)
    other.load_state_dict(state)
    assert torch.equal(other.estep.best, eng.estep.best)
    torch.testing.assert_close(other.estep.candidates(other.params, other.epoch).table.log_r,
                               eng.estep.candidates(eng.params, eng.epoch).table.log_r)


def test_imagenet_proxy_rows_are_unit_and_components_unequal():
    from cluster_service.datasets import make_imagenet_proxy

    x, y = make_imagenet_proxy(6000, 16, 30, seed=4)
    assert x.shape == (6000, 16) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sizes = np.bincount(y, minlength=30)
    assert sizes.min() > 0 and sizes.max() / sizes.min() > 3  # unequal, like ImageNet's classes
    # real overlap: the nearest class mean misclassifies a share of rows, but far from all
    means = np.stack([x[y == k].mean(0) for k in range(30)])
    nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), 1)
    assert 0.5 < (nearest == y).mean() < 0.99



def test_subnets_step_once_per_rows_per_net_times_k_rows():
    """At large K the subnets take one optimizer step per SUB_ROWS_PER_NET * K rows (the
    clustering net one per batch); at small K both step every batch."""
    from cluster_service.train.engine import SUB_ROWS_PER_NET

    x, _ = make_overlap_mixture(6000, 4, 300, seed=4)
    for k in (8, 300):
        eng = _engine(x, candidates=16, k=k)
        plan = EpochPlan(epoch=eng.cfg.schedule.warmup_epochs + 1, m_step=True, train_subnets=True, move=None)
        eng.run_epoch(plan)
        B = min(eng.cfg.net.batch_size, math.ceil(6000 / eng.cfg.net.min_steps_per_epoch))
        steps = math.ceil(6000 / B)
        every = max(1, math.ceil(SUB_ROWS_PER_NET * k / B))
        sub_steps = int(next(iter(eng.sub_opt.state.values()))["step"])
        cl_steps = int(next(iter(eng.opt.state.values()))["step"])
        assert cl_steps == steps
        assert sub_steps == math.ceil(steps / every)
        assert (sub_steps == steps) == (k == 8)


def test_blocks_cover_each_bin_in_order_at_most_block_at_a_time():
    keys = torch.tensor([3, 0, 3, 1, 3, 3, 0, 3, 3], dtype=torch.int64)
    got = list(blocks(keys, 5, block=2))
    assert all(pos.numel() <= 2 for _, pos in got)
    assert [k for k, _ in got] == sorted(k for k, _ in got)  # bins ascending
    for k in range(5):
        mine = [pos for b, pos in got if b == k]
        joined = torch.cat(mine) if mine else torch.empty(0, dtype=torch.long)
        assert torch.equal(joined, torch.nonzero(keys == k).flatten())  # every position once, ascending


def test_blocked_scoring_and_statistics_equal_one_block(monkeypatch):
    """The per-cluster loops give the same numbers whatever the block size (a cluster's rows in
    several blocks of 7 rows vs one block)."""
    K, d, n = 5, 4, 300
    p = _random_params(K, d, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, d, dtype=STAT_DTYPE, generator=g) * 3
    cand = torch.randint(0, K, (n, 3), generator=g)
    log_r = torch.log_softmax(torch.randn(n, 3, generator=g, dtype=STAT_DTYPE), 1)
    z = torch.randint(0, K, (n,), generator=g)
    r = torch.softmax(torch.randn(n, 2, generator=g, dtype=STAT_DTYPE), 1)

    def run():
        scores = WhitenedGaussians(p, STAT_DTYPE).score_pairs(x, cand)
        rows, bins, w = tr.truncate(cand, log_r, 0.0)
        stats, sub = SuffStats.zeros((K,), d), SuffStats.zeros((K, 2), d)
        add_grouped_stats_(stats, x, rows, bins, w)
        add_grouped_stats_(sub, x, torch.arange(n), z, r)
        return scores, stats, sub

    whole = run()
    monkeypatch.setattr(gaussian, "BLOCK_ROWS", 7)
    blocked = run()
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-12, atol=1e-12)
    for a, b in ((blocked[1], whole[1]), (blocked[2], whole[2])):
        for field in ("count", "sum", "scatter"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-12, atol=1e-10)


def test_fit_margin_from_the_truncated_pass_matches_the_dense_margin():
    """finish_fit's margin comes from the engine's own (truncated) scoring pass: best minus
    runner-up log-joint. Against the dense margin of the same model (serve's exact_assign): equal
    where the runner-up is a candidate (nearly every row), never smaller where it is not."""
    from cluster_service.serve.assign import exact_assign
    from cluster_service.train.export import finish_fit

    x, _ = make_overlap_mixture(6000, 5, 40, seed=8)
    eng = _engine(x, candidates=16, k=40)  # the default candidate-set size
    assert eng.estep.truncates(eng.n_clusters)
    model, clusters, _, margin = finish_fit(eng)
    exact = exact_assign(model, x.astype(np.float64))
    assert np.array_equal(clusters, exact.cluster)
    dense = exact.margin
    same = np.isclose(margin, dense, rtol=1e-6, atol=1e-4)  # centred vs original coordinates
    # the runner-up is a candidate for 99.5 % of rows here (99.9 % with 3 nearest means and 9
    # graph neighbours: in 5 dimensions the graph finds runners-up better; in 32 and 128 the
    # nearest means cover 3.5-5x more of the E-step's mass, truncated.N_NEAR)
    assert same.mean() > 0.99
    assert np.all(margin[~same] >= dense[~same])  # a missing runner-up only overstates it
    assert np.all(margin >= 0)


def test_bfloat16_training_pass_trains_the_net_as_float32_does():
    """net.train_precision bfloat16 (autocast of the clustering net's training pass only): from
    the same state, two epochs leave a net whose argmax agrees with the E-step's MAP about as
    often as the float32-trained net's, with a similar loss."""
    x, _ = make_overlap_mixture(8000, 6, 40, seed=9)
    base = _engine(x, candidates=8, k=40, responsibilities="estep")
    state = base.state_dict()
    out = {}
    for precision in ("float32", "bfloat16"):
        eng = _engine(x, candidates=8, k=40, responsibilities="estep")
        eng.cfg = eng.cfg.replace(**{"net.train_precision": precision})
        eng.load_state_dict(state)
        assert eng._train_autocast(truncated=True).fast_dtype == torch.bfloat16
        assert eng._train_autocast(truncated=True)._enabled == (precision == "bfloat16")
        plan = EpochPlan(epoch=1, m_step=False, train_subnets=False, move=None)
        recs = [eng.run_epoch(plan) for _ in range(2)]
        z_map, _ = eng.assign()
        net = eng.log_responsibilities(eng.x, use_estep=False).argmax(1).numpy()
        out[precision] = (recs[-1].loss_cluster, (net == z_map).mean())
    (l32, agree32), (l16, agree16) = out["float32"], out["bfloat16"]
    assert agree32 > 0.8 and agree16 > agree32 - 0.02
    assert abs(l16 - l32) < 0.1 * l32 + 0.01


def test_stale_candidates_recover_the_exact_map_at_the_next_scoring():
    """Kept candidates that no longer hold a row's best cluster (here: clusters 0-2 for every
    row). Without the nearest means among the candidates the graph neighbours of those clusters
    give a wrong assignment; with them (every scoring, tr.build_candidates) the next scoring
    finds the exact MAP again."""
    x, _ = make_overlap_mixture(8000, 6, 40, seed=2)
    eng = _engine(x, candidates=8, k=40)
    dense = _engine(x, candidates=0, k=40)
    dense.params = eng.params
    z_exact, _ = dense.assign()
    stale = torch.tensor([0, 1, 2]).expand(x.shape[0], -1).clone()
    rand = tr.pseudo_random_clusters(torch.arange(x.shape[0]), 0, 40)
    without = tr.build_candidates(stale, eng.estep.cluster_graph(eng.params), rand, 8)
    log_j = eng.estep.scorer(eng.params, torch.float64).score_pairs(eng.x, without)
    z_without = without.gather(1, log_j.argmax(1, keepdim=True))[:, 0].numpy()
    assert (z_without == z_exact).mean() < 0.5
    eng.estep.best = stale
    z, _ = eng.assign()
    assert (z == z_exact).mean() > 0.999


def test_candidates_hold_the_nearest_means_within_the_budget():
    graph = torch.arange(10).expand(10, 10)  # every cluster's neighbours: 0, 1, ..., 9
    best = torch.tensor([[9, 8, 7], [5, -1, -1]])
    nearest = torch.tensor([[4, 3, 2], [5, 6, 1]])
    rand = torch.tensor([7, 0])
    cand = tr.build_candidates(best, graph, rand, n_candidates=9, nearest=nearest)
    got = [sorted(int(c) for c in r if c >= 0) for r in cand]
    # best 3 + nearest 3 + 2 graph neighbours (0, 1) + the random one; row 1's -1s stay empty
    assert got == [[0, 1, 2, 3, 4, 7, 8, 9], [0, 1, 5, 6]]
    assert cand.shape[1] <= 9
    # the smallest budget keeps one graph neighbour and one nearest mean
    small = tr.build_candidates(best, graph, rand, n_candidates=6, nearest=nearest)
    assert [sorted(int(c) for c in r if c >= 0) for r in small][0] == [0, 4, 7, 8, 9]


def test_calibrate_mass_reaches_the_target_masses_and_keeps_each_rows_ratios():
    """Sinkhorn steps on sparse weights: the reweighted columns reach the target totals, every
    row still sums to 1, and within a row the weights keep their ratios up to the factors c."""
    g = torch.Generator().manual_seed(0)
    n, K = 400, 9
    rows = torch.arange(n).repeat_interleave(3)
    bins = torch.stack([torch.randperm(K, generator=g)[:3] for _ in range(n)]).flatten()
    w = torch.rand(n * 3, generator=g, dtype=STAT_DTYPE) + 0.05
    w = w / torch.bincount(rows, w, minlength=n)[rows]
    raw = torch.bincount(bins, w, minlength=K)
    target = raw * torch.linspace(0.7, 1.3, K, dtype=STAT_DTYPE)
    target = target * (n / target.sum())  # the totals of a partition of n rows
    log_c = tr.calibrate_mass(target, lambda lc: torch.bincount(bins, tr.reweight(rows, bins, w, lc, n), minlength=K),
                              300)
    out = tr.reweight(rows, bins, w, log_c, n)
    torch.testing.assert_close(torch.bincount(bins, out, minlength=K), target, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.bincount(rows, out, minlength=n), torch.ones(n, dtype=STAT_DTYPE))
    ratio = (out / w) / log_c.exp()[bins]  # one number per row
    torch.testing.assert_close(ratio.view(n, 3), ratio.view(n, 3)[:, :1].expand(n, 3))
    assert float((raw - target).abs().max()) > 1.0  # the uncalibrated totals were off


@pytest.mark.parametrize("candidates", [0, 6])
def test_net_weighted_statistics_carry_the_estep_masses(monkeypatch, candidates):
    """FitConfig.net_mass "estep": the net-weighted statistics' per-cluster counts are the
    E-step's (to Sinkhorn convergence), densely and on candidates; "net" leaves the net's."""
    import cluster_service.train.estep as estep_mod

    monkeypatch.setattr(estep_mod, "MASS_CALIBRATION_STEPS", 1000)
    x, _ = make_overlap_mixture(3000, 6, 20, seed=4)
    eng = _engine(x, candidates=candidates, k=20)
    assert eng.estep.truncates(eng.n_clusters) == (candidates > 0)
    for e in range(eng.cfg.schedule.warmup_epochs + 2):  # the net trains; two net-weighted M-steps
        eng.run_epoch(EpochPlan(epoch=e, m_step=e >= eng.cfg.schedule.warmup_epochs, train_subnets=True, move=None))
    scores = eng.estep.score(eng.params, eng.epoch)
    eng.estep.min_weight = 0.0
    e_stats, _ = eng.accumulate(True, scores, subclusters=False)
    calibrated, _ = eng.accumulate(False, scores, subclusters=False)
    eng.estep.net_mass = "net"
    raw, _ = eng.accumulate(False, scores, subclusters=False)
    torch.testing.assert_close(calibrated.count, e_stats.count, rtol=1e-4, atol=1e-2)
    assert float((raw.count - e_stats.count).abs().max()) > 1.0  # the net alone is off
    assert float(calibrated.count.sum()) == pytest.approx(x.shape[0])


def test_tail_held_by_the_mass_past_a_rows_best_candidates():
    """A row's tail is held when its candidates past its best tail_from (half its candidate budget)
    hold under TAIL_MASS of its mass, whatever the slot order; rows with at most tail_from candidates
    always are."""
    tail_from = 8
    C = 2 * tail_from
    decayed = torch.cat([torch.full((tail_from,), 1.0), torch.full((C - tail_from,), 1e-3 * tr.TAIL_MASS)])
    spread = torch.ones(C)
    edge_in = torch.cat([torch.full((tail_from,), 1.0), torch.full((C - tail_from,), 0.5 * tr.TAIL_MASS)])
    edge_out = torch.cat([torch.full((tail_from,), 1.0), torch.full((C - tail_from,), 2.0 * tr.TAIL_MASS)])
    p = torch.stack([decayed, spread, edge_in, edge_out])
    log_r = torch.log(p / p.sum(1, keepdim=True))
    tail = (p / p.sum(1, keepdim=True))[:, tail_from:].sum(1)
    expect = tail < tr.TAIL_MASS
    assert expect.tolist() == [True, False, True, False]
    shuffled = log_r[:, torch.randperm(C, generator=torch.Generator().manual_seed(0))]
    assert tr.tail_held(shuffled, tail_from).tolist() == expect.tolist()
    few = torch.full((2, C), -math.inf)
    few[:, : tail_from] = math.log(1 / tail_from)
    assert tr.tail_held(few, tail_from).all()

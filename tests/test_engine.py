"""End to end: K recovery, determinism, checkpoint round trip, the exported model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster_service.config import FitConfig
from cluster_service.core.gaussian import row_argmax
from cluster_service.core.schedule import build_plan
from cluster_service.datasets import load_digits_pca, make_mixture
from cluster_service.report.evaluate import score
from cluster_service.train import move_steps
from cluster_service.train.engine import Engine
from cluster_service.train.fit import fit, run_schedule


@pytest.fixture(scope="module")
def mixture12():
    return make_mixture(20000, 16, 12, seed=0, imbalance=4.0)


@pytest.fixture(scope="module")
def fit12(mixture12):
    x, _ = mixture12
    return fit(x, FitConfig(init="kmeans", k_init=2, seed=0))  # K from the split moves alone


def test_recovers_k_on_an_imbalanced_mixture(mixture12, fit12):
    _, y = mixture12
    s = score(y, fit12.clusters)
    assert abs(s.k_found - 12) <= 1, s
    assert s.nmi >= 0.9, s
    assert fit12.history[-1].n_clusters == fit12.n_clusters
    # K was inferred by moves: it started at 2 and splits were accepted
    assert fit12.history[0].n_clusters == 2
    # (a split may be many-way: the cell-tree proposals split a cloud of components at once)
    assert sum(r.splits_accepted for r in fit12.history) >= 2


def test_default_start_recovers_k_and_stores_a_hierarchy(mixture12):
    """The default start (k-means at the best-evidence K of a grid) and the moves agree on K;
    the model's merge tree cuts to any coarser level."""
    x, y = mixture12
    res = fit(x, FitConfig(seed=0))
    s = score(y, res.clusters)
    assert abs(s.k_found - 12) <= 1 and s.nmi >= 0.9, s
    K = res.n_clusters
    assert res.model.tree_linkage.shape == (K - 1, 4)
    groups = res.model.cut(3)
    assert groups.shape == (K,) and set(groups.tolist()) == {0, 1, 2}


def test_exported_model_reproduces_training_assignments(mixture12, fit12, tmp_path):
    from cluster_service.serve.model import load_model

    x, _ = mixture12
    path = fit12.model.save(tmp_path / "model")
    model = load_model(path, n_features=16)
    clusters, log_prob = model.predict(x)
    assert (clusters == fit12.clusters).mean() > 0.9999
    np.testing.assert_allclose(log_prob, fit12.log_prob, rtol=1e-6, atol=1e-6)
    # the stored clustering net agrees with the exact MAP assignment on almost every point
    assert (model.net_logits(x).argmax(1) == clusters).mean() > 0.98


def test_digits_run_reports_sensible_metrics():
    x, y = load_digits_pca(16)
    res = fit(x, FitConfig(seed=0))
    s = score(y, res.clusters)
    assert 6 <= s.k_found <= 16, s
    assert s.nmi > 0.6 and s.acc > 0.5, s


def test_same_seed_gives_identical_k_and_assignments():
    x, _ = make_mixture(3000, 8, 6, seed=3)
    cfg = FitConfig(seed=7).replace(**{"schedule.epochs": 50})
    a, b = fit(x, cfg), fit(x, cfg)
    assert a.n_clusters == b.n_clusters
    np.testing.assert_array_equal(a.clusters, b.clusters)
    assert [r.n_clusters for r in a.history] == [r.n_clusters for r in b.history]


def test_checkpoint_resume_reproduces_the_uninterrupted_run():
    x, _ = make_mixture(3000, 8, 6, seed=4)
    cfg = FitConfig(seed=1).replace(**{"schedule.epochs": 45})
    full = fit(x, cfg)
    xt = torch.from_numpy(x.astype(np.float64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        first = Engine(cfg, xt)
        first.initialize()
        run_schedule(first, stop_after=27)  # stop mid-run, right after a move window
        state = first.state_dict()
    resumed = Engine(cfg, xt)
    resumed.load_state_dict(state)
    assert resumed.epoch == 27
    run_schedule(resumed)
    clusters, _ = resumed.assign()
    assert resumed.n_clusters == full.n_clusters
    np.testing.assert_array_equal(clusters, full.clusters)


def test_schedule_plan_alternates_splits_and_merges():
    plan = build_plan(FitConfig().schedule)
    moves = [(p.epoch, p.move) for p in plan if p.move]
    assert moves[0] == (15, "split") and moves[1] == (20, "merge")
    assert all(a[1] != b[1] for a, b in zip(moves, moves[1:], strict=False))
    assert all(p.move is None for p in plan[-10:])
    assert not plan[0].m_step and plan[5].m_step


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "name, make",
    [
        # L2-normalised embeddings on the unit sphere (like MoCo features), default priors
        ("sphere d=32 K=8", lambda: (lambda xy: (_l2(xy[0]), xy[1]))(make_mixture(4000, 32, 8, seed=5, separation=5))),
        # high dimension, few points per cluster relative to d^2, strong imbalance
        ("d=64 K=6 imbalance 8", lambda: make_mixture(3000, 64, 6, seed=6, imbalance=8.0)),
        # features in large units: the data-scaled prior makes units irrelevant
        ("d=8 K=9 scale 1e4", lambda: make_mixture(4000, 8, 9, seed=7, scale=1e4)),
    ],
)
def test_recovers_k_on_varied_data_with_default_settings(name, make):
    x, y = make()
    s = score(y, fit(x, FitConfig(seed=0)).clusters)
    assert s.k_found == s.k_true, (name, s)
    assert s.nmi > 0.95, (name, s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_matches_cpu_fit():
    """float32 dense math on the GPU reaches the same K and (almost) the same assignments."""
    x, y = make_mixture(6000, 16, 8, seed=9)
    cfg = FitConfig(seed=0).replace(**{"schedule.epochs": 70})
    cpu = fit(x, cfg.replace(device="cpu"))
    gpu = fit(x, cfg.replace(device="cuda"))
    assert gpu.n_clusters == cpu.n_clusters == 8
    assert score(y, gpu.clusters).nmi > 0.99
    assert np.isfinite(gpu.model.chol).all()


# ---- early stop (core.schedule.Convergence) --------------------------------------------------


def _feed(conv, ks, mls, moved=()):
    """Feed a whole default plan: K and log marginal per round end (index 0 = before the first
    split, then one per merge epoch); epochs in between repeat the round's values."""
    from types import SimpleNamespace

    plan = build_plan(conv.cfg)
    first = conv.cfg.first_split
    ran = []
    for row in plan:
        row = conv.allows(row)
        if row is None:
            break
        r = 0 if row.epoch < first else 1 + (row.epoch - first) // conv.cfg.move_period
        r = min(r, len(ks) - 1)
        rec = SimpleNamespace(epoch=row.epoch, n_clusters=ks[r], log_marginal=mls[r],
                              splits_accepted=int(row.move == "split" and r in moved), merges_accepted=0, pruned=0,
                              deletes_accepted=0)
        conv.observe(row, rec)
        ran.append(row)
    return ran


def test_early_stop_waits_for_k_and_the_marginal_to_settle():
    from cluster_service.core.schedule import Convergence

    cfg = FitConfig().schedule  # stop_rounds 2, first split 15, period 10: round ends 14, 20, 30, ...
    n = 1000
    # K settled from the start and the marginal flat: stop at the second merge epoch (30)
    ran = _feed(Convergence(cfg, n), [5] * 20, [-100.0] * 20)
    assert len(ran) == 31 and ran[-1].epoch == 30
    # K still growing for 6 rounds: never cut off while it grows; stops 2 rounds after the last change
    ks = [1, 2, 4, 8, 12, 15, 17] + [17] * 20
    ran = _feed(Convergence(cfg, n), ks, [-100.0] * len(ks))
    assert ran[-1].epoch == 20 + 10 * 7, [r.epoch for r in ran][-3:]
    # K settled but the marginal still improving by 0.02 nats per row per round: runs to the cap
    conv = Convergence(cfg, n)
    ran = _feed(conv, [5] * 20, [-100.0 + 20.0 * i for i in range(20)])
    assert len(ran) == cfg.epochs and conv.stop_at is None
    assert conv.why_stopped(ran[-1].epoch, cfg.epochs).startswith("epoch cap")
    # off: the whole calendar
    off = FitConfig().replace(**{"schedule.stop_rounds": 0}).schedule
    assert len(_feed(Convergence(off, n), [5] * 20, [-100.0] * 20)) == off.epochs


def test_early_stop_lets_a_large_k_move_by_a_percent():
    """At K ~1,000 the moves' random draws change K by a few every round; within 1 % (rounded
    down) counts as settled there, while a small K must not move at all."""
    from cluster_service.core.schedule import Convergence

    cfg = FitConfig().schedule
    # round ends 14, 20, 30, 40, 50, 60: 1074, 958, 942, 928, 923, 922 -> within 9 at the ends 40-60
    ks = [1074, 958, 942, 928, 923, 922, 924, 923, 922] + [922] * 10
    conv = Convergence(cfg, 1000)
    ran = _feed(conv, ks, [-100.0] * len(ks))
    assert conv.stop_at is not None and ran[-1].epoch == 60, [r.epoch for r in ran][-3:]
    assert "928, 923, 922" in conv.reason and "within 9" in conv.reason
    # the same drift with the exact rule (stop_k_tol 0): K is never the same at three round ends
    # before the last move round (epoch 100), so the fit runs to the cap, as the real one did
    exact = FitConfig().replace(**{"schedule.stop_k_tol": 0.0}).schedule
    conv = Convergence(exact, 1000)
    ran = _feed(conv, ks, [-100.0] * len(ks))
    assert conv.stop_at is None and len(ran) == exact.epochs
    # a small K moving by one per round is not settled (slack int(0.01 * 50) = 0)
    small = [40, 45, 50, 51, 50, 51, 50, 51, 50, 51, 50, 51]
    conv = Convergence(cfg, 1000)
    ran = _feed(conv, small, [-100.0] * len(small))
    assert conv.stop_at is None and len(ran) == cfg.epochs


def test_early_stop_settles_after_a_late_move_and_survives_a_checkpoint():
    from cluster_service.core.schedule import Convergence

    cfg = FitConfig().schedule
    conv = Convergence(cfg, 1000)
    # a split accepted in the last round (and merged back: K unchanged) -> settle epochs without moves
    ran = _feed(conv, [5] * 20, [-100.0] * 20, moved={2})
    assert conv.stop_at == 31 + cfg.freeze_epochs + 1 and len(ran) == conv.stop_at
    assert all(r.move is None for r in ran[31:])
    assert "settle" in conv.reason and "K 5" in conv.reason
    again = Convergence.from_state(cfg, 1000, 1, conv.state())
    assert again == conv


def test_fit_stops_early_with_the_k_and_partition_of_the_full_calendar():
    """Defaults on an easy mixture: the fit ends well before the cap, says why, and gives the
    same K and assignments as running every planned epoch."""
    x, y = make_mixture(4000, 8, 6, seed=11)
    early = fit(x, FitConfig(seed=0))
    full = fit(x, FitConfig(seed=0).replace(**{"schedule.stop_rounds": 0}))
    assert len(early.history) < 0.6 * len(full.history) == 0.6 * FitConfig().schedule.epochs
    assert early.history[-1].stopped.startswith("converged") and not early.history[-2].stopped
    assert full.history[-1].stopped.startswith("epoch cap")
    assert early.n_clusters == full.n_clusters == 6
    assert score(y, early.clusters).nmi >= score(y, full.clusters).nmi - 0.005


def test_statistics_paths_agree_beyond_the_dense_subcluster_limit(monkeypatch):
    """Above DENSE_SUBCLUSTER_MAX clusters the subcluster statistics are summed after the pass,
    grouped by bin; they equal the one-matmul path's (float32 products, float64 sums)."""
    import cluster_service.train.estep as estep_mod

    x, _ = make_mixture(3000, 6, 5, seed=12)
    eng = Engine(FitConfig(init="kmeans", k_init=5, seed=0), torch.from_numpy(x.astype(np.float64)))
    eng.initialize()
    dense_stats, dense_sub = eng.accumulate(use_estep=False)
    monkeypatch.setattr(estep_mod, "DENSE_SUBCLUSTER_MAX", 0)
    stats, sub = eng.accumulate(use_estep=False)
    for a, b in ((stats, dense_stats), (sub, dense_sub)):
        torch.testing.assert_close(a.count, b.count, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(a.sum, b.sum, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(a.scatter, b.scatter, rtol=1e-5, atol=1e-2)
    assert sub.count.shape == (5, 2) and float(sub.count.sum()) == pytest.approx(3000, rel=1e-6)


def test_split_cells_partition_each_cluster_into_its_nearest_centroid_cells():
    """cell_stats: each row counted once, in a cell of its own MAP cluster (the cells of a cluster
    sum to its hard statistics) and in the cell of the nearest of that cluster's cells' means."""
    x, _ = make_mixture(3000, 6, 5, seed=12)
    eng = Engine(FitConfig(init="kmeans", k_init=3, seed=0), torch.from_numpy(x.astype(np.float64)))
    eng.initialize()
    z = torch.from_numpy(eng.assign()[0])
    n_cells = [4, 2, 3]
    cells = move_steps.cell_stats(eng, n_cells)
    hard = eng.rows.hard_stats(z, 3)
    assert cells.count.shape == (3, 4)
    torch.testing.assert_close(cells.count.sum(1), hard.count)
    torch.testing.assert_close(cells.sum.sum(1), hard.sum, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(cells.scatter.sum(1), hard.scatter, rtol=1e-9, atol=1e-6)
    for k, m in enumerate(n_cells):
        assert int((cells.count[k] > 0).sum()) == m and float(cells.count[k, m:].sum()) == 0
    # every row is nearer its own cell's mean than any other cell mean of its cluster
    # (k-means centroids are the cell means up to k-means' last update: checked by the cell
    # means' own Voronoi counts agreeing with the cells' counts to a few rows)
    xs = eng.x.double()
    means = cells.sum / cells.count.clamp_min(1)[..., None]
    for k, m in enumerate(n_cells):
        rows = xs[z == k]
        near = torch.cdist(rows, means[k, :m]).argmin(1)
        agree = torch.bincount(near, minlength=m).double()
        assert float((agree - cells.count[k, :m]).abs().sum()) <= 0.05 * rows.shape[0]


def test_subnets_grouped_forward_equals_each_row_through_its_own_net():
    """SubclusterNets groups rows by cluster into bmm segments; outputs and gradients equal the
    per-row definition x_i -> relu(x_i W1[z_i] + b1[z_i]) W2[z_i] + b2[z_i], including clusters
    with no rows and one cluster holding a third of them."""
    from cluster_service.core.nets import SubclusterNets

    g = torch.Generator().manual_seed(0)
    for n, K, d, h in ((300, 7, 5, 4), (1000, 400, 8, 3), (3, 5, 2, 2)):
        net = SubclusterNets(d, K, h, input_scale=1.7, generator=g).double()
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        z = torch.randint(0, K, (n,), generator=g)
        z[: n // 3] = 0
        xs = x / net.input_scale  # float32's 1.7, as the module divides
        hid = torch.relu(torch.einsum("nd,ndh->nh", xs, net.w1[z]) + net.b1[z])
        ref = torch.einsum("nh,nhj->nj", hid, net.w2[z]) + net.b2[z]
        out = net(x, z)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        weights = torch.randn(n, 2, generator=g, dtype=torch.float64)
        for p_got, p_ref in zip(torch.autograd.grad((out * weights).sum(), list(net.parameters())),
                                torch.autograd.grad((ref * weights).sum(), list(net.parameters())), strict=True):
            torch.testing.assert_close(p_got, p_ref, rtol=1e-12, atol=1e-12)


def test_settle_steps_bring_perturbed_parameters_to_the_same_fixed_point():
    """Engine.settle (EM with E-step weights, no nets): two copies of a fitted state whose means
    differ by a small perturbation (what the nets' float rounding leaves) end much closer."""
    from cluster_service.core.niw import GaussianParams

    x, _ = make_mixture(3000, 4, 5, seed=3)
    a = Engine(FitConfig(init="kmeans", k_init=5, seed=0), torch.from_numpy(x))
    a.initialize()
    b = Engine(FitConfig(init="kmeans", k_init=5, seed=0), torch.from_numpy(x))
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    p = b.params
    b.params = GaussianParams(p.log_weights, p.means + 1e-2 * torch.randn(p.means.shape, generator=g,
                                                                          dtype=p.means.dtype), p.chol)
    before = float((a.params.means - b.params.means).abs().max())
    a.settle(5)
    b.settle(5)
    after = float((a.params.means - b.params.means).abs().max())
    assert after < 0.1 * before
    za, _ = a.assign()
    zb, _ = b.assign()
    assert (za == zb).mean() > 0.999


def test_delete_move_removes_a_catch_all_and_keeps_the_true_clusters():
    """Four blobs, fitted, plus a broad fifth cluster at the centre that takes their tails (the
    catch-all of the ImageNet-scale fit, docs/ARCHITECTURE.md). With every cluster proposed,
    the delete move removes the broad one only, and the freed rows go back to their blobs."""
    from cluster_service.core.niw import GaussianParams

    g = np.random.default_rng(0)
    centres = np.array([[4, 4], [4, -4], [-4, 4], [-4, -4]], dtype=np.float64)
    y = np.repeat(np.arange(4), 500)
    x = (centres[y] + g.standard_normal((2000, 2))).astype(np.float32)
    cfg = FitConfig(init="kmeans", k_init=5, seed=0).replace(**{"moves.delete_largest": 5})
    eng = Engine(cfg, torch.from_numpy(x))
    eng.initialize()
    xd = torch.from_numpy(x).double() - eng.shift.double()
    means = torch.stack([xd[torch.from_numpy(y == k)].mean(0) for k in range(4)] + [xd.mean(0)])
    eye = torch.eye(2, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.stack([eye] * 4 + [25 * eye]))
    eng.params = GaussianParams(torch.log(torch.tensor([0.125] * 4 + [0.5], dtype=torch.float64)), means, chol)
    z, _ = eng.assign()
    assert 100 < (z == 4).sum() < 300  # the broad cluster holds the blobs' tails
    proposed, accepted = move_steps.delete_step(eng)
    assert (proposed, accepted) == (5, 1) and eng.n_clusters == 4
    assert torch.allclose(eng.params.means, means[:4])  # the four blobs stay, the broad one went
    z, _ = eng.assign()
    assert score(y, z).ari > 0.99
    assert move_steps.delete_step(eng) == (4, 0)  # the true clusters: deleting any one loses evidence


@pytest.mark.parametrize("K", [5, 64, 1000, 1093])
def test_row_argmax_is_torch_argmax_ties_included(K):
    """The block-maxima argmax gives torch's index (the first maximum) on distinct values, on
    heavy ties (values rounded to halves) and on all-equal rows, for K a multiple of the block
    width, with a remainder, and below two blocks."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(513, K, generator=g)
    for m in (x, (x * 2).round(), torch.zeros_like(x), x.to(torch.bfloat16), -x.abs()):
        assert torch.equal(row_argmax(m), m.argmax(1))
    # the maximum in the remainder columns only, and tied between a block and the remainder
    y = torch.zeros(3, K)
    y[0, -1] = 1.0
    y[1, 0] = y[1, -1] = 1.0
    y[2, K // 2] = y[2, -1] = 1.0
    assert torch.equal(row_argmax(y), y.argmax(1))

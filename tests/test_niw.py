"""The NIW/DPGMM math against independent references (scipy, numpy) and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special
from scipy import stats as sps
from stats_helpers import stats_from_points

from cluster_service.core.gaussian import (
    WhitenedGaussians,
    add_weighted_stats_,
    iter_chunks,
    log_joint,
    stats_chunk_rows,
)
from cluster_service.core.hierarchy import merge_tree
from cluster_service.core.niw import (
    GaussianParams,
    NIWPrior,
    SuffStats,
    dp_log_weights,
    log_cluster_score,
    log_marginal_likelihood,
    log_merge_ratio,
    log_partition_evidence,
    log_split_ratio,
    make_prior,
    map_estimate,
    posterior,
    safe_cholesky,
)

D = torch.float64


def random_prior(d: int, seed: int = 0) -> NIWPrior:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=D)
    return NIWPrior(
        kappa=0.7, nu=d + 1.5, mean=torch.randn(d, generator=g, dtype=D), psi=a @ a.T / d + torch.eye(d, dtype=D)
    )


def scipy_log_marginal(prior: NIWPrior, x: np.ndarray) -> float:
    """log f(X) = sum_i log p(x_i | x_<i), each a scipy multivariate t (Murphy 2007, eq. 258), with
    the posterior from the centred scatter (numpy), not from niw.posterior's uncentred one."""
    m0, psi0 = prior.mean.numpy(), prior.psi.numpy()
    d = x.shape[1]
    total = 0.0
    for i in range(x.shape[0]):
        seen = x[:i]
        n = seen.shape[0]
        xbar = seen.mean(0) if n else np.zeros(d)
        centred = seen - xbar
        kappa, nu = prior.kappa + n, prior.nu + n
        mean = (prior.kappa * m0 + n * xbar) / kappa
        nu_psi = prior.nu * psi0 + centred.T @ centred + prior.kappa * n / kappa * np.outer(xbar - m0, xbar - m0)
        df = nu - d + 1
        total += sps.multivariate_t(loc=mean, shape=nu_psi * (kappa + 1) / (kappa * df), df=df).logpdf(x[i])
    return total


def scipy_cluster_score(prior: NIWPrior, x: np.ndarray) -> float:
    """log Gamma(N) + log f(X) by scipy."""
    return float(special.gammaln(x.shape[0])) + scipy_log_marginal(prior, x)


def test_marginal_likelihood_equals_chain_rule_of_scipy_t_predictives():
    d, n = 3, 25
    prior = random_prior(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=D) * 2 + 1
    ours = float(log_marginal_likelihood(prior, stats_from_points(x)))
    assert ours == pytest.approx(scipy_log_marginal(prior, x.numpy()), rel=1e-9, abs=1e-8)


def test_cluster_score_feeds_ratios_evidence_and_merge_tree_as_scipy_says():
    """log_cluster_score = log Gamma(N) + log f(X); log H_s, log H_m (DeepDPM eq. 9), the partition
    evidence and the merge tree's ratios are its sums and differences plus log alpha per set."""
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(30, 3, generator=g, dtype=D), torch.randn(20, 3, generator=g, dtype=D) + 1,
          torch.randn(12, 3, generator=g, dtype=D) * 0.5 - 2]
    prior, alpha = random_prior(3), 10.0
    st = [stats_from_points(x) for x in xs]
    ref = [scipy_cluster_score(prior, x.numpy()) for x in xs]

    def ref_union(i, j):
        return scipy_cluster_score(prior, torch.cat([xs[i], xs[j]]).numpy())

    for s, r in zip(st, ref, strict=True):
        assert float(log_cluster_score(prior, s)) == pytest.approx(r, rel=1e-9)
    ref_split = math.log(alpha) + ref[0] + ref[1] - ref_union(0, 1)
    assert float(log_split_ratio(prior, alpha, st[0], st[1])) == pytest.approx(ref_split, rel=1e-9)
    assert float(log_merge_ratio(prior, alpha, st[0], st[1])) == pytest.approx(-ref_split, rel=1e-9)
    stats = SuffStats.concat([SuffStats(s.count[None], s.sum[None], s.scatter[None]) for s in st])
    empty = SuffStats.zeros((1,), 3)  # empty sets are no part of the partition
    evidence = log_partition_evidence(prior, alpha, SuffStats.concat([stats, empty]))
    assert float(evidence) == pytest.approx(3 * math.log(alpha) + sum(ref), rel=1e-9)
    # the merge tree first merges the pair with the highest log H_m
    pairs = {(i, j): ref_union(i, j) - ref[i] - ref[j] - math.log(alpha) for i in range(3) for j in range(i + 1, 3)}
    tree = merge_tree(prior, alpha, stats)
    assert set(tree.linkage[0, :2].astype(int).tolist()) == set(max(pairs, key=pairs.get))
    assert tree.log_ratios[0] == pytest.approx(max(pairs.values()), rel=1e-9)


def test_posterior_of_zero_points_is_the_prior():
    prior = random_prior(4)
    post = posterior(prior, SuffStats.zeros((), 4))
    assert float(post.kappa) == prior.kappa and float(post.nu) == prior.nu
    torch.testing.assert_close(post.mean, prior.mean)
    torch.testing.assert_close(post.psi, prior.psi)
    assert float(log_marginal_likelihood(prior, SuffStats.zeros((), 4))) == pytest.approx(0.0, abs=1e-10)


def test_chunked_weighted_statistics_match_numpy():
    """The engine's accumulation (add_weighted_stats_ over stats_chunk_rows chunks) equals the
    weighted sums written out in numpy."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 6))
    r = rng.dirichlet(np.ones(4), size=500)
    out = SuffStats.zeros((4,), 6)
    for sl in iter_chunks(500, stats_chunk_rows(6, 4, chunk_size=37)):
        add_weighted_stats_(out, torch.from_numpy(x[sl]), torch.from_numpy(r[sl]))
    np.testing.assert_allclose(out.count.numpy(), r.sum(0), rtol=1e-12)
    np.testing.assert_allclose(out.sum.numpy(), r.T @ x, rtol=1e-10)
    np.testing.assert_allclose(out.scatter.numpy(), np.einsum("nk,ni,nj->kij", r, x, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d, n_bins", [(2, 300), (16, 5), (16, 40)])
def test_hard_statistics_match_numpy_on_both_paths(d, n_bins):
    """add_hard_stats_ sorts rows by bin and does one matmul per bin when bins hold many outer-product
    elements (d 16), and adds the (n, d, d) outer products by index when they hold few (d 2, 300
    bins); both equal a numpy loop over the rows, empty bins included."""
    from cluster_service.core.gaussian import add_hard_stats_
    from cluster_service.core.niw import SuffStats

    rng = np.random.default_rng(d + n_bins)
    n = 600
    x = rng.normal(size=(n, d)).astype(np.float32) * 3 + 1
    z = rng.integers(0, n_bins - 1, size=n)  # the last bin stays empty
    w = rng.random(n)
    out = SuffStats.zeros((n_bins,), d)
    add_hard_stats_(out, torch.from_numpy(x), torch.from_numpy(z), torch.from_numpy(w))
    count, total, scatter = np.zeros(n_bins), np.zeros((n_bins, d)), np.zeros((n_bins, d, d))
    xd = x.astype(np.float64)
    for i in range(n):
        count[z[i]] += w[i]
        total[z[i]] += w[i] * xd[i]
        scatter[z[i]] += w[i] * np.outer(xd[i], xd[i])
    np.testing.assert_allclose(out.count.numpy(), count, rtol=1e-12)
    np.testing.assert_allclose(out.sum.numpy(), total, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.scatter.numpy(), scatter, rtol=1e-10, atol=1e-10)
    assert out.count[-1] == 0 and float(out.scatter[-1].abs().sum()) == 0


def test_weighted_map_m_step_matches_numpy():
    rng = np.random.default_rng(4)
    d, n = 4, 200
    x = rng.normal(size=(n, d)) * [1, 2, 3, 4]
    w = rng.random(n)
    prior = random_prior(d, seed=5)
    mean, chol = map_estimate(prior, stats_from_points(torch.from_numpy(x), torch.from_numpy(w)[:, None]))
    # direct: weighted NIW posterior, mode Sigma = (nu psi + S_c + kappa N/(kappa+N) (xbar-m)(xbar-m)^T) / (nu*+d+2)
    N = w.sum()
    xbar = (w[:, None] * x).sum(0) / N
    m0 = prior.mean.numpy()
    sc = (w[:, None, None] * (x - xbar)[:, :, None] * (x - xbar)[:, None, :]).sum(0)
    kappa_n, nu_n = prior.kappa + N, prior.nu + N
    mu = (prior.kappa * m0 + N * xbar) / kappa_n
    scale = prior.nu * prior.psi.numpy() + sc + prior.kappa * N / kappa_n * np.outer(xbar - m0, xbar - m0)
    sigma = scale / (nu_n + d + 2)
    np.testing.assert_allclose(mean[0].numpy(), mu, rtol=1e-10)
    np.testing.assert_allclose((chol[0] @ chol[0].T).numpy(), sigma, rtol=1e-9)


def test_log_joint_matches_scipy():
    rng = np.random.default_rng(6)
    d, K = 5, 3
    means = rng.normal(size=(K, d))
    covs = []
    for _ in range(K):
        a = rng.normal(size=(d, d))
        covs.append(a @ a.T + np.eye(d))
    x = rng.normal(size=(50, d)) * 2
    chol = torch.linalg.cholesky(torch.tensor(np.stack(covs)))
    ref = np.stack([sps.multivariate_normal(means[k], covs[k]).logpdf(x) for k in range(K)], axis=1)
    params = GaussianParams(torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=D)), torch.from_numpy(means), chol)
    dens = WhitenedGaussians(params, D).log_prob(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(dens, ref, rtol=1e-10)
    lj = log_joint(torch.from_numpy(x), params, D, chunk_size=7).numpy()  # chunks of 7 rows
    np.testing.assert_allclose(lj, ref + np.log([0.2, 0.3, 0.5]), rtol=1e-10)


def test_dp_weights_are_the_dirichlet_posterior_mean():
    counts = torch.tensor([10.0, 0.0, 30.0], dtype=D)
    pi = dp_log_weights(counts, alpha=3.0).exp()
    np.testing.assert_allclose(pi.numpy(), (np.array([10, 0, 30]) + 1.0) / 43.0)
    assert float(pi.sum()) == pytest.approx(1.0)


def test_safe_cholesky_repairs_non_spd_with_a_warning():
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=D)  # rank 1: not positive definite
    bad = torch.stack([torch.eye(2, dtype=D), a - 1e-9 * torch.eye(2, dtype=D)])
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        L = safe_cholesky(bad, "test")
    assert torch.isfinite(L).all()
    torch.testing.assert_close(L[0], torch.eye(2, dtype=D))
    assert (L[1].diagonal() > 0).all()


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_data_scaled_prior_is_scale_equivariant(scale):
    """Scaling the data scales psi by scale^2, so split decisions do not depend on units."""
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(200, 4, generator=g, dtype=D), torch.randn(200, 4, generator=g, dtype=D) + 5])
    ref = None
    for s in (1.0, scale):
        xs = x * s
        prior = make_prior(xs.mean(0), xs.var(0), 1e-4, 2.0, "data_diag", 0.005)
        h = float(log_split_ratio(prior, 10.0, stats_from_points(xs[:200]), stats_from_points(xs[200:])))
        ref = h if ref is None else ref
    assert h == pytest.approx(ref, rel=1e-6)


def test_diag_family_marginal_is_a_product_of_scipy_univariate_t_chains():
    """The "diag" family: every coordinate its own d = 1 NIW, so log f(X) is the sum over coordinates
    of univariate Student-t predictive chains (scipy.stats.t), with the prior's diagonal psi only."""
    d, n = 4, 30
    prior = random_prior(d, seed=3)
    diag = NIWPrior(prior.kappa, 2.5, prior.mean, prior.psi, "diag")
    x = (torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=D) * torch.tensor([1, 3, .5, 2], dtype=D)
         + 1).numpy()
    total = 0.0
    for j in range(d):
        m0, nu_psi0 = float(prior.mean[j]), diag.nu * float(prior.psi[j, j])
        for i in range(n):
            seen = x[:i, j]
            k, nu = diag.kappa + i, diag.nu + i
            xbar = seen.mean() if i else 0.0
            mean = (diag.kappa * m0 + seen.sum()) / k
            nu_psi = nu_psi0 + ((seen - xbar) ** 2).sum() + diag.kappa * i / k * (xbar - m0) ** 2
            total += sps.t(df=nu, loc=mean, scale=math.sqrt(nu_psi * (k + 1) / (k * nu))).logpdf(x[i, j])
    ours = float(log_marginal_likelihood(diag, stats_from_points(torch.from_numpy(x))))
    assert ours == pytest.approx(total, rel=1e-9)
    # and it is not the full family's (the off-diagonal scatter is ignored)
    assert ours != pytest.approx(float(log_marginal_likelihood(NIWPrior(prior.kappa, d + 1.5, prior.mean, prior.psi),
                                                               stats_from_points(torch.from_numpy(x)))), rel=1e-3)


def test_diag_family_map_is_the_coordinatewise_mode():
    rng = np.random.default_rng(6)
    d, n = 3, 50
    x = rng.normal(size=(n, d)) @ np.array([[1, .8, 0], [0, 1, 0], [0, 0, 2]])
    prior = random_prior(d, seed=7)
    diag = NIWPrior(prior.kappa, 4.0, prior.mean, prior.psi, "diag")
    mean, chol = map_estimate(diag, stats_from_points(torch.from_numpy(x)))
    xbar, m0 = x.mean(0), prior.mean.numpy()
    kappa_n, nu_n = diag.kappa + n, diag.nu + n
    scale = (diag.nu * np.diag(prior.psi.numpy()) + ((x - xbar) ** 2).sum(0)
             + diag.kappa * n / kappa_n * (xbar - m0) ** 2)
    np.testing.assert_allclose(mean.numpy(), (diag.kappa * m0 + n * xbar) / kappa_n, rtol=1e-10)
    np.testing.assert_allclose(chol.numpy(), np.diag(np.sqrt(scale / (nu_n + 3))), rtol=1e-9)

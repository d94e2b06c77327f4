"""The NIW/DPGMM math against independent references (scipy, numpy) and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from cluster_service.core.gaussian import e_step, hard_weighted_stats, log_gaussian, weighted_stats
from cluster_service.core.niw import (
    GaussianParams,
    NIWPrior,
    SuffStats,
    dp_log_weights,
    log_marginal_likelihood,
    log_merge_ratio,
    log_split_ratio,
    make_prior,
    map_estimate,
    posterior,
    safe_cholesky,
    stats_from_points,
)

D = torch.float64


def random_prior(d: int, seed: int = 0) -> NIWPrior:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=D)
    return NIWPrior(
        kappa=0.7, nu=d + 1.5, mean=torch.randn(d, generator=g, dtype=D), psi=a @ a.T / d + torch.eye(d, dtype=D)
    )


def test_marginal_likelihood_equals_chain_rule_of_scipy_t_predictives():
    """log f(X) = sum_i log p(x_i | x_<i), each a multivariate t (Murphy 2007, eq. 258)."""
    d, n = 3, 25
    prior = random_prior(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=D) * 2 + 1
    total = 0.0
    for i in range(n):
        post = posterior(prior, stats_from_points(x[:i]))
        kappa, nu = float(post.kappa), float(post.nu)
        df = nu - d + 1
        shape = (nu * post.psi).numpy() * (kappa + 1) / (kappa * df)
        total += sps.multivariate_t(loc=post.mean.numpy(), shape=shape, df=df).logpdf(x[i].numpy())
    ours = float(log_marginal_likelihood(prior, stats_from_points(x)))
    assert ours == pytest.approx(total, rel=1e-9, abs=1e-8)


def test_posterior_of_zero_points_is_the_prior():
    prior = random_prior(4)
    post = posterior(prior, SuffStats.zeros((), 4))
    assert float(post.kappa) == prior.kappa and float(post.nu) == prior.nu
    torch.testing.assert_close(post.mean, prior.mean)
    torch.testing.assert_close(post.psi, prior.psi)
    assert float(log_marginal_likelihood(prior, SuffStats.zeros((), 4))) == pytest.approx(0.0, abs=1e-10)


def test_stats_are_additive_and_index_selectable():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(40, 5, generator=g, dtype=D), torch.randn(30, 5, generator=g, dtype=D)
    union = stats_from_points(torch.cat([a, b]))
    summed = stats_from_points(a) + stats_from_points(b)
    for u, s in zip((union.count, union.sum, union.scatter), (summed.count, summed.sum, summed.scatter), strict=True):
        torch.testing.assert_close(u, s)
    # weighted batch statistics: selecting cluster k equals the statistics of its weighted points
    w = torch.rand(70, 3, generator=g, dtype=D)
    batch = stats_from_points(torch.cat([a, b]), w)
    one = batch[1]
    x = torch.cat([a, b])
    torch.testing.assert_close(one.sum, (w[:, 1:2] * x).sum(0))
    torch.testing.assert_close(one.scatter, (w[:, 1, None, None] * x[:, :, None] * x[:, None, :]).sum(0))


def test_chunked_statistics_match_direct_computation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=g, dtype=D)
    r = torch.softmax(torch.randn(500, 4, generator=g, dtype=D), -1)
    direct = stats_from_points(x, r)
    chunked = weighted_stats(x, lambda sl: r[sl], 4, chunk_size=37)
    torch.testing.assert_close(chunked.scatter, direct.scatter)
    z = torch.randint(0, 4, (500,), generator=g)
    w = torch.rand(500, generator=g, dtype=D)
    hard = hard_weighted_stats(x, z, w, 4, chunk_size=50)
    onehot = torch.nn.functional.one_hot(z, 4).to(D) * w[:, None]
    torch.testing.assert_close(hard.scatter, stats_from_points(x, onehot).scatter)
    torch.testing.assert_close(hard.count, onehot.sum(0))


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


def test_log_gaussian_matches_scipy():
    rng = np.random.default_rng(6)
    d, K = 5, 3
    means = rng.normal(size=(K, d))
    covs = []
    for _ in range(K):
        a = rng.normal(size=(d, d))
        covs.append(a @ a.T + np.eye(d))
    x = rng.normal(size=(50, d)) * 2
    chol = torch.linalg.cholesky(torch.tensor(np.stack(covs)))
    ours = log_gaussian(torch.from_numpy(x), torch.from_numpy(means), chol).numpy()
    ref = np.stack([sps.multivariate_normal(means[k], covs[k]).logpdf(x) for k in range(K)], axis=1)
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    # E-step rows are normalised responsibilities in log space
    params = GaussianParams(torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=D)), torch.from_numpy(means), chol)
    log_r = e_step(torch.from_numpy(x), params, D, chunk_size=7).numpy()
    lj = ref + np.log([0.2, 0.3, 0.5])
    np.testing.assert_allclose(log_r, lj - np.logaddexp.reduce(lj, axis=1, keepdims=True), rtol=1e-9, atol=1e-12)


def test_dp_weights_are_the_dirichlet_posterior_mean():
    counts = torch.tensor([10.0, 0.0, 30.0], dtype=D)
    pi = dp_log_weights(counts, alpha=3.0).exp()
    np.testing.assert_allclose(pi.numpy(), (np.array([10, 0, 30]) + 1.0) / 43.0)
    assert float(pi.sum()) == pytest.approx(1.0)


def test_split_and_merge_ratios_are_reciprocal_and_symmetric():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(30, 3, generator=g, dtype=D), torch.randn(20, 3, generator=g, dtype=D) + 1
    prior = random_prior(3)
    sa, sb = stats_from_points(a), stats_from_points(b)
    assert float(log_split_ratio(prior, 10.0, sa, sb)) == pytest.approx(-float(log_merge_ratio(prior, 10.0, sa, sb)))
    assert float(log_split_ratio(prior, 10.0, sa, sb)) == pytest.approx(float(log_split_ratio(prior, 10.0, sb, sa)))
    # the formula, term by term
    whole = sa + sb
    expected = (
        math.log(10.0)
        + math.lgamma(30)
        + math.lgamma(20)
        - math.lgamma(50)
        + float(
            log_marginal_likelihood(prior, sa)
            + log_marginal_likelihood(prior, sb)
            - log_marginal_likelihood(prior, whole)
        )
    )
    assert float(log_split_ratio(prior, 10.0, sa, sb)) == pytest.approx(expected)


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

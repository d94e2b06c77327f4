"""Property-based tests (hypothesis) of the NIW / DPGMM math in cluster_service/core/niw.py and the E-step:
statistics are additive, the posterior of a union is the posterior of the summed statistics, split and
merge ratios are symmetric and reciprocal, every M-step covariance is SPD (degenerate inputs included)
and E-step responsibilities are distributions. Inputs are drawn as (seed, sizes, scale, shape) and built
with numpy, which keeps examples cheap and failures reproducible."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_helpers import stats_from_points

from cluster_service.core.gaussian import log_joint
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
)

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)
F64 = torch.float64

seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 6)
sizes = st.integers(1, 40)
scales = st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6])
# How the points are laid out: full-rank, on a line (rank 1), all identical, a few duplicated rows.
shapes = st.sampled_from(["gaussian", "line", "identical", "duplicates"])


def points(seed: int, n: int, d: int, scale: float = 1.0, shape: str = "gaussian", shift: float = 0.0):
    rng = np.random.default_rng(seed)
    if shape == "line":
        x = rng.standard_normal((n, 1)) * rng.standard_normal((1, d))
    elif shape == "identical":
        x = np.repeat(rng.standard_normal((1, d)), n, axis=0)
    elif shape == "duplicates":
        x = rng.standard_normal((max(1, n // 3), d))[rng.integers(0, max(1, n // 3), n)]
    else:
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return torch.from_numpy(x * scale + shift * scale)


def data_prior(x: torch.Tensor, psi_mode: str = "data_diag", nu_offset: float = 2.0) -> NIWPrior:
    """The engine's prior: centred data (mean 0), psi from the per-dimension variance."""
    return make_prior(torch.zeros(x.shape[1], dtype=F64), x.var(0, unbiased=False), 1e-4, nu_offset,
                      psi_mode, 0.005)


def assert_stats_close(a: SuffStats, b: SuffStats, rtol: float = 1e-10) -> None:
    for u, v in ((a.count, b.count), (a.sum, b.sum), (a.scatter, b.scatter)):
        scale = max(float(v.abs().max()), 1e-300)
        assert float((u - v).abs().max()) <= rtol * scale


@SETTINGS
@given(seeds, sizes, sizes, dims, scales)
def test_statistics_are_additive(seed, n1, n2, d, scale):
    x1, x2 = points(seed, n1, d, scale), points(seed + 1, n2, d, scale)
    assert_stats_close(stats_from_points(torch.cat([x1, x2])), stats_from_points(x1) + stats_from_points(x2))
    # weighted: two bins' statistics sum to the statistics of the summed weights
    w = torch.from_numpy(np.random.default_rng(seed).random((n1, 2)))
    both = stats_from_points(x1, w)
    assert_stats_close(both[0] + both[1], stats_from_points(x1, w.sum(1, keepdim=True))[0])
    # flatten / unflatten (the all_reduce wire format) is lossless
    back = SuffStats.unflatten(both.flatten(), (2,), d)
    assert torch.equal(back.scatter, both.scatter) and torch.equal(back.count, both.count)


@SETTINGS
@given(seeds, sizes, sizes, dims, scales, st.floats(-5, 5))
def test_posterior_of_a_union_is_the_posterior_of_summed_statistics(seed, n1, n2, d, scale, shift):
    x1, x2 = points(seed, n1, d, scale, shift=shift), points(seed + 7, n2, d, scale, shift=shift)
    x = torch.cat([x1, x2])
    prior = data_prior(x - x.mean(0))
    prior = NIWPrior(prior.kappa, prior.nu, x.mean(0), prior.psi)  # prior mean anywhere, not only 0
    direct = posterior(prior, stats_from_points(x))
    summed = posterior(prior, stats_from_points(x1) + stats_from_points(x2))
    assert torch.allclose(direct.kappa, summed.kappa) and torch.allclose(direct.nu, summed.nu)
    assert torch.allclose(direct.mean, summed.mean, rtol=1e-9, atol=1e-12 * scale * (1 + abs(shift)))
    psi_scale = float(direct.psi.abs().max())
    assert float((direct.psi - summed.psi).abs().max()) <= 1e-6 * psi_scale
    lml = log_marginal_likelihood(prior, stats_from_points(x))
    lml_sum = log_marginal_likelihood(prior, stats_from_points(x1) + stats_from_points(x2))
    assert torch.isfinite(lml) and abs(float(lml - lml_sum)) <= 1e-6 * (1 + abs(float(lml)))


@SETTINGS
@given(seeds, st.integers(2, 40), st.integers(2, 40), dims, scales, st.floats(0.1, 100.0))
def test_split_and_merge_ratios_are_symmetric_and_reciprocal(seed, n1, n2, d, scale, alpha):
    x1, x2 = points(seed, n1, d, scale), points(seed + 3, n2, d, scale, shift=3.0)
    x = torch.cat([x1, x2])
    prior = data_prior(x - x.mean(0))
    a, b = stats_from_points(x1 - x.mean(0)), stats_from_points(x2 - x.mean(0))
    hs_ab = log_split_ratio(prior, alpha, a, b)
    hs_ba = log_split_ratio(prior, alpha, b, a)
    hm_ab = log_merge_ratio(prior, alpha, a, b)
    assert torch.isfinite(hs_ab)
    tol = 1e-9 * (1 + abs(float(hs_ab)))
    assert abs(float(hs_ab - hs_ba)) <= tol
    assert abs(float(hs_ab + hm_ab)) <= tol
    # batched evaluation agrees with the scalar one
    ab, ba = SuffStats.concat([a[None], b[None]]), SuffStats.concat([b[None], a[None]])
    batched = log_split_ratio(prior, alpha, ab, ba)
    assert torch.allclose(batched, torch.stack([hs_ab, hs_ba]), rtol=1e-12, atol=tol)


@SETTINGS
@given(seeds, st.integers(0, 40), dims, scales, shapes, st.sampled_from(["data_diag", "fixed"]),
       st.sampled_from([-0.9, 0.0, 2.0]))
def test_every_m_step_covariance_is_spd(seed, n, d, scale, shape, psi_mode, nu_offset):
    """Any weights (zero, fractional, one point), rank-deficient or identical points, d > n and extreme
    scales: the MAP covariance has a Cholesky factor with a positive diagonal and is SPD. (Where the
    data variance is 0, psi is ~1e-32 and safe_cholesky's jitter does the repair, with a warning.)"""
    x = points(seed, max(n, 1), d, scale, shape)[:n] if n else torch.zeros(0, d, dtype=F64)
    prior = data_prior(x if n > 1 else torch.ones(2, d, dtype=F64) * scale, psi_mode, nu_offset)
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.random((n, 3)) * (rng.random((1, 3)) > 0.3))  # some columns all-zero
    stats = SuffStats.concat([stats_from_points(x, w), stats_from_points(x)[None]])
    means, chol = map_estimate(prior, stats)
    assert torch.isfinite(means).all() and torch.isfinite(chol).all()
    diag = chol.diagonal(dim1=-2, dim2=-1)
    assert (diag > 0).all()
    cov = chol @ chol.transpose(-1, -2)
    assert torch.allclose(cov, cov.transpose(-1, -2))
    rel = torch.linalg.eigvalsh(cov).min(-1).values / torch.linalg.eigvalsh(cov).max(-1).values
    assert (rel > 0).all()


@SETTINGS
@given(seeds, st.integers(1, 60), dims, st.integers(1, 6), scales, st.floats(0.0, 1e3))
def test_e_step_rows_are_distributions(seed, n, d, k, scale, far):
    """Responsibilities are finite and sum to 1 per row, also for points far (in units of the
    covariance) from every cluster, where all log-densities are hugely negative."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=F64) * scale
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    cov = (a @ a.transpose(-1, -2) * 1e-2 + torch.eye(d, dtype=F64)) * scale**2
    chol = torch.linalg.cholesky(cov)
    counts = torch.from_numpy(np.random.default_rng(seed).integers(0, 5, k)).double()
    params = GaussianParams(dp_log_weights(counts, 10.0), means, chol)
    assert abs(float(torch.logsumexp(params.log_weights, 0))) < 1e-12
    x = points(seed, n, d, scale) + far * scale
    for dtype in (torch.float64, torch.float32):
        log_r = torch.log_softmax(log_joint(x, params, dtype, chunk_size=7), -1)  # the engine's E-step
        assert log_r.shape == (n, k) and torch.isfinite(log_r).all()
        assert torch.allclose(log_r.double().exp().sum(1), torch.ones(n, dtype=F64), atol=1e-5)

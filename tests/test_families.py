"""Covariance families and kappa chosen by the evidence (issue 45): few rows per dimension."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster_service import index
from cluster_service.config import ConfigError, FitConfig
from cluster_service.core.niw import SuffStats, between_within_kappa, pooled_within_covariance
from cluster_service.datasets import make_overlap_mixture
from cluster_service.report.evaluate import model_choice, score
from cluster_service.train.fit import fit


def _axis_mixture(n_per: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k clusters with diagonal covariances (per-coordinate standard deviations e^-2..e^2,
    log-uniform) and n_per rows each."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3.0, size=(k, d))
    scales = np.exp(rng.uniform(-2.0, 2.0, size=(k, d)))
    y = np.repeat(np.arange(k), n_per)
    x = means[y] + rng.normal(size=(y.size, d)) * scales[y]
    perm = rng.permutation(y.size)
    return x[perm].astype(np.float32), y[perm]


def test_between_within_kappa_matches_numpy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    x = rng.normal(size=(400, 3)) + 4 * rng.normal(size=(5, 3))[y]
    xt = torch.from_numpy(x)
    stats = SuffStats(torch.bincount(torch.from_numpy(y), minlength=5).double(),
                      torch.zeros(5, 3, dtype=torch.float64).index_add_(0, torch.from_numpy(y), xt),
                      torch.zeros(5, 3, 3, dtype=torch.float64).index_add_(0, torch.from_numpy(y),
                                                                          xt[:, :, None] * xt[:, None, :]))
    means = np.stack([x[y == k].mean(0) for k in range(5)])
    counts = np.bincount(y)
    within = sum(((x[y == k] - means[k]) ** 2).sum() for k in range(5)) / 400
    between = (counts[:, None] * (means - x.mean(0)) ** 2).sum() / 400
    assert between_within_kappa(stats) == pytest.approx(within / between, rel=1e-10)
    assert float(pooled_within_covariance(stats).trace()) == pytest.approx(within, rel=1e-10)


def test_auto_picks_diag_for_axis_aligned_clusters_with_fewer_rows_than_dimensions():
    """30 rows a cluster in 48-d: a full covariance cannot be estimated, a diagonal one can; the
    evidence picks "diag" and the fit finds the clusters that k-means given K finds."""
    x, y = _axis_mixture(30, 48, 12, seed=1)
    res = fit(x, FitConfig(seed=0))
    assert res.engine.prior.family == "diag"
    s = score(y, res.clusters)
    km = score(y, index.assign_nearest(x, index.kmeans(x, 12, 0)))
    assert s.k_found > 1 and s.nmi >= km.nmi - 0.02, (s, km)
    # the one model serves: the exported diagonal covariances give the fit's own labels
    assert np.allclose(np.triu(res.model.chol, 1), 0) and np.allclose(np.tril(res.model.chol, -1), 0)
    assert (res.model.predict(x)[0] == res.clusters).mean() > 0.999


def test_auto_keeps_full_covariances_where_rows_are_plentiful():
    """Correlated clusters with 40 rows per dimension: the full family's evidence wins."""
    x, y = make_overlap_mixture(8000, 8, 5, seed=3, bayes_target=0.97, anisotropy=0.9, calib_samples=4000)
    res = fit(x, FitConfig(seed=0))
    assert res.engine.prior.family == "full"
    assert score(y, res.clusters).k_found == 5


def test_one_cluster_summary_says_why_and_what_would_help():
    note = model_choice(500, 256, 1, {"family": "full", "kappa": 1e-4})
    assert "rows per dimension" in note["note"] and "--pca-dim" in note["note"] and "covariance=diag" in note["note"]
    assert note["rows_per_dim"] == round(500 / 256, 2) and note["covariance"] == "full"
    assert "note" not in model_choice(5000, 8, 4, {"family": "diag", "kappa": 0.5})
    # the diagonal family chosen: no advice to choose it
    diag = model_choice(500, 256, 1, {"family": "diag", "kappa": 1e-4})["note"]
    assert "covariance=diag" not in diag and "already the simplest" in diag


def test_covariance_and_kappa_mode_are_validated():
    with pytest.raises(ConfigError, match="prior.covariance"):
        FitConfig().replace(**{"prior.covariance": "tied"})
    with pytest.raises(ConfigError, match="prior.kappa_mode"):
        FitConfig().replace(**{"prior.kappa_mode": "auto"})

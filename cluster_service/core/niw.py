"""Normal-Inverse-Wishart prior, sufficient statistics and the DPGMM quantities built on them.

Pure functions over float64 tensors: no I/O, no devices chosen, no distribution. Notation
follows DESIGN §2 (and Chang & Fisher 2013 / DeepDPM eq. 6-9):

    prior          NIW(kappa, m, nu, psi), prior scale matrix nu * psi
    posterior      kappa* = kappa + N,  nu* = nu + N,  m* = (kappa m + s) / kappa*
                   nu* psi* = nu psi + kappa m m^T + S - kappa* m* m*^T
    marginal       log f(X) = -(N d / 2) log pi + log Gamma_d(nu*/2) - log Gamma_d(nu/2)
                              + (nu/2) log|nu psi| - (nu*/2) log|nu* psi*| + (d/2) log(kappa/kappa*)

Statistics (N, s, S) are batched with any number of leading axes (clusters, subclusters).

Covariance families (`NIWPrior.family`): "full" is the NIW above. "diag" restricts every
covariance to a diagonal with independent coordinates, each under its own one-dimensional NIW
(a Normal-Inverse-Gamma: kappa, m_j, nu, psi_jj), so log f and the MAP are the sums and the
coordinates of the d = 1 formulas applied to the diagonals of S and psi. A diagonal cluster has
2 d parameters against d (d + 3) / 2, so its evidence can support clusters with about as many
rows as dimensions, where the full family's honestly prefers one broad cluster. Both families
are marginal likelihoods of the same rows, so the evidence compares them directly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

STAT_DTYPE = torch.float64


@dataclass(frozen=True)
class SuffStats:
    """Sufficient statistics of weighted point sets, batched over leading axes.

    count: (...,)            N = sum_i w_i
    sum:   (..., d)          s = sum_i w_i x_i
    scatter: (..., d, d)     S = sum_i w_i x_i x_i^T   (uncentred)
    """

    count: torch.Tensor
    sum: torch.Tensor
    scatter: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.sum.shape[-1]

    def __add__(self, other: SuffStats) -> SuffStats:
        return SuffStats(self.count + other.count, self.sum + other.sum, self.scatter + other.scatter)

    def __getitem__(self, idx) -> SuffStats:
        return SuffStats(self.count[idx], self.sum[idx], self.scatter[idx])

    def to(self, *args, **kwargs) -> SuffStats:
        return SuffStats(self.count.to(*args, **kwargs), self.sum.to(*args, **kwargs), self.scatter.to(*args, **kwargs))

    def flatten(self) -> torch.Tensor:
        """One contiguous 1-D tensor (for a single all_reduce)."""
        return torch.cat([self.count.reshape(-1), self.sum.reshape(-1), self.scatter.reshape(-1)])

    @staticmethod
    def unflatten(flat: torch.Tensor, batch_shape: tuple[int, ...], n_features: int) -> SuffStats:
        nb = math.prod(batch_shape)
        d = n_features
        count = flat[:nb].reshape(batch_shape)
        s = flat[nb : nb + nb * d].reshape(*batch_shape, d)
        S = flat[nb + nb * d :].reshape(*batch_shape, d, d)
        return SuffStats(count, s, S)

    @staticmethod
    def zeros(batch_shape: tuple[int, ...], n_features: int, device=None) -> SuffStats:
        d = n_features
        return SuffStats(
            torch.zeros(batch_shape, dtype=STAT_DTYPE, device=device),
            torch.zeros(*batch_shape, d, dtype=STAT_DTYPE, device=device),
            torch.zeros(*batch_shape, d, d, dtype=STAT_DTYPE, device=device),
        )

    @staticmethod
    def concat(parts: list[SuffStats], dim: int = 0) -> SuffStats:
        return SuffStats(
            torch.cat([p.count for p in parts], dim),
            torch.cat([p.sum for p in parts], dim),
            torch.cat([p.scatter for p in parts], dim),
        )


FAMILIES = ("full", "diag")


@dataclass(frozen=True)
class NIWPrior:
    """NIW hyperparameters. kappa, nu: scalars; mean: (d,); psi: (d, d) SPD; family: "full" or
    "diag" (module docstring; "diag" reads only psi's diagonal and needs nu > 0, "full" nu > d - 1)."""

    kappa: float
    nu: float
    mean: torch.Tensor
    psi: torch.Tensor
    family: str = "full"

    @property
    def n_features(self) -> int:
        return self.mean.shape[-1]

    @property
    def block_dim(self) -> int:
        """Dimension of each independent Gaussian block: d (full) or 1 (diag)."""
        return self.n_features if self.family == "full" else 1

    def to(self, *args, **kwargs) -> NIWPrior:
        return NIWPrior(self.kappa, self.nu, self.mean.to(*args, **kwargs), self.psi.to(*args, **kwargs), self.family)


@dataclass(frozen=True)
class NIWPosterior:
    """Posterior NIW parameters, batched. kappa, nu: (...,); mean: (..., d); psi: (..., d, d)."""

    kappa: torch.Tensor
    nu: torch.Tensor
    mean: torch.Tensor
    psi: torch.Tensor


def pooled_within_covariance(stats: SuffStats) -> torch.Tensor:
    """Pooled within-cluster covariance sum_k (S_k - s_k s_k^T / N_k) / sum_k N_k.

    stats: batch shape (K,) (clusters with N_k <= 0 are ignored) -> (d, d) SPD (float64).
    """
    keep = stats.count > 0
    c, s, S = stats.count[keep], stats.sum[keep], stats.scatter[keep]
    within = (S - s[:, :, None] * s[:, None, :] / c[:, None, None]).sum(0) / c.sum()
    return 0.5 * (within + within.T)


def between_within_kappa(stats: SuffStats) -> float:
    """Empirical-Bayes kappa from a partition: tr(W) / tr(B), the pooled within-set covariance W
    (pooled_within_covariance) over the count-weighted covariance B of the sets' means, which the
    NIW's mu_k ~ N(m, Sigma_k / kappa) says is Sigma / kappa. stats: (K,) -> a float (0 when the
    means have no spread)."""
    keep = stats.count > 0
    c, s = stats.count[keep], stats.sum[keep]
    means = s / c[:, None]
    centre = s.sum(0) / c.sum()
    between = float((c[:, None] * (means - centre).square()).sum() / c.sum())
    within = float(pooled_within_covariance(stats).diagonal().sum())
    return within / between if between > 0 else 0.0


def make_prior(
    data_mean: torch.Tensor,
    data_var: torch.Tensor,
    kappa: float,
    nu_offset: float,
    psi_mode: str,
    psi_scale: float,
    within_cov: torch.Tensor | None = None,
    psi_floor: float = 0.0,
) -> NIWPrior:
    """Priors scaled to the data.

    data_mean: (d,); data_var: (d,) per-dimension variance of the data; within_cov: (d, d)
    pooled within-cluster covariance of an over-clustered partition (needed for "pooled").
    psi = psi_scale * within_cov for "pooled" (empirical Bayes: the prior covariance scale is
    the clusters' own spread, not the whole data's; plus psi_floor * mean(data_var) * I),
    psi_scale * mean(data_var) * I for
    "data_diag" (scale-free), psi_scale * I for "fixed".
    """
    d = data_mean.shape[-1]
    eye = torch.eye(d, dtype=STAT_DTYPE, device=data_mean.device)
    if psi_mode == "pooled":
        if within_cov is None:
            raise ValueError("psi_mode 'pooled' needs within_cov")
        w = within_cov.to(STAT_DTYPE)
        data_scale = float(data_var.to(STAT_DTYPE).mean().clamp_min(1e-30))
        mean_var = float(w.diagonal().mean())
        if not mean_var > 1e-9 * data_scale:  # no spread within cells (duplicated points)
            w, mean_var = data_scale * eye, data_scale
        # plus an isotropic floor of psi_floor of the data variance: over-clustering cuts tight
        # non-Gaussian blobs (UMAP embeddings) into cells much smaller than a cluster, and
        # directions without spread inside cells would allow needle-thin clusters
        psi = psi_scale * w + (psi_floor * data_scale + 1e-6 * mean_var) * eye
    elif psi_mode == "data_diag":
        scale = float(data_var.to(STAT_DTYPE).mean().clamp_min(1e-30))
        psi = psi_scale * scale * eye
    elif psi_mode == "fixed":
        psi = psi_scale * eye
    else:
        raise ValueError(f"unknown psi_mode {psi_mode!r}")
    return NIWPrior(kappa=float(kappa), nu=float(d + nu_offset), mean=data_mean.to(STAT_DTYPE), psi=psi)


def posterior(prior: NIWPrior, stats: SuffStats) -> NIWPosterior:
    """NIW posterior given statistics (DESIGN §2). Zero counts give back the prior.

    The (..., d, d) work is done in place on one fresh tensor (plus one for the symmetrisation):
    at large K the posteriors are memory-bound, and a temporary per term would dominate them."""
    N = stats.count
    kappa_n = prior.kappa + N
    nu_n = prior.nu + N
    m = prior.mean
    mean_n = (prior.kappa * m + stats.sum) / kappa_n[..., None]
    base = prior.nu * prior.psi + prior.kappa * torch.outer(m, m)  # (d, d)
    nu_psi_n = stats.scatter + base
    # - kappa* m* m*^T, one batched rank-1 update
    lead = nu_psi_n.reshape(-1, *nu_psi_n.shape[-2:])
    km = (kappa_n[..., None] * mean_n).reshape(-1, mean_n.shape[-1], 1)
    lead.baddbmm_(km, mean_n.reshape(-1, 1, mean_n.shape[-1]), alpha=-1.0)
    nu_psi_n = lead.view(nu_psi_n.shape)
    psi_n = torch.add(nu_psi_n, nu_psi_n.transpose(-1, -2)).mul_(0.5)
    return NIWPosterior(kappa_n, nu_n, mean_n, psi_n.div_(nu_n[..., None, None]))


def safe_cholesky(a: torch.Tensor, what: str = "matrix") -> torch.Tensor:
    """Cholesky factor of a batch of (nearly) SPD matrices; adds growing jitter where needed.

    a: (..., d, d). Non-SPD inputs get jitter eps * mean(diag) * I (eps = 1e-10 .. 1e-2) and a
    warning naming how many matrices needed it; never raises for finite input.
    """
    L, info = torch.linalg.cholesky_ex(a)
    if not bool((info > 0).any()):
        return L
    bad = info > 0
    d = a.shape[-1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    scale = a.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(a.dtype).tiny)
    for eps in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1e0):
        fixed = a + (eps * scale)[..., None, None] * eye
        L_fix, info_fix = torch.linalg.cholesky_ex(fixed)
        L = torch.where(bad[..., None, None], L_fix, L)
        bad = bad & (info_fix > 0)
        if not bool(bad.any()):
            break
    warnings.warn(
        f"{what}: {int((info > 0).sum())} matrix(es) not positive definite; added jitter to the diagonal",
        RuntimeWarning,
        stacklevel=2,
    )
    if bool(bad.any()):
        raise FloatingPointError(f"{what}: could not make {int(bad.sum())} matrix(es) positive definite")
    return L


def logdet_from_cholesky(L: torch.Tensor) -> torch.Tensor:
    """log|A| from its Cholesky factor L: (..., d, d) -> (...,)."""
    return 2.0 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)


def diag_posterior_psi(prior: NIWPrior, stats: SuffStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "diag" family's posterior: the d = 1 NIW of every coordinate j, from the diagonals only.

    -> (kappa* (...,), m* (..., d), psi*_jj (..., d)), with
    nu* psi*_jj = nu psi_jj + kappa m_j^2 + S_jj - kappa* m*_j^2. O(d) a set: no d x d work."""
    N = stats.count
    kappa_n = prior.kappa + N
    mean_n = (prior.kappa * prior.mean + stats.sum) / kappa_n[..., None]
    nu_psi_n = (prior.nu * prior.psi.diagonal() + prior.kappa * prior.mean.square()
                + stats.scatter.diagonal(dim1=-2, dim2=-1) - kappa_n[..., None] * mean_n.square())
    # the added terms are a centred scatter and a square, so nu psi_jj bounds it below (cancellation can round under)
    nu_psi_n = torch.maximum(nu_psi_n, prior.nu * prior.psi.diagonal())
    return kappa_n, mean_n, nu_psi_n / (prior.nu + N)[..., None]


def log_marginal_likelihood(prior: NIWPrior, stats: SuffStats) -> torch.Tensor:
    """log f(X) of each set under the NIW prior (DESIGN §2), from statistics only. -> (...,).

    family "diag": the sum over coordinates of the d = 1 formula, on the diagonals of S and psi."""
    if prior.family == "diag":
        N = stats.count
        kappa_n, _, psi_n = diag_posterior_psi(prior, stats)
        nu_n = prior.nu + N
        nu = torch.as_tensor(prior.nu, dtype=STAT_DTYPE, device=N.device)
        d = prior.n_features
        return (
            -0.5 * N * d * math.log(math.pi)
            + d * (torch.lgamma(nu_n / 2) - torch.lgamma(nu / 2))
            + 0.5 * prior.nu * torch.log(prior.nu * prior.psi.diagonal()).sum()
            - 0.5 * nu_n * torch.log(nu_n[..., None] * psi_n).sum(-1)
            + 0.5 * d * (math.log(prior.kappa) - torch.log(kappa_n))
        )
    post = posterior(prior, stats)
    d = prior.n_features
    N = stats.count
    prior_logdet = logdet_from_cholesky(safe_cholesky(prior.nu * prior.psi, "prior scale"))
    # in place on the posterior's own psi: no second (..., d, d) temporary
    post_logdet = logdet_from_cholesky(safe_cholesky(post.psi.mul_(post.nu[..., None, None]), "posterior scale"))
    nu = torch.as_tensor(prior.nu, dtype=STAT_DTYPE, device=N.device)
    return (
        -0.5 * N * d * math.log(math.pi)
        + torch.special.multigammaln(post.nu / 2, d)
        - torch.special.multigammaln(nu / 2, d)
        + 0.5 * prior.nu * prior_logdet
        - 0.5 * post.nu * post_logdet
        + 0.5 * d * (math.log(prior.kappa) - torch.log(post.kappa))
    )


@dataclass(frozen=True)
class GaussianParams:
    """Mixture parameters. log_weights: (K,); means: (K, d); chol: (K, d, d) lower Cholesky of Sigma."""

    log_weights: torch.Tensor
    means: torch.Tensor
    chol: torch.Tensor

    @property
    def n_clusters(self) -> int:
        return self.means.shape[0]

    def to(self, *args, **kwargs) -> GaussianParams:
        return GaussianParams(
            self.log_weights.to(*args, **kwargs), self.means.to(*args, **kwargs), self.chol.to(*args, **kwargs)
        )

    def __getitem__(self, idx) -> GaussianParams:
        return GaussianParams(self.log_weights[idx], self.means[idx], self.chol[idx])


def map_estimate(prior: NIWPrior, stats: SuffStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted MAP M-step: the NIW mode.

    mu = m*,  Sigma = nu* psi* / (nu* + d + 2)   (joint mode of the NIW; DESIGN §2 "mode" form).
    family "diag": Sigma = diag(nu* psi*_jj / (nu* + 3)), the d = 1 mode of every coordinate.
    Returns means (..., d) and the Cholesky factor of Sigma (..., d, d).
    """
    if prior.family == "diag":
        _, mean_n, psi_n = diag_posterior_psi(prior, stats)
        nu_n = (prior.nu + stats.count)[..., None]
        return mean_n, torch.diag_embed((psi_n * nu_n / (nu_n + 3)).sqrt())
    post = posterior(prior, stats)
    d = prior.n_features
    cov = post.psi.mul_((post.nu / (post.nu + d + 2))[..., None, None])  # in place (log_marginal_likelihood)
    return post.mean, safe_cholesky(cov, "M-step covariance")


def dp_log_weights(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mixture weights from the Dirichlet posterior of the weighted counts (posterior mean).

    pi_k = (N_k + alpha / K) / (N + alpha)   -- finite symmetric-Dirichlet approximation of the DP.
    counts: (K,) -> log pi: (K,)
    """
    K = counts.shape[-1]
    a = counts.to(STAT_DTYPE).clamp_min(0) + alpha / K
    return torch.log(a) - torch.log(a.sum(-1, keepdim=True))


def log_cluster_score(prior: NIWPrior, stats: SuffStats, min_count: float = 0.0) -> torch.Tensor:
    """log Gamma(N_k) + log f(X_k): set k's factor in the CRP x NIW joint of a partition,
    p(X, partition) proportional to alpha^K prod_k Gamma(N_k) f(X_k) (CRP prior times NIW
    marginals). The split and merge ratios (DeepDPM eq. 9), the partition evidence and the
    merge tree are sums and differences of it. Batched -> (...,).

    min_count: Gamma's argument is at least this (merge_tree: an empty cluster scores
    lgamma(1e-8), finite, and is merged first); 0 leaves counts as they are.
    """
    count = stats.count.clamp_min(min_count) if min_count > 0 else stats.count
    return torch.lgamma(count) + log_marginal_likelihood(prior, stats)


def log_split_ratio(prior: NIWPrior, alpha: float, part1: SuffStats, part2: SuffStats) -> torch.Tensor:
    """log H_s for splitting (part1 ∪ part2) into part1, part2 (DeepDPM eq. 9). Batched -> (...,).

    H_s = alpha Gamma(N_1) f(X_1) Gamma(N_2) f(X_2) / (Gamma(N) f(X)).
    The merge ratio of the same pair is its negative (H_m = 1 / H_s).
    """
    return (
        math.log(alpha)
        + log_cluster_score(prior, part1)
        + log_cluster_score(prior, part2)
        - log_cluster_score(prior, part1 + part2)
    )


def log_merge_ratio(prior: NIWPrior, alpha: float, part1: SuffStats, part2: SuffStats) -> torch.Tensor:
    """log H_m = -log H_s for merging part1 and part2. Batched -> (...,)."""
    return -log_split_ratio(prior, alpha, part1, part2)


def log_partition_evidence(prior: NIWPrior, alpha: float, stats: SuffStats) -> torch.Tensor:
    """log p(X, partition) up to terms that do not depend on the partition, for a hard
    partition into the sets of `stats` (batch (K,), empty sets ignored):
    K log alpha + sum_k log_cluster_score. -> scalar."""
    s = stats[stats.count > 0]
    return s.count.shape[0] * math.log(alpha) + log_cluster_score(prior, s).sum()

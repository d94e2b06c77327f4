"""The start of a fit: a k-means partition and, jointly with it, the NIW prior (empirical Bayes).

    "evidence": k-means with K0 cells (their pooled within-cell scatter sets psi in psi_mode
                "pooled"), then k-means at K0 / step, K0 / step^2, ... 1 clusters (and at K0 step,
                K0 step^2, ... while the evidence still grows at the top); the partition and the
                prior of a small grid (kappa, covariance family, nu, psi scale) with the highest
                niw.log_partition_evidence start the fit.
    "kmeans":   k-means with k_init clusters.

Every rank calls these functions (the statistics are all-reduced); k-means itself runs on rank 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cluster_service import index as faiss_index
from cluster_service.config import FitConfig, PriorConfig
from cluster_service.core.niw import (
    NIWPrior,
    SuffStats,
    between_within_kappa,
    log_partition_evidence,
    make_prior,
    pooled_within_covariance,
)
from cluster_service.train.rows import Rows

# The evidence start tries k-means at K0, K0 / step, K0 / step^2, ... 1.
EVIDENCE_GRID_STEP = 2**0.5
# Below this many rows a cluster per dimension (at the empirical-Bayes kappa's start), that kappa
# and its partition start the fit: there the configured vague kappa's charge for each cluster's
# mean, (d / 2) log(N_k / kappa), outweighs what separates clusters (one cluster where k-means
# finds structure). With more rows the configured kappa is kept: the data term decides K there,
# and on data that is not a Gaussian mixture (sklearn digits) the smaller charge adds clusters
# (BENCHMARKS.md, "Rows per dimension").
FEW_ROWS_PER_DIM = 2.0


def data_prior(cfg: PriorConfig, data_var: torch.Tensor, within_cov: torch.Tensor | None = None,
               factor: float = 1.0) -> NIWPrior:
    """The prior in centred coordinates (mean 0) scaled to the data: data_var (d,) per-feature
    variance; within_cov (d, d) the pooled within-cell scatter (psi_mode "pooled"); factor
    multiplies the whole psi, its isotropic floor included."""
    scale = factor * (cfg.pooled_scale if cfg.psi_mode == "pooled" else cfg.psi_scale)
    prior = make_prior(torch.zeros_like(data_var), data_var, cfg.kappa, cfg.nu_offset, cfg.psi_mode, scale,
                       within_cov, psi_floor=cfg.psi_scale * factor)
    return prior if cfg.covariance != "diag" else with_family(prior, "diag")  # "auto" starts full


def with_family(prior: NIWPrior, family: str) -> NIWPrior:
    """`prior` (nu given as the full family's, d + offset) in covariance `family`: a "diag" block is one
    coordinate, so its nu is that less d - 1 (the same excess over the block's dimension)."""
    nu = prior.nu - (prior.n_features - 1) if family == "diag" else prior.nu
    return NIWPrior(prior.kappa, nu, prior.mean, prior.psi, family)


def kmeans_stats(rows: Rows, n_clusters: int, seed: int) -> SuffStats:
    """FAISS k-means on rank 0 -> broadcast -> hard statistics of all rows, (n_clusters,). It
    trains on the same rows in every worker layout: up to index.KMEANS_MAX_POINTS rows drawn by
    global index as index.kmeans draws them in one process."""
    n, cap = rows.n_global, faiss_index.KMEANS_MAX_POINTS
    pick = np.arange(n) if n <= cap else np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
    mine = torch.isin(rows.global_index, torch.from_numpy(pick).to(rows.device))
    (sample,) = rows.on_rank0(mine)
    centroids = None
    if rows.comm.rank == 0:
        centroids = faiss_index.kmeans(sample, n_clusters, seed=seed)
    centroids = rows.comm.broadcast_object(centroids)
    z = torch.from_numpy(faiss_index.assign_nearest(rows.x, centroids)).to(rows.device)
    return rows.hard_stats(z, centroids.shape[0])


def overcluster_size(cfg: FitConfig, n_global: int) -> int:
    """K0 of the over-clustered start: overcluster_factor * sqrt(n), at least k_init, at most
    n / 2 (cells of two points or more) and moves.max_clusters."""
    k0 = max(cfg.k_init, math.ceil(cfg.overcluster_factor * math.sqrt(n_global)))
    return max(1, min(k0, n_global // 2, cfg.moves.max_clusters))


def evidence_scales(cfg: PriorConfig, n_global: int, n_features: int, n_cells: int) -> list[float]:
    """The psi scales the evidence start may pick: cfg.pooled_evidence_scales, but those below 1
    only when the start's cells are under-determined (fewer than 2 (d + 2) points each on
    average): their pooled scatter then overstates the clusters' spread."""
    few = n_global / max(1, n_cells) < 2 * (n_features + 2)
    return [s for s in cfg.pooled_evidence_scales if s >= 1.0 or few] or [1.0]


def evidence_start(rows: Rows, cfg: FitConfig, cells: SuffStats, groups: list[list[NIWPrior]],
                   extend: bool = False) -> list[tuple[SuffStats, NIWPrior]]:
    """For each group of priors, the k-means partition (K0 = the cells, then K0 / step, K0 / step^2,
    ... 1) and the prior of the group with the highest log_partition_evidence; the partitions are
    shared by the groups. cells: (K0,) non-empty. With `extend`, while the last group's best is the
    largest K tried, k-means at K0 step, K0 step^2, ... is tried too (up to n / 2 and
    moves.max_clusters): with few rows a cluster, sqrt(n) cells can be fewer than the clusters."""
    best = [(-math.inf, cells, group[0]) for group in groups]

    def try_partition(cand: SuffStats) -> None:
        cand = cand[cand.count > 0]
        for g, group in enumerate(groups):
            for prior in group:
                score = float(log_partition_evidence(prior, cfg.prior.alpha, cand))
                if score > best[g][0]:
                    best[g] = (score, cand, prior)

    k0 = int(cells.count.shape[0])
    for K in sorted({max(1, round(k0 / EVIDENCE_GRID_STEP**i)) for i in range(64)}, reverse=True):
        try_partition(cells if K == k0 else kmeans_stats(rows, K, cfg.seed))
    top, cap = k0, min(rows.n_global // 2, cfg.moves.max_clusters)
    while extend and best[-1][1].count.shape[0] == top and round(top * EVIDENCE_GRID_STEP) <= cap:
        top = round(top * EVIDENCE_GRID_STEP)
        try_partition(kmeans_stats(rows, top, cfg.seed))
    return [(stats, prior) for _, stats, prior in best]


def starting_partition(cfg: FitConfig, rows: Rows, data_var: torch.Tensor,
                       prior: NIWPrior | None) -> tuple[SuffStats, NIWPrior]:
    """The starting statistics (K,) and the prior of the fit (`prior` is the data-scaled one, or
    None in psi_mode "pooled", where the start's cells set it)."""
    cells = None
    if cfg.init == "evidence" or cfg.prior.psi_mode == "pooled":
        cells = kmeans_stats(rows, overcluster_size(cfg, rows.n_global), cfg.seed)
        cells = cells[cells.count > 0]
    if cfg.prior.psi_mode == "pooled":
        cells_within = pooled_within_covariance(cells)
        prior = data_prior(cfg.prior, data_var, cells_within)
    if cfg.init != "evidence":
        return kmeans_stats(rows, cfg.k_init, cfg.seed), prior
    # empirical Bayes over a small grid of priors, jointly with the partition
    d = rows.n_features
    nus = [d + cfg.prior.nu_offset]  # as the full family's; with_family shifts them for "diag"
    if cfg.prior.nu_mode == "evidence":  # nu = d + nu_offset, 1.5 d, 3 d, 9 d, 33 d
        nus += [d + f * d for f in (0.5, 2, 8, 32)]
    psis = [prior.psi]
    if cfg.prior.psi_mode == "pooled":  # psi = s * pooled within-cell scatter (floored)
        scales = evidence_scales(cfg.prior, rows.n_global, d, int(cells.count.shape[0]))
        psis = [data_prior(cfg.prior, data_var, cells_within, s).psi for s in scales]
    families = ("full", "diag") if cfg.prior.covariance == "auto" else (cfg.prior.covariance,)

    def grid(kappa: float) -> list[NIWPrior]:
        return [with_family(NIWPrior(kappa, nu, prior.mean, psi), family)
                for family in families for nu in nus for psi in psis]

    kappa_eb = between_within_kappa(cells) if cells.count.shape[0] > 1 else 0.0
    if cfg.prior.kappa_mode == "fixed" or kappa_eb <= prior.kappa:
        return evidence_start(rows, cfg, cells, [grid(prior.kappa)])[0]
    (stats, fixed), (eb_stats, eb) = evidence_start(rows, cfg, cells, [grid(prior.kappa), grid(kappa_eb)], extend=True)
    if rows.n_global / (eb_stats.count.shape[0] * d) < FEW_ROWS_PER_DIM:
        return eb_stats, eb
    return stats, fixed

"""The start of a fit: a k-means partition and, jointly with it, the NIW prior (empirical Bayes).

    "evidence": k-means with K0 cells (their pooled within-cell scatter sets psi in psi_mode
                "pooled"), then k-means at K0 / step, K0 / step^2, ... 1 clusters; the partition
                and the prior of a small grid (nu, psi scale) with the highest
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
    log_partition_evidence,
    make_prior,
    pooled_within_covariance,
)
from cluster_service.train.rows import Rows

# The evidence start tries k-means at K0, K0 / step, K0 / step^2, ... 1.
EVIDENCE_GRID_STEP = 2**0.5


def data_prior(cfg: PriorConfig, data_var: torch.Tensor, within_cov: torch.Tensor | None = None,
               factor: float = 1.0) -> NIWPrior:
    """The prior in centred coordinates (mean 0) scaled to the data: data_var (d,) per-feature
    variance; within_cov (d, d) the pooled within-cell scatter (psi_mode "pooled"); factor
    multiplies the whole psi, its isotropic floor included."""
    scale = factor * (cfg.pooled_scale if cfg.psi_mode == "pooled" else cfg.psi_scale)
    return make_prior(torch.zeros_like(data_var), data_var, cfg.kappa, cfg.nu_offset, cfg.psi_mode, scale,
                      within_cov, psi_floor=cfg.psi_scale * factor)


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


def evidence_start(rows: Rows, cfg: FitConfig, cells: SuffStats, priors: list[NIWPrior]) -> tuple[SuffStats, NIWPrior]:
    """The k-means partition (K0 = the cells, then K0 / step, K0 / step^2, ... 1) and the prior
    of `priors` with the highest log_partition_evidence. cells: (K0,) non-empty."""
    best, best_stats, best_prior = -math.inf, cells, priors[0]
    ks = sorted({max(1, round(cells.count.shape[0] / EVIDENCE_GRID_STEP**i)) for i in range(64)}, reverse=True)
    for K in ks:
        cand = cells if K == cells.count.shape[0] else kmeans_stats(rows, K, cfg.seed)
        cand = cand[cand.count > 0]
        for prior in priors:
            score = float(log_partition_evidence(prior, cfg.prior.alpha, cand))
            if score > best:
                best, best_stats, best_prior = score, cand, prior
    return best_stats, best_prior


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
    nus = [prior.nu]
    if cfg.prior.nu_mode == "evidence":  # nu = d + nu_offset, 1.5 d, 3 d, 9 d, 33 d
        nus += [d + f * d for f in (0.5, 2, 8, 32)]
    psis = [prior.psi]
    if cfg.prior.psi_mode == "pooled":  # psi = s * pooled within-cell scatter (floored)
        scales = evidence_scales(cfg.prior, rows.n_global, d, int(cells.count.shape[0]))
        psis = [data_prior(cfg.prior, data_var, cells_within, s).psi for s in scales]
    priors = [NIWPrior(prior.kappa, nu, prior.mean, psi) for nu in nus for psi in psis]
    return evidence_start(rows, cfg, cells, priors)

"""The DeepDPM epoch loop: named steps, one driver, a reducer injected once.

    run_epoch:  [truncated E-step] -> train_nets -> accumulate -> reduce -> m_step
                -> prune | split | merge (decide on rank 0, broadcast, apply)

The same `Engine` runs in one process (`LocalComm`) and in every Ray Train worker
(`TorchDistComm`): each process holds only its own rows; statistics are summed with one
all-reduce per epoch; rank 0's move decisions are broadcast. Mini-batches are drawn from one
global permutation shared by all ranks (each rank trains on its members of the global batch
and gradients are summed), so N workers follow the single-process run up to float rounding.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cluster_service import index as faiss_index
from cluster_service.config import SCHEMA_VERSION, FitConfig
from cluster_service.core import moves as mv
from cluster_service.core import truncated as tr
from cluster_service.core.device import resolve_device
from cluster_service.core.gaussian import (
    WhitenedGaussians,
    add_hard_stats_,
    add_weighted_stats_,
    chunk_rows,
    iter_chunks,
    log_joint,
    row_argmax,
    stats_chunk_rows,
)
from cluster_service.core.hierarchy import MergeTree, merge_tree
from cluster_service.core.nets import (
    ClusterNet,
    SubclusterNets,
    ajs_loss,
    candidate_logits,
    kl_loss,
    resize_cluster_net,
    resize_subnets,
    subcluster_loss,
)
from cluster_service.core.niw import (
    STAT_DTYPE,
    GaussianParams,
    NIWPrior,
    SuffStats,
    between_within_kappa,
    dp_log_weights,
    log_marginal_likelihood,
    log_partition_evidence,
    make_prior,
    map_estimate,
    pooled_within_covariance,
)
from cluster_service.core.schedule import Convergence, EpochPlan
from cluster_service.train.comm import LocalComm, unwrap

# The evidence start tries k-means at K0, K0 / step, K0 / step^2, ... 1.
_EVIDENCE_GRID_STEP = 2**0.5
# Up to this many clusters, cluster and subcluster statistics share one matmul (see accumulate).
DENSE_SUBCLUSTER_MAX = 256
# The subnets take one optimizer step per this many rows per subnet (see train_nets).
SUB_ROWS_PER_NET = 8
# Sinkhorn steps that hold the net's per-cluster mass to the E-step's (FitConfig.net_mass).
MASS_CALIBRATION_STEPS = 10


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did (returned, never printed here)."""

    epoch: int
    n_clusters: int
    loss_cluster: float
    loss_sub: float
    log_marginal: float  # sum_k log f(X_k) of the clusters' statistics
    size_entropy: float  # entropy (nats) of the cluster-size distribution
    splits_proposed: int
    splits_accepted: int
    merges_proposed: int
    merges_accepted: int
    pruned: int
    frozen: bool
    time_total: float
    time_train: float
    time_stats: float
    time_reduce: float
    time_mstep: float
    time_moves: float
    time_estep: float = 0.0  # the truncated E-step's scoring (part of time_train)
    log_densities: int = 0  # (row, cluster) Gaussian log-densities evaluated this epoch, all ranks
    truncated: bool = False  # scored candidate sets (core/truncated) instead of all K
    deletes_proposed: int = 0  # moves.delete_largest: clusters tested for deletion this epoch
    deletes_accepted: int = 0
    stopped: str = ""  # on the last epoch of a fit: why it ended (core.schedule.Convergence)

    def as_dict(self) -> dict:
        return asdict(self)


class Engine:
    """Training state and the named steps of one epoch.

    x: (n_local, d) this process's rows; global_index: (n_local,) their positions in the global
    row order (0..n_global-1). The engine centres the data on the global mean (kept as `shift`)
    so statistics stay well conditioned; parameters are in centred coordinates internally.
    """

    def __init__(
        self,
        cfg: FitConfig,
        x: torch.Tensor,
        global_index: torch.Tensor | None = None,
        n_global: int | None = None,
        comm=None,
        device: torch.device | None = None,
    ):
        self.cfg = cfg
        self.comm = comm or LocalComm()
        self.device = device or resolve_device(cfg.device)
        # Dense per-row math (densities, responsibilities, outer-product matmuls) in float32 on
        # every device, each chunk's sums accumulated in float64; the rows are kept centred in
        # float32 (half the memory). Statistics, the M-step, move decisions and the final MAP
        # assignment (`assign`) are float64 (float64 dense math was slower for the same K and
        # assignments: docs/ARCHITECTURE.md, Performance).
        self.dtype = torch.float32
        n_local = x.shape[0]
        self.n_global = int(n_global if n_global is not None else n_local)
        gi = torch.arange(n_local) if global_index is None else torch.as_tensor(global_index, dtype=torch.long)
        self.g2l = torch.full((self.n_global,), -1, dtype=torch.long)
        self.g2l[gi] = torch.arange(n_local)
        self.g2l = self.g2l.to(self.device)
        self.global_index = gi.to(self.device)
        # Truncated E-step state: each local row's best clusters of the last scoring, best first
        # (n_local, B) int64, -1 = none; None until the first scoring (then FAISS-nearest means).
        self.best: torch.Tensor | None = None
        # what is derived from self.params once per M-step: its CandidateScorers by dtype, "graph"
        self._derived: tuple[GaussianParams | None, dict] = (None, {})
        self.min_weight = tr.MIN_WEIGHT  # sparse statistics leave out smaller responsibilities

        # Centre on the global mean in float64, chunk by chunk: no full float64 copy of the rows
        # (at 1.28M x 128 that would be 1.3 GB per copy next to the 0.65 GB float32 rows).
        x = torch.as_tensor(x)
        rows = chunk_rows(4 * x.shape[1], n_local)
        total = torch.zeros(x.shape[1], dtype=STAT_DTYPE, device=self.device)
        for sl in iter_chunks(n_local, rows):
            total += x[sl].to(self.device, STAT_DTYPE).sum(0)
        moments = self.comm.all_reduce_sum(torch.cat([torch.tensor([float(n_local)], dtype=STAT_DTYPE,
                                                                   device=self.device), total]))
        self.shift = (moments[1:] / moments[0]).to(STAT_DTYPE)
        self.x = torch.empty(x.shape, dtype=self.dtype, device=self.device)
        sq = torch.zeros_like(total)
        for sl in iter_chunks(n_local, rows):
            xc = x[sl].to(self.device, STAT_DTYPE) - self.shift
            sq += xc.square().sum(0)
            self.x[sl] = xc.to(self.dtype)
        self.data_var = self.comm.all_reduce_sum(sq) / moments[0]
        del x
        # In psi_mode "pooled" the prior's scale comes from the over-clustered start, so it is
        # set by initialize() (or restored by load_state_dict).
        self.prior: NIWPrior = self._make_prior(None) if cfg.prior.psi_mode != "pooled" else None
        self.input_scale = float(self.data_var.mean().clamp_min(1e-30).sqrt())
        self.n_features = self.x.shape[1]

        self.move_gen = torch.Generator().manual_seed(cfg.seed)  # used by rank 0's decisions only
        self.batch_gen = torch.Generator().manual_seed(cfg.seed + 1)  # identical on every rank
        self.init_gen = torch.Generator().manual_seed(cfg.seed + 2)  # net (re)initialisation
        self.epoch = 0
        self.frozen_until = -1
        self.convergence = Convergence(cfg.schedule, self.n_global, self.x.shape[1])  # early stop (fit.run_schedule)
        self.last_stats: tuple[SuffStats, SuffStats] | None = None  # set by run_epoch
        self.params: GaussianParams
        self.sub_params: GaussianParams
        self.cluster_net: torch.nn.Module
        self.subnets: torch.nn.Module

    # ---- initialisation --------------------------------------------------------------------

    def _make_prior(self, within_cov: torch.Tensor | None, factor: float = 1.0) -> NIWPrior:
        p = self.cfg.prior
        scale = factor * (p.pooled_scale if p.psi_mode == "pooled" else p.psi_scale)
        prior = make_prior(
            torch.zeros_like(self.shift), self.data_var, p.kappa, p.nu_offset, p.psi_mode, scale, within_cov,
            psi_floor=p.psi_scale * factor,  # factor scales the whole psi, floor included
        )
        if p.covariance != "diag":  # "auto" starts full; the evidence start may pick "diag"
            return prior
        return NIWPrior(prior.kappa, prior.nu - (self.n_features - 1), prior.mean, prior.psi, "diag")

    def kmeans_stats(self, n_clusters: int) -> SuffStats:
        """FAISS k-means on rank 0 -> broadcast -> hard statistics of all rows, (K,). It trains on
        the same rows in every worker layout (`_global_rows`): up to index.KMEANS_MAX_POINTS rows
        drawn by global index as index.kmeans draws them in one process."""
        n, cap = self.n_global, faiss_index.KMEANS_MAX_POINTS
        pick = np.arange(n) if n <= cap else np.sort(np.random.default_rng(self.cfg.seed).choice(n, cap, replace=False))
        mine = torch.isin(self.global_index, torch.from_numpy(pick).to(self.device))
        (sample,) = self._global_rows(mine)
        centroids = None
        if self.comm.rank == 0:
            centroids = faiss_index.kmeans(sample, n_clusters, seed=self.cfg.seed)
        centroids = self.comm.broadcast_object(centroids)
        z = torch.from_numpy(faiss_index.assign_nearest(self.x, centroids)).to(self.device)
        return self.hard_stats(z, centroids.shape[0])

    def _global_rows(self, mask: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Rank 0 gets every rank's rows where mask (n_local,) is set, in global row order, with
        the same rows of each of `columns` ((n_local,) each), so decisions made on rows do not
        depend on how they are spread over workers; other ranks get Nones. In one process: the
        local rows. -> (x, *columns)."""
        if self.comm.world_size == 1:
            if bool(mask.all()):
                return (self.x, *columns)
            return (self.x[mask], *(c[mask] for c in columns))
        mine = (self.global_index[mask].cpu(), self.x[mask].cpu(), *(c[mask].cpu() for c in columns))
        parts = self.comm.gather_object(mine)
        if self.comm.rank != 0:
            return (None,) * (1 + len(columns))
        order = torch.argsort(torch.cat([p[0] for p in parts]))
        return tuple(torch.cat([p[i] for p in parts])[order].to(self.device) for i in range(1, 2 + len(columns)))

    def hard_stats(self, z: torch.Tensor, n_clusters: int) -> SuffStats:
        """Statistics (n_clusters,) of the local rows with hard labels z (n_local,) int64,
        all-reduced (a collective: every rank calls it)."""
        stats = SuffStats.zeros((n_clusters,), self.n_features, device=self.device)
        ones = torch.ones(self.x.shape[0], dtype=STAT_DTYPE, device=self.device)
        # no (rows, d, d) intermediate (add_hard_stats_ sorts rows by bin): large chunks
        for sl in iter_chunks(self.x.shape[0], chunk_rows(8 * self.n_features, self.x.shape[0])):
            add_hard_stats_(stats, self.x[sl], z[sl], ones[sl])
        return self.reduce_stats(stats)

    def overcluster_size(self) -> int:
        """K0 of the over-clustered start: overcluster_factor * sqrt(n), at least k_init, at
        most n / 2 (cells of two points or more) and moves.max_clusters."""
        cfg = self.cfg
        k0 = max(cfg.k_init, math.ceil(cfg.overcluster_factor * math.sqrt(self.n_global)))
        return max(1, min(k0, self.n_global // 2, cfg.moves.max_clusters))

    def evidence_scales(self, cells: SuffStats) -> list[float]:
        """The psi scales the evidence start may pick: prior.pooled_evidence_scales, but those below 1
        only when the start's cells are under-determined (fewer than 2 (d + 2) points each on
        average): their pooled scatter then overstates the clusters' spread; well-determined
        cells keep scale 1. A scale multiplies the whole psi, its isotropic floor included
        (_make_prior), so a small scale is not swamped by the floor (measured on ImageNet-50:
        docs/ARCHITECTURE.md, K inference)."""
        d, n_cells = self.n_features, max(1, int(cells.count.shape[0]))
        few = self.n_global / n_cells < 2 * (d + 2)
        return [s for s in self.cfg.prior.pooled_evidence_scales if s >= 1.0 or few] or [1.0]

    def _evidence_start(self, cells: SuffStats, priors: list[NIWPrior]) -> tuple[SuffStats, NIWPrior]:
        """The k-means partition (K0 = the cells, then K0 / step, K0 / step^2, ... 1) and the
        prior with the highest log_partition_evidence. cells: (K0,) non-empty."""
        alpha = self.cfg.prior.alpha
        best, best_stats, best_prior = -math.inf, cells, priors[0]
        ks = sorted({max(1, round(cells.count.shape[0] / _EVIDENCE_GRID_STEP**i)) for i in range(64)}, reverse=True)
        for K in ks:
            cand = cells if K == cells.count.shape[0] else self.kmeans_stats(K)
            cand = cand[cand.count > 0]
            for prior in priors:
                score = float(log_partition_evidence(prior, alpha, cand))
                if score > best:
                    best, best_stats, best_prior = score, cand, prior
        return best_stats, best_prior

    def family_grid(self, full_nus: list[float]) -> list[tuple[str, list[float]]]:
        """(family, the nus to try with it) for the evidence start. "diag" blocks are 1-d, so its nus
        are the full family's less d - 1 (the same excess over each block's dimension)."""
        fams = ("full", "diag") if self.cfg.prior.covariance == "auto" else (self.cfg.prior.covariance,)
        shift = self.n_features - 1
        return [(f, full_nus if f == "full" else [nu - shift for nu in full_nus]) for f in fams]

    def initialize(self) -> None:
        """Starting partition -> hard statistics -> prior (pooled mode) -> MAP params.

        "evidence": k-means with K0 cells (their pooled within-cell scatter sets psi in pooled
        mode), then k-means at K0 / step^i down to 1; the partition with the highest
        log_partition_evidence starts the fit. "kmeans": k-means with k_init clusters.
        """
        cells = None
        if self.cfg.init == "evidence" or self.cfg.prior.psi_mode == "pooled":
            cells = self.kmeans_stats(self.overcluster_size())
            cells = cells[cells.count > 0]
        if self.cfg.prior.psi_mode == "pooled":
            cells_within = pooled_within_covariance(cells)
            self.prior = self._make_prior(cells_within)
        if self.cfg.init == "evidence":
            # empirical Bayes over a small grid of priors, jointly with the partition
            d = self.n_features
            nus = [self.prior.nu]
            if self.cfg.prior.nu_mode == "evidence":  # nu = d + nu_offset, 1.5 d, 3 d, 9 d, 33 d
                nus += [d + f * d for f in (0.5, 2, 8, 32)]
            psis = [self.prior.psi]
            if self.cfg.prior.psi_mode == "pooled":  # psi = s * pooled within-cell scatter (floored)
                psis = [self._make_prior(cells_within, s).psi for s in self.evidence_scales(cells)]
            kappas = [self.prior.kappa]
            if self.cfg.prior.kappa_mode == "evidence" and cells.count.shape[0] > 1:
                kappas += [k for k in (between_within_kappa(cells),) if k > self.prior.kappa]
            priors = [NIWPrior(kappa, nu, self.prior.mean, psi, fam) for kappa in kappas
                      for fam, fam_nus in self.family_grid(nus) for nu in fam_nus for psi in psis]
            stats, self.prior = self._evidence_start(cells, priors)
        else:
            stats = self.kmeans_stats(self.cfg.k_init)
        self._start_from_stats(stats)
        keep = mv.propose_prunes(stats.count, 0.5)  # k-means duplicates on tiny data
        if keep.removed:
            self.rebuild_for_k(mv.apply_prunes(keep, self.params, self.sub_params))

    def initialize_from(self, means: np.ndarray, chol: np.ndarray, prior: dict) -> None:
        """Continue from a fitted model instead of a fresh start (`cluster-service update`): its
        prior (psi, nu) and clusters (means (K, d), chol (K, d, d), original coordinates) assign
        this engine's rows; clusters that receive no row are dropped; MAP parameters, weights and
        subclusters are re-estimated from those rows; nets start fresh (the warm-up trains them
        against the model's responsibilities). Splits then add clusters for new data. prior: the
        model's ("kappa", "nu", "psi" (d, d), "family")."""
        dev = self.device
        self.prior = NIWPrior(float(prior["kappa"]), float(prior["nu"]), torch.zeros_like(self.shift),
                              torch.as_tensor(np.asarray(prior["psi"]), dtype=STAT_DTYPE, device=dev),
                              str(prior["family"]))
        start = GaussianParams(torch.zeros(means.shape[0], dtype=STAT_DTYPE, device=dev),
                               torch.as_tensor(means, dtype=STAT_DTYPE, device=dev) - self.shift,
                               torch.as_tensor(chol, dtype=STAT_DTYPE, device=dev))
        self.params, self.best = start, None
        z = torch.from_numpy(self.assign()[0]).to(dev)
        stats = self.hard_stats(z, means.shape[0])
        self._start_from_stats(stats[stats.count > 0])

    def _start_from_stats(self, stats: SuffStats) -> None:
        """MAP parameters, DP weights and principal-axis subclusters from starting statistics (K,);
        fresh nets (the clustering net seeded by cfg.seed) for that K."""
        K = int(stats.count.shape[0])
        self.best = None  # a new partition: candidates start from the nearest means
        means, chol = map_estimate(self.prior, stats)
        self.params = GaussianParams(dp_log_weights(stats.count, self.cfg.prior.alpha), means, chol)
        self.sub_params = mv.principal_axis_subclusters(self.prior, stats)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            net = ClusterNet(self.n_features, K, self.cfg.net.cluster_hidden, self.input_scale)
        subnets = SubclusterNets(self.n_features, K, self.cfg.net.sub_hidden, self.input_scale, self.init_gen)
        self._install_nets(net.to(self.device), subnets.to(self.device))

    def _install_nets(self, net: ClusterNet, subnets: SubclusterNets) -> None:
        self.cluster_net = self.comm.wrap(net)
        self.subnets = self.comm.wrap(subnets)
        # fused: one kernel per parameter instead of ~10 elementwise passes (3.5x faster at K 1000)
        self.opt = torch.optim.Adam(self.cluster_net.parameters(), lr=self.cfg.net.lr, fused=True)
        self.sub_opt = torch.optim.Adam(self.subnets.parameters(), lr=self.cfg.net.sub_lr, fused=True)

    def rebuild_for_k(self, result: mv.MoveResult, absorbed: dict[int, int] | None = None) -> None:
        """THE change-of-K event: parameters, heads, subnets, optimizers, DDP wrappers and the
        rows' candidate clusters together.

        Net rows follow `result.source`; subnets of `result.fresh` clusters are re-initialised;
        optimizers restart (Adam moments of resized tensors have no meaning for new rows). A row's
        best clusters map to their new indices: a split cluster to all its parts, a merged-away
        cluster j to its survivor (absorbed: old j -> old i), a removed one to nothing.
        """
        if self.best is not None:
            children: list[list[int]] = [[] for _ in range(self.n_clusters)]
            for new, old in enumerate(result.source.tolist()):
                children[old].append(new)
            for j, i in (absorbed or {}).items():
                children[j] = children[i]
            best = tr.remap_best(self.best, children)
            self.best = best.gather(1, torch.argsort((best < 0).to(torch.int8), dim=1, stable=True))
        self.params, self.sub_params = result.params, result.sub_params
        net = resize_cluster_net(unwrap(self.cluster_net), result.source)
        subnets = resize_subnets(unwrap(self.subnets), result.source, result.fresh, self.init_gen)
        self._install_nets(net, subnets)

    @property
    def n_clusters(self) -> int:
        return self.params.n_clusters

    # ---- the truncated E-step (core/truncated) ---------------------------------------------

    @property
    def truncated(self) -> bool:
        """Score each row's candidates instead of all K: once K > 2 x cfg.candidates (below that
        one dense matmul per chunk is cheaper than the per-cluster gathers)."""
        return self.cfg.candidates > 0 and self.n_clusters > 2 * self.cfg.candidates

    def _proxy_best(self, x: torch.Tensor, k: int = tr.N_KEEP) -> torch.Tensor:
        """Each row's k nearest cluster means (FAISS, Euclidean): candidates before any scoring,
        and among every scoring's candidates (tr.build_candidates)."""
        return torch.from_numpy(faiss_index.nearest_k(x, self.params.means, k)).to(self.device)

    def _cached(self, key, make):
        """make() once per parameter set (self.params is replaced, never mutated, by every M-step and move)."""
        if self._derived[0] is not self.params:
            self._derived = (self.params, {})
        if key not in self._derived[1]:
            self._derived[1][key] = make()
        return self._derived[1][key]

    def _scorer(self, dtype: torch.dtype) -> tr.CandidateScorer:
        """The current parameters' CandidateScorer in dtype (whitened once per M-step)."""
        return self._cached(dtype, lambda: tr.CandidateScorer(self.params, dtype))

    def _cluster_graph(self) -> torch.Tensor:
        return self._cached("graph", lambda: tr.cluster_graph(self._scorer(self.dtype), self.params.means,
                                                               self.cfg.candidates))

    @torch.no_grad()
    def score_candidates(self, x: torch.Tensor | None = None, dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate table (n, C) int64 (-1 = empty) and its log pi_k + log N(x; mu_k, Sigma_k)
        (n, C) (-inf at empty slots) for the local rows (or for other centred rows x)."""
        own = x is None
        if own:  # the local rows' nearest means, once per parameter set (2 n K d flops)
            x = self.x
            first = self.best is None or self.best.shape[0] != x.shape[0]
            # only a first scoring searches N_KEEP more (FAISS's top-k heap grows with k: 11
            # instead of 8 adds ~0.3 s to a 1.28M x 1000 search)
            width = tr.N_KEEP + tr.N_NEAR if first else tr.N_NEAR
            nearest = self._cached(("nearest", width), lambda: self._proxy_best(self.x, width))
            if first:  # no scoring yet: the nearest means stand in for the best clusters, and the
                # next N_NEAR of them fill the nearest-means slots
                self.best, nearest = nearest[:, : tr.N_KEEP].clone(), nearest[:, tr.N_KEEP :]
            best = self.best
        else:  # other rows: their nearest means are their best clusters
            best, nearest = self._proxy_best(x), None
        rows = self.global_index if own else torch.arange(x.shape[0], device=self.device)
        salt = self.cfg.seed * 1_000_003 + self.epoch
        cand = tr.build_candidates(best, self._cluster_graph(), tr.pseudo_random_clusters(rows, salt, self.n_clusters),
                                   self.cfg.candidates, nearest)
        return cand, self._scorer(dtype or self.dtype).score(x, cand)

    @torch.no_grad()
    def estep_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's truncated E-step: (candidates (n, C), log r^E over them (n, C)); keeps
        each row's best clusters for the next epoch's candidates."""
        cand, log_joint_c = self.score_candidates()
        order = log_joint_c.topk(min(tr.N_KEEP, cand.shape[1]), dim=1)
        self.best = cand.gather(1, order.indices).masked_fill(~torch.isfinite(order.values), -1)
        return cand, log_joint_c - torch.logsumexp(log_joint_c, dim=1, keepdim=True)

    # ---- the named steps --------------------------------------------------------------------

    def train_nets(self, plan: EpochPlan, use_estep: bool,
                   table: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, float]:
        """One pass of mini-batch training of the clustering net (target: E-step of the current
        parameters, from the truncated table when given) and, when planned, the subclustering
        nets. Returns summed losses / n_global."""
        cfg = self.cfg.net
        # one pass over the rows, in at least min_steps_per_epoch steps (smaller batches on small data)
        B = max(1, min(cfg.batch_size, math.ceil(self.n_global / cfg.min_steps_per_epoch)))
        steps = math.ceil(self.n_global / B)
        # The subnets step once per SUB_ROWS_PER_NET * K rows (at least every batch): at large K a
        # batch holds about one row per subnet, and a step per batch is mostly optimizer work.
        sub_every = max(1, math.ceil(SUB_ROWS_PER_NET * self.n_clusters / B))
        perm = torch.randperm(self.n_global, generator=self.batch_gen).to(self.device)
        g = WhitenedGaussians(self.params.means, self.params.chol, torch.float32) if table is None else None
        logw = self.params.log_weights.float()
        sub_means = self.sub_params.means.float()
        world = self.comm.world_size
        amp = self._train_autocast()
        loss_fn = kl_loss if cfg.loss == "kl" else (lambda a, b: ajs_loss(a, b, cfg.ajs_alpha))
        tot_cl = tot_sub = 0.0
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cluster_net.train()
        self.subnets.train()
        for s in range(steps):
            pos = (torch.arange(s * B, (s + 1) * B, device=self.device)) % self.n_global
            loc = self.g2l[perm[pos]]
            loc = loc[loc >= 0]
            xb = self.x[loc].float()
            with amp:
                logits = self.cluster_net(xb)
            logits = logits.float()  # the loss in float32
            with torch.no_grad():
                if table is None:
                    log_target = torch.log_softmax(g.log_prob(xb) + logw, dim=-1)
                else:  # targets on the candidates, and 0 on the rest (held where the row's tail is)
                    index, log_target = table[0][loc], table[1][loc].float()
            if table is None:
                per_row = loss_fn(logits, log_target)
            else:
                rest_target = torch.nn.functional.pad(log_target, (0, 1), value=-math.inf)
                per_row = loss_fn(candidate_logits(logits, index, tr.tail_held(log_target)), rest_target)
            loss = per_row.sum() * (world / B)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            tot_cl += float(loss.detach()) / world
            if plan.train_subnets:
                if use_estep:
                    z = log_target.argmax(-1)
                    z = z if table is None else index.gather(1, z[:, None])[:, 0]
                else:
                    z = row_argmax(logits.detach())
                pending.append((xb, z))
                if len(pending) == sub_every or s == steps - 1:
                    tot_sub += self._subnet_step(pending, sub_means, B)
                    pending = []
        # Each rank summed only its members of every batch: add the ranks' parts.
        tot = self.comm.all_reduce_sum(torch.tensor([tot_cl, tot_sub], dtype=STAT_DTYPE, device=self.device))
        return float(tot[0]) / steps, float(tot[1]) / steps

    def _train_autocast(self) -> torch.autocast:
        """The clustering net's training-pass precision (NetConfig.train_precision): a bfloat16
        autocast context, or a disabled one (float32)."""
        mode = self.cfg.net.train_precision
        if mode == "auto":
            fast = (torch.cuda.is_bf16_supported() if self.device.type == "cuda"
                    else self.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
            mode = "bfloat16" if fast and self.truncated else "float32"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mode == "bfloat16")

    def _subnet_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], sub_means: torch.Tensor, B: int) -> float:
        """One optimizer step of the subnets on the rows of `batches` (local rows x, hard clusters z);
        every rank steps together. Returns this rank's summed loss / B."""
        xb = torch.cat([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
        z = torch.cat([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
        total = subcluster_loss(self.subnets(xb, z), xb, sub_means[z]).sum() / self.input_scale**2
        loss = total * (self.comm.world_size / (B * len(batches)))
        self.sub_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sub_opt.step()
        return float(total.detach()) / B

    @torch.no_grad()
    def log_responsibilities(self, x: torch.Tensor, use_estep: bool) -> torch.Tensor:
        """log r_ik for rows x: the clustering net's (DeepDPM) or the E-step's. -> (n, K)."""
        if use_estep:
            return torch.log_softmax(log_joint(x, self.params, self.dtype, self.cfg.chunk_size), -1)
        return torch.log_softmax(self.net_logits(x), -1)

    @torch.no_grad()
    def net_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The clustering net's logits for rows x -> (n, K) in the engine's dtype: its
        log-responsibilities up to a per-row constant. The un-wrapped net: a DDP forward is a
        collective (buffer broadcast), and ranks run different numbers of inference chunks."""
        net = unwrap(self.cluster_net)
        net.eval()
        return net(x.float()).to(self.dtype)

    @torch.no_grad()
    def accumulate(self, use_estep: bool, table: tuple[torch.Tensor, torch.Tensor] | None = None,
                   subclusters: bool = True) -> tuple[SuffStats, SuffStats | None]:
        """Local statistics: clusters weighted by r_ik; subclusters (bin 2k+j) by hard z_i = k
        times the subnet's r~_ij. Returns batch shapes (K,) and (K, 2).

        Up to DENSE_SUBCLUSTER_MAX clusters, both come from ONE matmul [r | w~]^T (x ⊗ x) with
        the subcluster weights as a dense (n, 2K) matrix: the outer products are formed once
        and the scatter-add (memory-bound, the top cost in the CPU profile) disappears. Beyond
        that the extra 2K columns would cost more flops than they save: the subclusters' hard
        statistics are then summed after the pass, in large chunks grouped by bin (z and the
        subnet weights of every local row are kept: 16 bytes per row).
        subclusters=False (the settle steps): the subclusters' statistics are not needed and
        come back None (they are still summed where they share the clusters' matmul).
        Net weights with FitConfig.net_mass "estep" carry the E-step's per-cluster masses
        (_dense_mass_calibration here, the same Sinkhorn steps on the sparse weights in
        _accumulate_truncated); the subclusters follow the net's own best cluster.
        """
        if table is not None or (use_estep and self.truncated):
            return self._accumulate_truncated(use_estep, table if table is not None else self.estep_table(),
                                              subclusters)
        K, d = self.n_clusters, self.n_features
        dense = K <= DENSE_SUBCLUSTER_MAX
        if dense:
            both = SuffStats.zeros((3 * K,), d, device=self.device)
        else:
            stats = SuffStats.zeros((K,), d, device=self.device)
            sub = SuffStats.zeros((2 * K,), d, device=self.device)
            z_all = torch.empty(self.x.shape[0], dtype=torch.int64, device=self.device)
            r_all = torch.empty(self.x.shape[0], 2, dtype=self.dtype, device=self.device)
        subnets = unwrap(self.subnets)  # no DDP collectives in inference (see log_responsibilities)
        subnets.eval()
        rows = stats_chunk_rows(d, 3 * K if dense else K, self.cfg.chunk_size)
        log_c = None if use_estep or self.cfg.net_mass == "net" else self._dense_mass_calibration(rows)
        for sl in iter_chunks(self.x.shape[0], rows):
            xc = self.x[sl]
            log_r = self.log_responsibilities(xc, use_estep)
            z = row_argmax(log_r)  # the net's own best cluster (subclusters), before any calibration
            if log_c is not None:
                log_r = torch.log_softmax(log_r + log_c.to(log_r.dtype), -1)
            if not (dense or subclusters):
                add_weighted_stats_(stats, xc, log_r.exp())
                continue
            r_sub = torch.softmax(subnets(xc.float(), z), -1).to(self.dtype)
            if dense:
                w_sub = torch.zeros(xc.shape[0], 2 * K, dtype=self.dtype, device=self.device)
                w_sub.scatter_(1, torch.stack([2 * z, 2 * z + 1], 1), r_sub)
                add_weighted_stats_(both, xc, torch.cat([log_r.exp(), w_sub], 1))
            else:
                add_weighted_stats_(stats, xc, log_r.exp())
                z_all[sl], r_all[sl] = z, r_sub
        if dense:
            stats, sub = both[:K], both[K:]  # (the subclusters' columns are summed even when unused: same rounding)
        elif not subclusters:
            return stats, None
        else:
            for sl in iter_chunks(self.x.shape[0], chunk_rows(8 * d, self.x.shape[0])):
                for j in (0, 1):
                    add_hard_stats_(sub, self.x[sl], 2 * z_all[sl] + j, r_all[sl, j])
        sub = SuffStats(sub.count.reshape(K, 2), sub.sum.reshape(K, 2, d), sub.scatter.reshape(K, 2, d, d))
        return stats, sub

    def _dense_mass_calibration(self, rows: int) -> torch.Tensor:
        """log c (K,): the net's responsibilities times c_k, renormalised per row, give each
        cluster the E-step's total mass over all rows (FitConfig.net_mass; tr.calibrate_mass;
        a cluster the reweighted net gives no mass gets no update).
        One E-step pass and MASS_CALIBRATION_STEPS net passes over the local rows; masses summed
        over all ranks."""
        def total(fn) -> torch.Tensor:
            out = torch.zeros(self.n_clusters, dtype=STAT_DTYPE, device=self.device)
            for sl in iter_chunks(self.x.shape[0], rows):
                out += fn(self.x[sl]).to(STAT_DTYPE).sum(0)
            return self.comm.all_reduce_sum(out)
        e_mass = total(lambda xc: self.log_responsibilities(xc, True).exp())
        return tr.calibrate_mass(e_mass, lambda lc: total(lambda xc: torch.softmax(
            self.log_responsibilities(xc, False) + lc.to(self.dtype), -1)), MASS_CALIBRATION_STEPS)

    def _sparse_mass_calibration(self, table: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor,
                                 bins: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`_dense_mass_calibration` on the truncated pass's sparse net weights (rows, bins, w):
        the E-step's masses from its candidate table, the net's from the reweighted pairs."""
        K, n = self.n_clusters, self.x.shape[0]
        cand, log_r = table
        ok = cand >= 0
        e_mass = self.comm.all_reduce_sum(torch.bincount(cand[ok], log_r[ok].exp().to(STAT_DTYPE), minlength=K))
        return tr.calibrate_mass(e_mass, lambda lc: self.comm.all_reduce_sum(
            torch.bincount(bins, tr.reweight(rows, bins, w, lc, n), minlength=K)), MASS_CALIBRATION_STEPS)

    @torch.no_grad()
    def _accumulate_truncated(self, use_estep: bool, table: tuple[torch.Tensor, torch.Tensor],
                              subclusters: bool = True) -> tuple[SuffStats, SuffStats | None]:
        """`accumulate` from sparse weights: each row's responsibilities (the truncated E-step's
        over its candidates, or the net's, normalised over all K, on those candidates and on the
        net's best cluster) of at least self.min_weight, renormalised; statistics grouped by
        cluster, subclusters by the row's best cluster (None when not `subclusters`)."""
        K, d, n = self.n_clusters, self.n_features, self.x.shape[0]
        pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        z = torch.empty(n, dtype=torch.long, device=self.device)
        r_sub = torch.empty(n, 2, dtype=self.dtype, device=self.device)
        subnets = unwrap(self.subnets)  # no DDP collectives in inference (see log_responsibilities)
        subnets.eval()
        for sl in iter_chunks(n, chunk_rows(K, self.cfg.chunk_size)):
            if use_estep:
                index, log_r = table[0][sl], table[1][sl]
                rows, bins, w = tr.truncate(index, log_r, self.min_weight)
                z[sl] = index.gather(1, log_r.argmax(1, keepdim=True))[:, 0]
            else:  # the net's responsibilities on the candidates and its best; `truncate` normalises
                # them over those slots, so the logits serve (no log-softmax over all K: 1 s an epoch
                # at 1.28M x 1000)
                logits = self.net_logits(self.x[sl])
                z[sl] = row_argmax(logits)
                rows, bins, w = tr.truncate(*tr.on_candidates(logits, table[0][sl], z[sl]), self.min_weight)
            pairs.append((rows + sl.start, bins, w))
            if subclusters:
                r_sub[sl] = torch.softmax(subnets(self.x[sl].float(), z[sl]), -1).to(self.dtype)
        rows, bins, w = (torch.cat(t) for t in zip(*pairs, strict=True))
        if not use_estep and self.cfg.net_mass == "estep":
            w = tr.reweight(rows, bins, w, self._sparse_mass_calibration(table, rows, bins, w), n)
        self.sparse_weights = int(rows.numel())  # this process's (row, cluster) weights (cost model)
        stats = SuffStats.zeros((K,), d, device=self.device)
        tr.add_sparse_stats_(stats, self.x, rows, bins, w, self.dtype)
        if not subclusters:
            return stats, None
        sub = SuffStats.zeros((K, 2), d, device=self.device)
        tr.add_sub_stats_(sub, self.x, z, r_sub, self.dtype)
        return stats, sub

    def reduce_stats(self, stats: SuffStats) -> SuffStats:
        """One all_reduce of the flattened statistics (identity in one process)."""
        if self.comm.world_size == 1:  # nothing to sum: skip the flatten copy (0.4 GB at K 1000, d 128)
            return stats
        flat = self.comm.all_reduce_sum(stats.flatten())
        return SuffStats.unflatten(flat, tuple(stats.count.shape), stats.n_features)

    def m_step(self, stats: SuffStats, sub_stats: SuffStats | None, clusters: bool, subclusters: bool) -> None:
        """Weighted MAP: NIW mode for means/covariances, Dirichlet posterior for weights."""
        alpha = self.cfg.prior.alpha
        params, sub = self.params, self.sub_params
        if clusters:
            means, chol = map_estimate(self.prior, stats)
            params = GaussianParams(dp_log_weights(stats.count, alpha), means, chol)
        if subclusters:
            means, chol = map_estimate(self.prior, sub_stats)
            sub = GaussianParams(mv.normalize_sub_weights(sub_stats.count, alpha), means, chol)
            # A subcluster that lost (almost) all its points never wins any back under the
            # isotropic subnet loss: restart that cluster's subclusters on its principal axis.
            dead = (sub_stats.count < 1.0).any(-1) & (stats.count >= 2 * self.cfg.moves.min_cluster_size)
            if bool(dead.any()):
                fresh = mv.principal_axis_subclusters(self.prior, stats[dead])
                sub.log_weights[dead], sub.means[dead], sub.chol[dead] = (
                    fresh.log_weights, fresh.means, fresh.chol,
                )
                unwrap(self.subnets).reset_clusters(torch.nonzero(dead.cpu()).flatten(), self.init_gen)
        self.params, self.sub_params = params, sub

    @torch.no_grad()
    def settle(self, steps: int) -> None:
        """EM steps after the last epoch (schedule.settle_steps): E-step-weighted statistics ->
        M-step of the clusters (no moves, no nets). The net-weighted M-step carries float
        differences of the nets' training into the parameters; EM from there reaches the same
        fixed point in every worker layout (BENCHMARKS.md, one process vs 2 workers)."""
        for _ in range(steps):
            table = self.estep_table() if self.truncated else None
            stats, _ = self.accumulate(True, table, subclusters=False)
            self.m_step(self.reduce_stats(stats), None, clusters=True, subclusters=False)

    def cells_per_cluster(self, counts: torch.Tensor) -> list[int]:
        """k-means cells used to propose splits of each cluster: one per 2 (d + 2) points (enough
        for a full covariance), at least 2, at most moves.split_cells. counts: (K,)."""
        per = 2 * (self.n_features + 2)
        return [max(2, min(self.cfg.moves.split_cells, int(c) // per)) for c in counts.tolist()]

    @torch.no_grad()
    def cell_stats(self, n_cells: list[int]) -> SuffStats:
        """Statistics of k-means cells inside every cluster, batch shape (K, max n_cells).

        Rows go to their exact MAP cluster; rank 0 runs k-means (n_cells[k] cells) on its rows of
        cluster k and broadcasts the centroids; every rank bins its rows by the nearest centroid
        of their cluster; one all-reduce. Unused cells stay empty.
        """
        K, d, M = self.n_clusters, self.n_features, max(n_cells)
        z = torch.from_numpy(self.assign()[0]).to(self.device)
        # every row on rank 0, with its key: k-means starts from each cluster's rows of smallest
        # key, so a boundary row that another worker layout puts in another cluster (float
        # rounding) rarely changes a cluster's start (index.kmeans)
        keys = tr.row_hash(self.global_index, self.cfg.seed)
        xs, zs, keys = self._global_rows(torch.ones_like(z, dtype=torch.bool), z, keys)
        centroids = None
        if self.comm.rank == 0:
            centroids = np.full((K, M, d), np.inf, dtype=np.float32)
            zc, keys = zs.cpu().numpy(), keys.cpu().numpy()
            order = np.argsort(zc, kind="stable")  # rows grouped by cluster once, not K scans of all rows
            bounds = np.searchsorted(zc[order], np.arange(K + 1))
            for k in range(K):
                rows = order[bounds[k] : bounds[k + 1]]
                m = min(n_cells[k], rows.size // 2)
                if m >= 2:
                    centroids[k, :m] = faiss_index.kmeans(xs[rows], m, seed=self.cfg.seed + k, keys=keys[rows])
                elif rows.size:
                    centroids[k, 0] = xs[rows].mean(0).float().cpu().numpy()
        centroids = torch.from_numpy(self.comm.broadcast_object(centroids)).to(self.device, self.dtype)
        n = self.x.shape[0]
        bins = torch.empty(n, dtype=torch.long, device=self.device)
        for sl in iter_chunks(n, stats_chunk_rows(d, M, self.cfg.chunk_size)):
            xc, zc = self.x[sl], z[sl]
            dist = (xc[:, None, :] - centroids[zc]).square().sum(-1)  # (n, M); inf for unused cells
            bins[sl] = zc * M + torch.nan_to_num(dist, nan=math.inf).argmin(-1)
        # Summed grouped by cell (truncated.add_sparse_stats_, as the truncated statistics): per
        # chunk of a few thousand rows, K M cells of a few rows each made ~700k tiny matmuls (40 s
        # of a 48 s split step at 1.15M x 128, K 1,074).
        stats = SuffStats.zeros((K * M,), d, device=self.device)
        tr.add_sparse_stats_(stats, self.x, torch.arange(n, device=self.device), bins,
                             torch.ones(n, dtype=STAT_DTYPE, device=self.device))
        stats = self.reduce_stats(stats)
        return SuffStats(stats.count.reshape(K, M), stats.sum.reshape(K, M, d), stats.scatter.reshape(K, M, d, d))

    def split_step(self, sub_stats: SuffStats, stats: SuffStats) -> tuple[int, int]:
        """Split proposals per cluster: the subnets' two subclusters and, with moves.split_cells,
        the best level of the merge tree of its k-means cells (a many-way split); rank 0 decides
        (moves.decide_splits, u from move_gen), every rank applies the decision."""
        m = self.cfg.moves
        cells = tree = None
        if m.split_cells >= 2:
            cells = self.cell_stats(self.cells_per_cluster(stats.count))
            tree = mv.tree_split_proposals(self.prior, self.cfg.prior.alpha, cells)
        decision = None
        if self.comm.rank == 0:
            decision = mv.decide_splits(
                self.prior, self.cfg.prior.alpha, sub_stats, tree, m.min_cluster_size, m.max_clusters, self.move_gen
            )
        decision = self.comm.broadcast_object(decision)
        parts = {
            k: mv.group_cells(cells[k], tree.labels[k], tree.n_parts[k]) if decision.kind(k) == "tree" else sub_stats[k]
            for k in decision.accepted
        }
        if parts:
            self.rebuild_for_k(mv.apply_multi_splits(parts, self.params, self.sub_params, self.prior))
        return len(decision.proposed), len(parts)

    def merge_step(self, stats: SuffStats) -> tuple[int, int]:
        decision = None
        if self.comm.rank == 0:
            if self.n_clusters < 2:
                decision = mv.MergeDecision((), (), ())
            else:
                neighbors = faiss_index.nearest_clusters(self.params.means, self.cfg.moves.merge_neighbors)
                decision = mv.propose_merges(self.prior, self.cfg.prior.alpha, stats, neighbors, self.move_gen)
        decision = self.comm.broadcast_object(decision)
        if decision.accepted:
            absorbed = {j: i for i, j in decision.accepted}
            self.rebuild_for_k(mv.apply_merges(decision, self.params, self.sub_params, self.prior, stats), absorbed)
        return len(decision.proposed), len(decision.accepted)

    @torch.no_grad()
    def delete_step(self) -> tuple[int, int]:
        """Delete proposals for the moves.delete_largest largest clusters of the hard partition:
        each one's rows regrouped by their runner-up cluster (assign_top2; statistics
        all-reduced), rank 0 decides (moves.propose_deletes, u from move_gen), every rank removes
        the accepted clusters; the next E-step gives their rows to the other clusters."""
        K, d = self.n_clusters, self.n_features
        if self.cfg.moves.delete_largest == 0 or K < 2:
            return 0, 0
        z, _, second, _ = self.assign_top2()
        z, second = torch.from_numpy(z).to(self.device), torch.from_numpy(second).to(self.device)
        hard = self.hard_stats(z, K)
        proposed = tuple(sorted(hard.count.topk(min(self.cfg.moves.delete_largest, K)).indices.tolist()))
        slot = torch.full((K,), -1, dtype=torch.long, device=self.device)  # cluster -> its proposal, or -1
        slot[list(proposed)] = torch.arange(len(proposed), device=self.device)
        rows = torch.nonzero(slot[z] >= 0).flatten()
        moved = SuffStats.zeros((len(proposed) * K,), d, device=self.device)
        add_hard_stats_(moved, self.x[rows], slot[z[rows]] * K + second[rows],
                        torch.ones(rows.numel(), dtype=STAT_DTYPE, device=self.device))
        moved = self.reduce_stats(moved)
        moved = SuffStats(moved.count.reshape(-1, K), moved.sum.reshape(-1, K, d), moved.scatter.reshape(-1, K, d, d))
        decision = None
        if self.comm.rank == 0:
            decision = mv.propose_deletes(self.prior, self.cfg.prior.alpha, hard, moved, proposed, self.move_gen)
        decision = self.comm.broadcast_object(decision)
        if decision.accepted:
            self.rebuild_for_k(mv.apply_prunes(mv.PruneDecision(decision.accepted), self.params, self.sub_params))
        return len(decision.proposed), len(decision.accepted)

    def prune_step(self, stats: SuffStats) -> int:
        decision = mv.propose_prunes(stats.count, self.cfg.moves.prune_below)  # same numbers on all ranks
        if decision.removed:
            self.rebuild_for_k(mv.apply_prunes(decision, self.params, self.sub_params))
        return len(decision.removed)

    # ---- the driver -------------------------------------------------------------------------

    def run_epoch(self, plan: EpochPlan) -> EpochRecord:
        t0 = time.perf_counter()
        frozen = plan.epoch <= self.frozen_until
        use_estep = self.cfg.responsibilities == "estep" or frozen or not plan.m_step
        table = self.estep_table() if self.truncated else None
        n_dense = self.n_global * self.n_clusters * (1 + int(use_estep))  # train targets (+ E-step statistics)
        evaluated = int(self.comm.all_reduce_sum(torch.tensor([float((table[0] >= 0).sum())], dtype=STAT_DTYPE,
                                                              device=self.device))) if table is not None else n_dense
        t_estep = time.perf_counter()
        loss_cl, loss_sub = self.train_nets(plan, use_estep, table)
        t1 = time.perf_counter()
        stats, sub_stats = self.accumulate(use_estep, table)
        t2 = time.perf_counter()
        stats, sub_stats = self.reduce_stats(stats), self.reduce_stats(sub_stats)
        self.last_stats = (stats, sub_stats)  # the epoch's global statistics, for callbacks
        t3 = time.perf_counter()
        self.m_step(stats, sub_stats, clusters=plan.m_step and not frozen, subclusters=plan.train_subnets)
        log_ml = float(log_marginal_likelihood(self.prior, stats).sum())
        counts = stats.count.clamp_min(0)
        p = counts / counts.sum().clamp_min(1e-30)
        entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
        t4 = time.perf_counter()
        sp = sa = mp = ma = pr = dp = da = 0
        if plan.m_step and not frozen and plan.move is None:
            pr = self.prune_step(stats)
        if plan.move == "split" and not frozen:
            sp, sa = self.split_step(sub_stats, stats)
        elif plan.move == "merge" and not frozen:
            mp, ma = self.merge_step(stats)
            dp, da = self.delete_step()
        if sa or ma or da:
            self.frozen_until = plan.epoch + self.cfg.schedule.freeze_epochs
        t5 = time.perf_counter()
        self.epoch = plan.epoch + 1
        return EpochRecord(
            epoch=plan.epoch, n_clusters=self.n_clusters, loss_cluster=loss_cl, loss_sub=loss_sub,
            log_marginal=log_ml, size_entropy=entropy, splits_proposed=sp, splits_accepted=sa,
            merges_proposed=mp, merges_accepted=ma, pruned=pr, frozen=frozen,
            time_total=t5 - t0, time_train=t1 - t0, time_stats=t2 - t1, time_reduce=t3 - t2,
            time_mstep=t4 - t3, time_moves=t5 - t4, time_estep=t_estep - t0, log_densities=evaluated,
            truncated=table is not None, deletes_proposed=dp, deletes_accepted=da,
        )

    # ---- outputs ---------------------------------------------------------------------------

    @torch.no_grad()
    def assign(self, x: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact MAP assignment argmax_k log pi_k + log N(x; mu_k, Sigma_k) of local rows
        (or of centred rows x). Returns (cluster (n,) int64, log_prob (n,) float64)."""
        cluster, best, _, _ = self.assign_top2(x)
        return cluster, best

    @torch.no_grad()
    def assign_top2(self, x: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`assign` plus each row's runner-up cluster (n,) int64 (itself when K = 1) and its
        margin (n,) float64 (best log-joint minus the runner-up's; +inf without a runner-up),
        from the same pass: which clusters border each other (cluster_tree) and how clearly
        each row belongs where it was put (the run's assignments)."""
        if self.truncated:  # each row's candidates, scored in float64
            cand, values = self.score_candidates(x, STAT_DTYPE)
            top = values.topk(min(2, cand.shape[1]), dim=1)
            ids = cand.gather(1, top.indices)
            has_second = torch.isfinite(top.values[:, -1]) & (top.values.shape[1] > 1)
            second = torch.where(has_second, ids[:, -1], ids[:, 0])
            margin = torch.where(has_second, top.values[:, 0] - top.values[:, -1], math.inf)
            return (ids[:, 0].cpu().numpy(), top.values[:, 0].cpu().numpy(), second.cpu().numpy(),
                    margin.cpu().numpy())
        x = self.x if x is None else x
        n, K = x.shape[0], self.n_clusters
        cluster = torch.empty(n, dtype=torch.int64, device=self.device)
        second = torch.empty(n, dtype=torch.int64, device=self.device)
        best = torch.empty(n, dtype=STAT_DTYPE, device=self.device)
        margin = torch.full((n,), math.inf, dtype=STAT_DTYPE, device=self.device)
        # chunk by chunk: never the whole (n, K) float64 matrix (10 GB at 1.28M rows and K 1000)
        for sl in iter_chunks(n, chunk_rows(K * self.n_features, self.cfg.chunk_size)):
            top = log_joint(x[sl], self.params, STAT_DTYPE, self.cfg.chunk_size).topk(min(2, K), dim=-1)
            cluster[sl], best[sl], second[sl] = top.indices[:, 0], top.values[:, 0], top.indices[:, -1]
            if K > 1:
                margin[sl] = top.values[:, 0] - top.values[:, 1]
        return cluster.cpu().numpy(), best.cpu().numpy(), second.cpu().numpy(), margin.cpu().numpy()

    @torch.no_grad()
    def cluster_tree(self, clusters: np.ndarray, runner_up: np.ndarray | None = None) -> MergeTree:
        """Merge hierarchy over the fitted clusters: hard statistics of the local rows' clusters
        (n_local,) (all-reduced, so every rank calls this), merged greedily by log H_m down to
        one cluster (hierarchy.merge_tree). With the rows' runner-up clusters (assign_top2), only
        clusters that border each other (some row of one has the other as runner-up, counted
        over all ranks) merge while any such pair is left; the number of such rows is the
        border's strength (each cluster is scored against its strongest borders first)."""
        K = self.n_clusters
        z = torch.from_numpy(np.asarray(clusters, dtype=np.int64)).to(self.device)
        adjacency = None
        if runner_up is not None:
            second = torch.from_numpy(np.asarray(runner_up, dtype=np.int64)).to(self.device)
            counts = torch.zeros(K * K, dtype=STAT_DTYPE, device=self.device)
            counts.index_add_(0, z * K + second, torch.ones(z.shape[0], dtype=STAT_DTYPE, device=self.device))
            counts = self.comm.all_reduce_sum(counts).reshape(K, K)
            adjacency = counts + counts.T
        return merge_tree(self.prior, self.cfg.prior.alpha, self.hard_stats(z, K), adjacency=adjacency)

    def _restore_candidates(self, saved: dict | None) -> torch.Tensor | None:
        """The saved candidate table's rows that this process holds (by global index); rows
        that were not saved (another rank's) start from the nearest means at the next scoring."""
        if saved is None:
            return None
        gi, best = saved["global_index"].to(self.device), saved["best"].to(self.device)
        inside = gi < self.n_global
        loc = torch.full_like(gi, -1)
        loc[inside] = self.g2l[gi[inside]]
        if bool((loc < 0).any()) or gi.shape[0] != self.x.shape[0]:
            return None  # saved by another layout of rows: rebuild every row's candidates
        out = torch.empty_like(best)
        out[loc] = best
        return out

    def export_params(self) -> GaussianParams:
        """Mixture parameters in the original (uncentred) coordinates."""
        return GaussianParams(
            self.params.log_weights.clone(), self.params.means + self.shift, self.params.chol.clone()
        )

    # ---- checkpoints: named state -----------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "frozen_until": self.frozen_until,
            "convergence": self.convergence.state(),
            "prior_psi": self.prior.psi.cpu(),  # data-dependent in psi_mode "pooled"
            "prior_nu": self.prior.nu,  # data-dependent in nu_mode "evidence"
            "prior_kappa": self.prior.kappa,  # data-dependent in kappa_mode "evidence"
            "prior_family": self.prior.family,  # data-dependent in covariance "auto"
            "data_var": self.data_var.cpu(),  # psi is rescaled when loaded onto other data
            "params": {k: v.cpu() for k, v in asdict_params(self.params).items()},
            "sub_params": {k: v.cpu() for k, v in asdict_params(self.sub_params).items()},
            "cluster_net": unwrap(self.cluster_net).state_dict(),
            "subnets": unwrap(self.subnets).state_dict(),
            "opt": self.opt.state_dict(),
            "sub_opt": self.sub_opt.state_dict(),
            # this process's rows' candidate clusters, by global row index (core/truncated)
            "candidates": None if self.best is None else {"global_index": self.global_index.cpu(),
                                                           "best": self.best.cpu()},
            "rng": {
                "move": self.move_gen.get_state(),
                "batch": self.batch_gen.get_state(),
                "init": self.init_gen.get_state(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"checkpoint schema {state.get('schema_version')} != {SCHEMA_VERSION}")
        self.epoch = int(state["epoch"])
        self.frozen_until = int(state["frozen_until"])
        self.convergence = Convergence.from_state(
            self.cfg.schedule, self.n_global, self.n_features, state.get("convergence")
        )
        if "prior_psi" in state or self.prior is None:
            psi = state["prior_psi"].to(self.device, STAT_DTYPE)
            old_var = state.get("data_var")
            if old_var is not None and not torch.allclose(old_var.to(self.device), self.data_var, rtol=1e-6):
                # the state on re-encoded data (autoencoder rounds): psi's shape belongs to the
                # old coordinates; keep only its scale, relative to the data's variance
                ratio = float(self.data_var.mean() / old_var.to(self.device).mean().clamp_min(1e-30))
                scale = float(psi.diagonal().mean()) * ratio
                psi = scale * torch.eye(self.n_features, dtype=STAT_DTYPE, device=self.device)
            self.prior = NIWPrior(float(state["prior_kappa"]), float(state["prior_nu"]), torch.zeros_like(self.shift),
                                  psi, str(state["prior_family"]))
        self.params = GaussianParams(**{k: v.to(self.device) for k, v in state["params"].items()})
        self.sub_params = GaussianParams(**{k: v.to(self.device) for k, v in state["sub_params"].items()})
        K = self.params.n_clusters
        net = ClusterNet(self.n_features, K, self.cfg.net.cluster_hidden, self.input_scale)
        net.load_state_dict(state["cluster_net"])
        subnets = SubclusterNets(self.n_features, K, self.cfg.net.sub_hidden, self.input_scale)
        subnets.load_state_dict(state["subnets"])
        self._install_nets(net.to(self.device), subnets.to(self.device))
        self.opt.load_state_dict(state["opt"])
        self.sub_opt.load_state_dict(state["sub_opt"])
        self.best = self._restore_candidates(state.get("candidates"))
        self.move_gen.set_state(state["rng"]["move"])
        self.batch_gen.set_state(state["rng"]["batch"])
        self.init_gen.set_state(state["rng"]["init"])


def asdict_params(p: GaussianParams) -> dict[str, torch.Tensor]:
    return {"log_weights": p.log_weights, "means": p.means, "chol": p.chol}


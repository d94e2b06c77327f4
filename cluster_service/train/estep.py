"""The E-step behind one interface: what the engine asks of the responsibilities of a parameter set.

    estep.score(params, epoch) -> Scores              the E-step of one parameter set
        scores.targets(loc, xb)                         the clustering net's targets for a mini-batch
        scores.statistics(net, subnets, use_estep, ..)  weighted statistics of clusters and subclusters
        scores.log_densities(use_estep)                 (row, cluster) densities it evaluates, all ranks
    estep.assign_top2(params, epoch)                  exact MAP and runner-up cluster of every local row
    estep.remap(source, absorbed, n_old)              the change-of-K event
    estep.reset() / state_dict() / load_state_dict()  a new partition; its checkpoint state
    estep.scorer(params, dtype)                       a parameter set's Gaussians, built once: every density

`DenseEStep` scores every row against all K clusters. `TruncatedEStep` scores each row's candidate
set (core/truncated) and keeps each row's best clusters between parameter sets; below 2 x
`candidates` clusters one dense matmul per chunk is cheaper, and it is the dense E-step. The
engine talks only to this interface (the model: FAISS contrib/clustering.py, DatasetAssign).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cluster_service import index as faiss_index
from cluster_service.config import FitConfig
from cluster_service.core import truncated as tr
from cluster_service.core.gaussian import (
    WhitenedGaussians,
    add_grouped_stats_,
    add_hard_stats_,
    add_weighted_stats_,
    chunk_rows,
    iter_chunks,
    row_argmax,
    stats_chunk_rows,
)
from cluster_service.core.nets import candidate_logits
from cluster_service.core.niw import STAT_DTYPE, GaussianParams, SuffStats
from cluster_service.train.rows import Rows

# Up to this many clusters, cluster and subcluster statistics share one matmul (DenseScores.statistics).
DENSE_SUBCLUSTER_MAX = 256
# Sinkhorn steps that hold the net's per-cluster mass to the E-step's (FitConfig.net_mass).
MASS_CALIBRATION_STEPS = 10

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Top2 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def net_log_responsibilities(net: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log r_ik of the clustering net (un-wrapped: a DDP forward is a collective) for rows x (n, d) -> (n, K)."""
    net.eval()
    return torch.log_softmax(net(x.float()).to(dtype), -1)


# ---- the nets' targets for a mini-batch ------------------------------------------------------------


@dataclass(frozen=True)
class DenseTargets:
    """log r^E (b, K) over all clusters."""

    log_r: torch.Tensor

    def loss(self, logits: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """Per-row loss (b,) of the net's logits (b, K) against the targets."""
        return loss_fn(logits, self.log_r)

    def best(self) -> torch.Tensor:
        """Each row's E-step cluster (b,) int64."""
        return self.log_r.argmax(-1)


@dataclass(frozen=True)
class CandidateTargets:
    """log r^E (b, C) over each row's candidates index (b, C) (-1 / -inf at empty slots), 0 on
    the rest; the rest is held to 0 where the row's tail is (truncated.tail_held)."""

    log_r: torch.Tensor
    index: torch.Tensor
    tail_from: int

    def loss(self, logits: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        rest_target = torch.nn.functional.pad(self.log_r, (0, 1), value=-math.inf)
        return loss_fn(candidate_logits(logits, self.index, tr.tail_held(self.log_r, self.tail_from)), rest_target)

    def best(self) -> torch.Tensor:
        return self.index.gather(1, self.log_r.argmax(-1)[:, None])[:, 0]


# ---- the dense E-step ---------------------------------------------------------------------------------


class DenseEStep:
    """Every local row scored against all K clusters (2 n K d^2 flops a pass)."""

    def __init__(self, cfg: FitConfig, rows: Rows, dtype: torch.dtype):
        self.rows, self.dtype = rows, dtype
        self.chunk_size, self.net_mass = cfg.chunk_size, cfg.net_mass
        # what is derived once per parameter set (params are replaced, never mutated, by every
        # M-step and move): its whitened Gaussians by dtype; the truncated E-step's graph and nearest means
        self._derived: tuple[GaussianParams | None, dict] = (None, {})

    def _cached(self, params: GaussianParams, key, make):
        """make() once per parameter set."""
        if self._derived[0] is not params:
            self._derived = (params, {})
        if key not in self._derived[1]:
            self._derived[1][key] = make()
        return self._derived[1][key]

    def scorer(self, params: GaussianParams, dtype: torch.dtype) -> WhitenedGaussians:
        """params' whitened Gaussians in dtype (once per parameter set): every density of the E-step."""
        return self._cached(params, dtype, lambda: WhitenedGaussians(params, dtype))

    def log_responsibilities(self, params: GaussianParams, x: torch.Tensor) -> torch.Tensor:
        """log r^E_ik = log pi_k + log N(x_i; mu_k, Sigma_k) normalised over k, for centred rows
        x (n, d) -> (n, K) in the compute dtype."""
        return torch.log_softmax(self.scorer(params, self.dtype).log_joint(x, self.chunk_size), -1)

    def truncates(self, n_clusters: int) -> bool:
        """Whether this E-step scores candidate sets instead of all n_clusters."""
        return False

    def score(self, params: GaussianParams, epoch: int) -> DenseScores:
        """The E-step of params (the engine's epoch salts a truncated E-step's random candidates)."""
        return self.dense(params)

    def dense(self, params: GaussianParams) -> DenseScores:
        """The dense E-step of params, whatever this E-step's kind."""
        return DenseScores(self, params)

    @torch.no_grad()
    def assign_top2(self, params: GaussianParams, epoch: int) -> Top2:
        """Exact MAP assignment argmax_k log pi_k + log N(x; mu_k, Sigma_k) of the local rows, its
        log-joint, and each row's runner-up cluster (itself when K = 1) with its margin (best
        log-joint minus the runner-up's; +inf without one). float64. -> four (n,) arrays."""
        x, K, g = self.rows.x, params.n_clusters, self.scorer(params, STAT_DTYPE)
        n, dev = x.shape[0], x.device
        cluster = torch.empty(n, dtype=torch.int64, device=dev)
        second = torch.empty(n, dtype=torch.int64, device=dev)
        best = torch.empty(n, dtype=STAT_DTYPE, device=dev)
        margin = torch.full((n,), math.inf, dtype=STAT_DTYPE, device=dev)
        # chunk by chunk: never the whole (n, K) float64 matrix
        for sl in iter_chunks(n, chunk_rows(K * x.shape[1], self.chunk_size)):
            top = g.log_joint(x[sl], self.chunk_size).topk(min(2, K), dim=-1)
            cluster[sl], best[sl], second[sl] = top.indices[:, 0], top.values[:, 0], top.indices[:, -1]
            if K > 1:
                margin[sl] = top.values[:, 0] - top.values[:, 1]
        return cluster.cpu().numpy(), best.cpu().numpy(), second.cpu().numpy(), margin.cpu().numpy()

    def remap(self, source: torch.Tensor, absorbed: dict[int, int], n_old: int) -> None:
        """K changed: new cluster i came from old cluster source[i] (K_new,); merged-away old j
        went to old i (absorbed). The dense E-step keeps no per-cluster state."""

    def reset(self) -> None:
        """A new partition (no relation to the last parameters' clusters)."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, saved: dict | None) -> None:
        pass


class DenseScores:
    """The dense E-step of one parameter set; responsibilities are computed where they are used."""

    truncated = False

    def __init__(self, estep: DenseEStep, params: GaussianParams):
        self.estep, self.params = estep, params

    def targets(self, loc: torch.Tensor, xb: torch.Tensor) -> DenseTargets:
        """The net's targets for the local rows loc (b,) whose float32 values are xb (b, d)."""
        return DenseTargets(torch.log_softmax(self.estep.scorer(self.params, torch.float32).log_joint(xb), dim=-1))

    def log_densities(self, use_estep: bool) -> int:
        """(row, cluster) log-densities of an epoch on these scores, all ranks: the nets'
        targets (and the statistics' weights when they are the E-step's)."""
        return self.estep.rows.n_global * self.params.n_clusters * (1 + int(use_estep))

    def _log_r(self, x: torch.Tensor, use_estep: bool, net: torch.nn.Module) -> torch.Tensor:
        e = self.estep
        if use_estep:
            return e.log_responsibilities(self.params, x)
        return net_log_responsibilities(net, x, e.dtype)

    @torch.no_grad()
    def statistics(self, net: torch.nn.Module, subnets: torch.nn.Module, use_estep: bool,
                   subclusters: bool = True) -> tuple[SuffStats, SuffStats | None]:
        """Local statistics: clusters weighted by r_ik (the E-step's, or the net's, un-wrapped);
        subclusters (bin 2k+j) by the hard z_i = k of the same responsibilities times the
        subnets' r~_ij. Returns batch shapes (K,) and (K, 2) (None when not `subclusters`).

        Up to DENSE_SUBCLUSTER_MAX clusters both come from one matmul [r | w~]^T (x ⊗ x) with the
        subcluster weights as a dense (n, 2K) matrix (no scatter-add); beyond, the extra 2K
        columns would cost more flops than they save, and the subclusters' statistics are summed
        after the pass grouped by bin. With FitConfig.net_mass "estep" the net's weights carry
        the E-step's per-cluster masses (_mass_calibration); the subclusters follow the net's
        own best cluster."""
        e = self.estep
        x, dev, dtype = e.rows.x, e.rows.device, e.dtype
        K, d = self.params.n_clusters, x.shape[1]
        dense = K <= DENSE_SUBCLUSTER_MAX
        if dense:
            both = SuffStats.zeros((3 * K,), d, device=dev)
        else:
            stats = SuffStats.zeros((K,), d, device=dev)
            sub = SuffStats.zeros((2 * K,), d, device=dev)
            z_all = torch.empty(x.shape[0], dtype=torch.int64, device=dev)
            r_all = torch.empty(x.shape[0], 2, dtype=dtype, device=dev)
        subnets.eval()
        rows = stats_chunk_rows(d, 3 * K if dense else K, e.chunk_size)
        log_c = None if use_estep or e.net_mass == "net" else self._mass_calibration(rows, net)
        for sl in iter_chunks(x.shape[0], rows):
            xc = x[sl].to(dtype)  # rows stored compact (FitConfig.row_dtype) are upcast here
            log_r = self._log_r(xc, use_estep, net)
            z = row_argmax(log_r)  # the best cluster (subclusters), before any calibration
            if log_c is not None:
                log_r = torch.log_softmax(log_r + log_c.to(log_r.dtype), -1)
            if not (dense or subclusters):
                add_weighted_stats_(stats, xc, log_r.exp())
                continue
            r_sub = torch.softmax(subnets(xc.float(), z), -1).to(dtype)
            if dense:
                w_sub = torch.zeros(xc.shape[0], 2 * K, dtype=dtype, device=dev)
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
            for sl in iter_chunks(x.shape[0], chunk_rows(8 * d, x.shape[0])):
                for j in (0, 1):
                    add_hard_stats_(sub, x[sl], 2 * z_all[sl] + j, r_all[sl, j])
        sub = SuffStats(sub.count.reshape(K, 2), sub.sum.reshape(K, 2, d), sub.scatter.reshape(K, 2, d, d))
        return stats, sub

    def _mass_calibration(self, rows: int, net: torch.nn.Module) -> torch.Tensor:
        """log c (K,): the net's responsibilities times c_k, renormalised per row, give each
        cluster the E-step's total mass over all rows (tr.calibrate_mass). One E-step pass and
        MASS_CALIBRATION_STEPS net passes over the local rows; masses summed over all ranks."""
        e = self.estep
        x = e.rows.x

        def total(fn) -> torch.Tensor:
            out = torch.zeros(self.params.n_clusters, dtype=STAT_DTYPE, device=x.device)
            for sl in iter_chunks(x.shape[0], rows):
                out += fn(x[sl]).to(STAT_DTYPE).sum(0)
            return e.rows.comm.all_reduce_sum(out)
        e_mass = total(lambda xc: self._log_r(xc, True, net).exp())
        return tr.calibrate_mass(e_mass, lambda lc: total(lambda xc: torch.softmax(
            self._log_r(xc, False, net) + lc.to(e.dtype), -1)), MASS_CALIBRATION_STEPS)


# ---- the truncated E-step -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateTable:
    """The truncated E-step of the local rows: each row's candidate clusters index (n, C) int64
    (-1 = empty slot) and its log-responsibilities log_r (n, C) normalised over them (-inf at
    empty slots)."""

    index: torch.Tensor
    log_r: torch.Tensor

    def __getitem__(self, rows) -> CandidateTable:
        return CandidateTable(self.index[rows], self.log_r[rows])


class TruncatedEStep(DenseEStep):
    """Each row scored against its candidate set (truncated.build_candidates): its best clusters
    of the last scoring (`best`, kept here between parameter sets), its nearest means, the
    cluster graph's neighbours of its best cluster and one pseudo-random cluster. Dense below
    2 x `candidates` clusters."""

    def __init__(self, cfg: FitConfig, rows: Rows, dtype: torch.dtype):
        super().__init__(cfg, rows, dtype)
        self.n_candidates, self.seed = cfg.candidates, cfg.seed
        # the nets hold a row's mass off its candidates to 0 where its candidates past the best half hold almost none
        self.tail_from = cfg.candidates // 2
        self.min_weight = tr.MIN_WEIGHT  # the statistics leave out smaller responsibilities
        # each local row's best clusters of the last scoring, best first, (n_local, B) int64,
        # -1 = none; None until the first scoring (then the FAISS-nearest means)
        self.best: torch.Tensor | None = None

    def truncates(self, n_clusters: int) -> bool:
        """Candidates pay once K > 2 x candidates (below, one dense matmul per chunk is cheaper
        than the per-cluster gathers)."""
        return n_clusters > 2 * self.n_candidates

    def score(self, params: GaussianParams, epoch: int) -> DenseScores | CandidateScores:
        return self.candidates(params, epoch) if self.truncates(params.n_clusters) else self.dense(params)

    @torch.no_grad()
    def candidates(self, params: GaussianParams, epoch: int) -> CandidateScores:
        """The truncated E-step of params, whatever K; keeps each row's best clusters for the next scoring."""
        cand, log_joint_c = self.score_candidates(params, epoch)
        order = log_joint_c.topk(min(tr.N_KEEP, cand.shape[1]), dim=1)
        self.best = cand.gather(1, order.indices).masked_fill(~torch.isfinite(order.values), -1)
        table = CandidateTable(cand, log_joint_c - torch.logsumexp(log_joint_c, dim=1, keepdim=True))
        return CandidateScores(self, params, table)

    def cluster_graph(self, params: GaussianParams) -> torch.Tensor:
        return self._cached(params, "graph", lambda: tr.cluster_graph(self.scorer(params, self.dtype), params.means,
                                                                       self.n_candidates))

    @torch.no_grad()
    def score_candidates(self, params: GaussianParams, epoch: int, dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local rows' candidate table (n, C) int64 (-1 = empty) and its log pi_k +
        log N(x; mu_k, Sigma_k) (n, C) (-inf at empty slots) in dtype (default: the compute dtype)."""
        x = self.rows.x
        first = self.best is None or self.best.shape[0] != x.shape[0]
        # only a first scoring searches N_KEEP more nearest means (FAISS's top-k heap grows with k)
        width = tr.N_KEEP + tr.N_NEAR if first else tr.N_NEAR
        nearest = self._cached(params, ("nearest", width), lambda: torch.from_numpy(
            faiss_index.nearest_k(x, params.means, width)).to(x.device))
        if first:  # the nearest means stand in for the best clusters; the next N_NEAR fill the nearest-means slots
            self.best, nearest = nearest[:, : tr.N_KEEP].clone(), nearest[:, tr.N_KEEP :]
        salt = self.seed * 1_000_003 + epoch
        rand = tr.pseudo_random_clusters(self.rows.global_index, salt, params.n_clusters)
        cand = tr.build_candidates(self.best, self.cluster_graph(params), rand, self.n_candidates, nearest)
        return cand, self.scorer(params, dtype or self.dtype).score_pairs(x, cand)

    @torch.no_grad()
    def assign_top2(self, params: GaussianParams, epoch: int) -> Top2:
        """`DenseEStep.assign_top2` over each row's candidates, scored in float64."""
        if not self.truncates(params.n_clusters):
            return super().assign_top2(params, epoch)
        cand, values = self.score_candidates(params, epoch, STAT_DTYPE)
        top = values.topk(min(2, cand.shape[1]), dim=1)
        ids = cand.gather(1, top.indices)
        has_second = torch.isfinite(top.values[:, -1]) & (top.values.shape[1] > 1)
        second = torch.where(has_second, ids[:, -1], ids[:, 0])
        margin = torch.where(has_second, top.values[:, 0] - top.values[:, -1], math.inf)
        return ids[:, 0].cpu().numpy(), top.values[:, 0].cpu().numpy(), second.cpu().numpy(), margin.cpu().numpy()

    def remap(self, source: torch.Tensor, absorbed: dict[int, int], n_old: int) -> None:
        """A row's best clusters map to their new indices: a split cluster to all its parts, a
        merged-away cluster j to its survivor (absorbed: old j -> old i), a removed one to nothing."""
        if self.best is None:
            return
        children: list[list[int]] = [[] for _ in range(n_old)]
        for new, old in enumerate(source.tolist()):
            children[old].append(new)
        for j, i in absorbed.items():
            children[j] = children[i]
        best = tr.remap_best(self.best, children)
        self.best = best.gather(1, torch.argsort((best < 0).to(torch.int8), dim=1, stable=True))

    def reset(self) -> None:
        self.best = None  # the next scoring starts from the nearest means

    def state_dict(self) -> dict | None:
        """This process's rows' best clusters, by global row index."""
        if self.best is None:
            return None
        return {"global_index": self.rows.global_index.cpu(), "best": self.best.cpu()}

    def load_state_dict(self, saved: dict | None) -> None:
        """The saved rows' best clusters; saved by another layout of rows (or none saved): every
        row starts from the nearest means at the next scoring."""
        loc = None if saved is None else self.rows.local_positions(saved["global_index"])
        if loc is None:
            self.best = None
            return
        best = saved["best"].to(self.rows.device)
        self.best = torch.empty_like(best)
        self.best[loc] = best


class CandidateScores:
    """The truncated E-step of one parameter set: its candidate table."""

    truncated = True

    def __init__(self, estep: TruncatedEStep, params: GaussianParams, table: CandidateTable):
        self.estep, self.params, self.table = estep, params, table

    def targets(self, loc: torch.Tensor, xb: torch.Tensor) -> CandidateTargets:
        part = self.table[loc]
        return CandidateTargets(part.log_r.float(), part.index, self.estep.tail_from)

    def log_densities(self, use_estep: bool) -> int:
        e = self.estep
        valid = torch.tensor([float((self.table.index >= 0).sum())], dtype=STAT_DTYPE, device=e.rows.device)
        return int(e.rows.comm.all_reduce_sum(valid))

    @torch.no_grad()
    def statistics(self, net: torch.nn.Module, subnets: torch.nn.Module, use_estep: bool,
                   subclusters: bool = True) -> tuple[SuffStats, SuffStats | None]:
        """`DenseScores.statistics` from sparse weights: each row's responsibilities (the E-step's
        over its candidates, or the net's, normalised over all K, on those candidates and on the
        net's best cluster) of at least estep.min_weight, renormalised; statistics grouped by
        cluster, subclusters by the row's best cluster."""
        e, table = self.estep, self.table
        x, dev, dtype = e.rows.x, e.rows.device, e.dtype
        K, d, n = self.params.n_clusters, x.shape[1], x.shape[0]
        pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        z = torch.empty(n, dtype=torch.long, device=dev)
        r_sub = torch.empty(n, 2, dtype=dtype, device=dev)
        subnets.eval()
        for sl in iter_chunks(n, chunk_rows(K, e.chunk_size)):
            if use_estep:
                index, log_r = table.index[sl], table.log_r[sl]
                rows, bins, w = tr.truncate(index, log_r, e.min_weight)
                z[sl] = index.gather(1, log_r.argmax(1, keepdim=True))[:, 0]
            else:  # the net's logits on the candidates and its best; `truncate` normalises them over those slots
                net.eval()
                logits = net(x[sl].float()).to(dtype)
                z[sl] = row_argmax(logits)
                rows, bins, w = tr.truncate(*tr.on_candidates(logits, table.index[sl], z[sl]), e.min_weight)
            pairs.append((rows + sl.start, bins, w))
            if subclusters:
                r_sub[sl] = torch.softmax(subnets(x[sl].float(), z[sl]), -1).to(dtype)
        rows, bins, w = (torch.cat(t) for t in zip(*pairs, strict=True))
        if not use_estep and e.net_mass == "estep":
            w = tr.reweight(rows, bins, w, self._mass_calibration(rows, bins, w), n)
        stats = SuffStats.zeros((K,), d, device=dev)
        add_grouped_stats_(stats, x, rows, bins, w, dtype)
        if not subclusters:
            return stats, None
        sub = SuffStats.zeros((K, 2), d, device=dev)
        add_grouped_stats_(sub, x, torch.arange(n, device=dev), z, r_sub, dtype)
        return stats, sub

    def _mass_calibration(self, rows: torch.Tensor, bins: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`DenseScores._mass_calibration` on the sparse net weights (rows, bins, w): the E-step's
        masses from the candidate table, the net's from the reweighted pairs."""
        comm, K, n = self.estep.rows.comm, self.params.n_clusters, self.estep.rows.x.shape[0]
        ok = self.table.index >= 0
        e_mass = comm.all_reduce_sum(torch.bincount(self.table.index[ok], self.table.log_r[ok].exp().to(STAT_DTYPE),
                                                    minlength=K))
        return tr.calibrate_mass(e_mass, lambda lc: comm.all_reduce_sum(
            torch.bincount(bins, tr.reweight(rows, bins, w, lc, n), minlength=K)), MASS_CALIBRATION_STEPS)


Scores = DenseScores | CandidateScores


def make_estep(cfg: FitConfig, rows: Rows, dtype: torch.dtype) -> DenseEStep:
    """The E-step of cfg: truncated with `candidates` > 0, else dense."""
    return TruncatedEStep(cfg, rows, dtype) if cfg.candidates > 0 else DenseEStep(cfg, rows, dtype)

"""The DeepDPM epoch loop: named steps, one driver, a reducer injected once.

    run_epoch:  E-step (train.estep) -> train_nets -> statistics -> reduce -> m_step
                -> prune | split | merge (decide on rank 0, broadcast, apply: train.move_steps)

The same `Engine` runs in one process (`LocalComm`) and in every Ray Train worker
(`TorchDistComm`): each process holds only its own rows (train.rows); statistics are summed with
one all-reduce per epoch; rank 0's move decisions are broadcast. Mini-batches are drawn from one
global permutation shared by all ranks (train.shuffle; each rank trains on its members of the global batch
and gradients are summed), so N workers follow the single-process run up to float rounding.
The E-step is one object behind one interface (dense, or truncated to candidate sets); the
start (k-means, evidence grid, prior) is train.start.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cluster_service.config import SCHEMA_VERSION, FitConfig
from cluster_service.core import moves as mv
from cluster_service.core.device import peak_memory, resolve_device
from cluster_service.core.gaussian import row_argmax
from cluster_service.core.nets import (
    ClusterNet,
    SubclusterNets,
    ajs_loss,
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
    dp_log_weights,
    log_marginal_likelihood,
    map_estimate,
)
from cluster_service.core.schedule import Convergence, EpochPlan
from cluster_service.train import move_steps, start
from cluster_service.train.comm import LocalComm, unwrap
from cluster_service.train.estep import Scores, make_estep, net_log_responsibilities
from cluster_service.train.rows import Rows
from cluster_service.train.shuffle import epoch_order, global_batch

# The subnets take one optimizer step per this many rows per subnet (see train_nets).
SUB_ROWS_PER_NET = 8


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
    comm_bytes: int = 0  # this rank's bytes through collectives (train.comm), DDP gradients aside
    grad_bytes: int = 0  # this rank's bytes of the nets' DDP gradient all-reduce (per step: fixed)
    peak_memory: int = 0  # this rank's peak resident bytes so far
    peak_device_memory: int = 0  # its peak bytes allocated on the GPU so far (0 on CPU)

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
        # cfg.row_dtype (float32, or half that in bfloat16 / float16), upcast chunk by chunk.
        # Statistics, the M-step, move decisions and the final MAP assignment are float64.
        self.dtype = torch.float32
        self.rows, self.shift, self.data_var = Rows.centred(x, global_index, n_global, self.comm, self.device,
                                                            getattr(torch, cfg.row_dtype))
        self.x, self.n_global, self.n_features = self.rows.x, self.rows.n_global, self.rows.n_features
        self.estep = make_estep(cfg, self.rows, self.dtype)
        # In psi_mode "pooled" the prior's scale comes from the over-clustered start, so it is
        # set by initialize() (or restored by load_state_dict).
        self.prior: NIWPrior = start.data_prior(cfg.prior, self.data_var) if cfg.prior.psi_mode != "pooled" else None
        self.input_scale = float(self.data_var.mean().clamp_min(1e-30).sqrt())

        self.move_gen = torch.Generator().manual_seed(cfg.seed)  # used by rank 0's decisions only
        self.batch_gen = torch.Generator().manual_seed(cfg.seed + 1)  # identical on every rank
        self.init_gen = torch.Generator().manual_seed(cfg.seed + 2)  # net (re)initialisation
        self.epoch = 0
        self.frozen_until = -1
        self.convergence = Convergence(cfg.schedule, self.n_global, self.n_features)  # early stop (fit.run_schedule)
        self.last_stats: tuple[SuffStats, SuffStats] | None = None  # set by run_epoch
        self.params: GaussianParams
        self.sub_params: GaussianParams
        self.cluster_net: torch.nn.Module
        self.subnets: torch.nn.Module

    @property
    def n_clusters(self) -> int:
        return self.params.n_clusters

    # ---- the start and the change of K -----------------------------------------------------

    def initialize(self) -> None:
        """Starting partition and prior (train.start) -> MAP params, fresh nets."""
        stats, self.prior = start.starting_partition(self.cfg, self.rows, self.data_var, self.prior)
        self._start_from_stats(stats)
        keep = mv.propose_prunes(stats.count, 0.5)  # k-means duplicates on tiny data
        if keep.removed:
            self.rebuild_for_k(mv.apply_prunes(keep, self.params, self.sub_params))

    def initialize_from(self, means: np.ndarray, chol: np.ndarray, prior: dict) -> None:
        """Continue from a fitted model (`cluster-service update`): its prior (dict: kappa, nu, psi,
        family) and clusters (means (K, d), chol (K, d, d), original coordinates) assign this engine's
        rows; clusters without a row are dropped; MAP parameters, weights and subclusters come from
        those rows; fresh nets (the warm-up trains them on the model's responsibilities)."""
        dev = self.device
        self.prior = NIWPrior(float(prior["kappa"]), float(prior["nu"]), torch.zeros_like(self.shift),
                              torch.as_tensor(np.asarray(prior["psi"]), dtype=STAT_DTYPE, device=dev), prior["family"])
        self.params = GaussianParams(torch.zeros(means.shape[0], dtype=STAT_DTYPE, device=dev),
                                     torch.as_tensor(means, dtype=STAT_DTYPE, device=dev) - self.shift,
                                     torch.as_tensor(chol, dtype=STAT_DTYPE, device=dev))
        self.estep.reset()
        z = torch.from_numpy(self.assign()[0]).to(dev)
        stats = self.rows.hard_stats(z, means.shape[0])
        self._start_from_stats(stats[stats.count > 0])

    def _start_from_stats(self, stats: SuffStats) -> None:
        """MAP parameters, DP weights and principal-axis subclusters from starting statistics (K,);
        fresh nets (the clustering net seeded by cfg.seed) for that K."""
        K = int(stats.count.shape[0])
        self.estep.reset()  # a new partition
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
        # fused: one kernel per parameter instead of ~10 elementwise passes
        self.opt = torch.optim.Adam(self.cluster_net.parameters(), lr=self.cfg.net.lr, fused=True)
        self.sub_opt = torch.optim.Adam(self.subnets.parameters(), lr=self.cfg.net.sub_lr, fused=True)

    def rebuild_for_k(self, result: mv.MoveResult, absorbed: dict[int, int] | None = None) -> None:
        """THE change-of-K event: parameters, heads, subnets, optimizers, DDP wrappers and the
        E-step's per-cluster state together.

        Net rows follow `result.source`; subnets of `result.fresh` clusters are re-initialised;
        optimizers restart (Adam moments of resized tensors have no meaning for new rows); the
        E-step remaps its clusters (absorbed: a merged-away old cluster j -> its survivor old i).
        """
        self.estep.remap(result.source, absorbed or {}, self.n_clusters)
        self.params, self.sub_params = result.params, result.sub_params
        net = resize_cluster_net(unwrap(self.cluster_net), result.source)
        subnets = resize_subnets(unwrap(self.subnets), result.source, result.fresh, self.init_gen)
        self._install_nets(net, subnets)

    # ---- the named steps --------------------------------------------------------------------

    def train_nets(self, plan: EpochPlan, use_estep: bool, scores: Scores) -> tuple[float, float]:
        """One pass of mini-batch training of the clustering net (targets: the E-step `scores` of
        the current parameters) and, when planned, the subclustering nets. Returns summed losses
        / n_global."""
        cfg = self.cfg.net
        # one pass over the rows, in at least min_steps_per_epoch steps (smaller batches on small data)
        B = global_batch(self.n_global, cfg.batch_size, cfg.min_steps_per_epoch)
        steps = math.ceil(self.n_global / B)
        # The subnets step once per SUB_ROWS_PER_NET * K rows (at least every batch): at large K a
        # batch holds about one row per subnet, and a step per batch is mostly optimizer work.
        sub_every = max(1, math.ceil(SUB_ROWS_PER_NET * self.n_clusters / B))
        order = epoch_order(self.rows.global_index, self.n_global, self.batch_gen)
        sub_means = self.sub_params.means.float()
        world = self.comm.world_size
        amp = self._train_autocast(scores.truncated)
        loss_fn = kl_loss if cfg.loss == "kl" else (lambda a, b: ajs_loss(a, b, cfg.ajs_alpha))
        tot_cl = tot_sub = 0.0
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cluster_net.train()
        self.subnets.train()
        for s in range(steps):
            loc = order.rows(s * B, (s + 1) * B)
            xb = self.x[loc].float()
            with amp:
                logits = self.cluster_net(xb)
            logits = logits.float()  # the loss in float32
            with torch.no_grad():
                target = scores.targets(loc, xb)
            loss = target.loss(logits, loss_fn).sum() * (world / B)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            tot_cl += float(loss.detach()) / world
            if plan.train_subnets:
                pending.append((xb, target.best() if use_estep else row_argmax(logits.detach())))
                if len(pending) == sub_every or s == steps - 1:
                    tot_sub += self._subnet_step(pending, sub_means, B)
                    pending = []
        # Each rank summed only its members of every batch: add the ranks' parts.
        tot = self.comm.all_reduce_sum(torch.tensor([tot_cl, tot_sub], dtype=STAT_DTYPE, device=self.device))
        return float(tot[0]) / steps, float(tot[1]) / steps

    def _train_autocast(self, truncated: bool) -> torch.autocast:
        """The clustering net's training-pass precision (NetConfig.train_precision): a bfloat16
        autocast context, or a disabled one (float32). "auto": bfloat16 on the truncated E-step's
        epochs where the device computes it fast (there the (batch, K) head is most of the pass)."""
        mode = self.cfg.net.train_precision
        if mode == "auto":
            fast = (torch.cuda.is_bf16_supported() if self.device.type == "cuda"
                    else self.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
            mode = "bfloat16" if fast and truncated else "float32"
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
        """log r_ik for centred rows x (n, d): the clustering net's (DeepDPM) or the E-step's. -> (n, K)."""
        if use_estep:
            return self.estep.log_responsibilities(self.params, x)
        return net_log_responsibilities(unwrap(self.cluster_net), x, self.dtype)

    @torch.no_grad()
    def accumulate(self, use_estep: bool, scores: Scores | None = None,
                   subclusters: bool = True) -> tuple[SuffStats, SuffStats | None]:
        """Local statistics of clusters (K,) and subclusters (K, 2) (None when not `subclusters`),
        weighted by the E-step's responsibilities or the net's (estep.DenseScores.statistics);
        `scores`: the E-step of the current parameters (default: scored now)."""
        if scores is None:
            scores = self.estep.score(self.params, self.epoch)
        # the un-wrapped nets: a DDP forward is a collective, and ranks run different numbers of chunks
        return scores.statistics(unwrap(self.cluster_net), unwrap(self.subnets), use_estep, subclusters)

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
        """EM steps after the last epoch (schedule.settle_steps), no moves or nets: the net-weighted
        M-step carries the nets' float differences into the parameters; EM from there reaches the
        same fixed point in every worker layout."""
        for _ in range(steps):
            stats, _ = self.accumulate(True, subclusters=False)
            self.m_step(self.rows.reduce_stats(stats), None, clusters=True, subclusters=False)

    # ---- the driver -------------------------------------------------------------------------

    def run_epoch(self, plan: EpochPlan) -> EpochRecord:
        t0, bytes0, grad0 = time.perf_counter(), self.comm.bytes_moved, self.comm.grad_bytes
        frozen = plan.epoch <= self.frozen_until
        use_estep = self.cfg.responsibilities == "estep" or frozen or not plan.m_step
        scores = self.estep.score(self.params, self.epoch)
        evaluated = scores.log_densities(use_estep)
        t_estep = time.perf_counter()
        loss_cl, loss_sub = self.train_nets(plan, use_estep, scores)
        t1 = time.perf_counter()
        stats, sub_stats = self.accumulate(use_estep, scores)
        t2 = time.perf_counter()
        stats, sub_stats = self.rows.reduce_stats(stats), self.rows.reduce_stats(sub_stats)
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
            pr = move_steps.prune_step(self, stats)
        if plan.move == "split" and not frozen:
            sp, sa = move_steps.split_step(self, sub_stats, stats)
        elif plan.move == "merge" and not frozen:
            mp, ma = move_steps.merge_step(self, stats)
            dp, da = move_steps.delete_step(self)
        if sa or ma or da:
            self.frozen_until = plan.epoch + self.cfg.schedule.freeze_epochs
        t5 = time.perf_counter()
        self.epoch = plan.epoch + 1
        rss, device_peak = peak_memory(self.device)
        return EpochRecord(
            epoch=plan.epoch, n_clusters=self.n_clusters, loss_cluster=loss_cl, loss_sub=loss_sub,
            log_marginal=log_ml, size_entropy=entropy, splits_proposed=sp, splits_accepted=sa,
            merges_proposed=mp, merges_accepted=ma, pruned=pr, frozen=frozen,
            time_total=t5 - t0, time_train=t1 - t0, time_stats=t2 - t1, time_reduce=t3 - t2,
            time_mstep=t4 - t3, time_moves=t5 - t4, time_estep=t_estep - t0, log_densities=evaluated,
            truncated=scores.truncated, deletes_proposed=dp, deletes_accepted=da,
            comm_bytes=self.comm.bytes_moved - bytes0, grad_bytes=self.comm.grad_bytes - grad0,
            peak_memory=rss, peak_device_memory=device_peak,
        )

    # ---- outputs ---------------------------------------------------------------------------

    @torch.no_grad()
    def assign(self) -> tuple[np.ndarray, np.ndarray]:
        """MAP argmax_k log pi_k + log N(x; mu_k, Sigma_k) of the local rows, k over every cluster (dense
        E-step) or each row's candidates (truncated). -> (cluster (n,) int64, log_prob (n,) float64)."""
        cluster, best, _, _ = self.assign_top2()
        return cluster, best

    @torch.no_grad()
    def assign_top2(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`assign` plus each row's runner-up cluster (n,) int64 (itself when K = 1) and its
        margin (n,) float64 (best log-joint minus the runner-up's; +inf without a runner-up),
        from the same pass: which clusters border each other (export.cluster_tree) and how clearly
        each row belongs where it was put (the run's assignments)."""
        return self.estep.assign_top2(self.params, self.epoch)

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
            "prior_kappa": self.prior.kappa, "prior_family": self.prior.family,  # and these in kappa_mode, covariance
            "data_var": self.data_var.cpu(),  # psi is rescaled when loaded onto other data
            "params": {k: v.cpu() for k, v in asdict_params(self.params).items()},
            "sub_params": {k: v.cpu() for k, v in asdict_params(self.sub_params).items()},
            "cluster_net": unwrap(self.cluster_net).state_dict(),
            "subnets": unwrap(self.subnets).state_dict(),
            "opt": self.opt.state_dict(),
            "sub_opt": self.sub_opt.state_dict(),
            "candidates": self.estep.state_dict(),  # the truncated E-step's rows' best clusters
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
        self.convergence = Convergence.from_state(self.cfg.schedule, self.n_global, self.n_features,
                                                  state["convergence"])
        psi, old_var = state["prior_psi"].to(self.device, STAT_DTYPE), state["data_var"].to(self.device)
        if not torch.allclose(old_var, self.data_var, rtol=1e-6):
            # the state on re-encoded data (autoencoder rounds): psi's shape belongs to the old
            # coordinates; keep only its scale, relative to the data's variance
            ratio = float(self.data_var.mean() / old_var.mean().clamp_min(1e-30))
            psi = float(psi.diagonal().mean()) * ratio * torch.eye(self.n_features, dtype=STAT_DTYPE,
                                                                     device=self.device)
        self.prior = NIWPrior(float(state["prior_kappa"]), float(state["prior_nu"]), torch.zeros_like(self.shift), psi,
                              state["prior_family"])
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
        self.estep.load_state_dict(state["candidates"])
        self.move_gen.set_state(state["rng"]["move"])
        self.batch_gen.set_state(state["rng"]["batch"])
        self.init_gen.set_state(state["rng"]["init"])


def asdict_params(p: GaussianParams) -> dict[str, torch.Tensor]:
    return {"log_weights": p.log_weights, "means": p.means, "chol": p.chol}

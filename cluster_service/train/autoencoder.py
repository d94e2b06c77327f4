"""Autoencoder mode: the DPGMM clusters an MLP autoencoder's latent codes, alternating with AE
training ("deep model selection": splits and merges change K in the latent space while the AE
learns). DeepDPM's ImageNet-50 alternation, with the alpha-JS paper's clustering loss option.

    pretrain    AE on reconstruction only                                  (pretrain_epochs)
    round 0     encode -> Engine on the codes -> run_schedule              (schedule.epochs)
    round r>0   fine-tune AE: recon + cluster_weight * D(net || E-step)    (finetune_epochs)
                re-encode -> rebase_engine (same state, M-step on the new codes)
                -> run_schedule of the round                               (round_epochs)
    output      AEModel: encoder weights + the latent FittedModel; predict(x) = encode, then
                FittedModel.predict

A thin driver: the Engine never knows it sees codes, and no engine step is copied here.

Distribution: `fit_autoencoder` takes the same (comm, global_index, n_global) as `Engine`. The AE
is wrapped with `comm.wrap` (DDP), mini-batches come from one global permutation (train.shuffle) shared by all
ranks (each rank trains on its members of the global batch; loss scaled by world / batch as in
`Engine.train_nets`), the input normalisation is all-reduced, and the Engine all-reduces the
latent statistics exactly as on raw features. A Ray worker calls it with a `TorchDistComm`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from cluster_service.config import FitConfig
from cluster_service.core.device import resolve_device
from cluster_service.core.gaussian import WhitenedGaussians
from cluster_service.core.nets import ajs_loss, kl_loss
from cluster_service.io.checks import check_features
from cluster_service.serve.ae_model import AEModel
from cluster_service.serve.model import FittedModel
from cluster_service.train.comm import LocalComm, unwrap
from cluster_service.train.engine import Engine, EpochRecord
from cluster_service.train.export import finish_fit
from cluster_service.train.fit import EpochCallback, FitResult, run_schedule
from cluster_service.train.shuffle import epoch_order


class Autoencoder(nn.Module):
    """x (n, d) -> (z (n, latent), x_hat (n, d)). Encoder d -> h_1 ... h_m -> latent with ReLU
    between layers and a linear code; the decoder mirrors it (linear output)."""

    def __init__(self, n_features: int, latent_dim: int, hidden: Sequence[int]):
        super().__init__()
        dims = [n_features, *hidden, latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ---- the clustering loss in latent space ----------------------------------------------------


def latent_cluster_loss(z: torch.Tensor, engine: Engine) -> torch.Tensor:
    """D(p_i || r^E_i(z_i)) per code, the DPGMM and the clustering net held fixed. z: (n, L) -> (n,).

    p_i = softmax(f_cl(z_i)) is the engine's clustering net (a detached target) and
    r^E_i(z) = softmax_k(log pi_k + log N(z_i; mu_k, Sigma_k)) the E-step of the current DPGMM,
    differentiable in the code. D is the configured clustering loss: kl -> KL(p || r^E), whose
    gradient w.r.t. the log-joint is r^E - p; ajs -> JS_a(r^E || p).

    Why this and not a DEC/DCN pull ||z_i - mu_k||^2 toward the means: the pull is unbounded and
    rewards shrinking every code toward its mean (the decoder can undo any scale), so it needs a
    tuned weight to avoid collapse; this loss is bounded (ajs by H(a)), vanishes wherever the net
    and the DPGMM already agree, and moves only codes the DPGMM finds ambiguous into the cluster
    the net assigns them, i.e. it sharpens boundaries. It is the same divergence the net is
    trained with, so `net.loss` selects the method end to end (the alpha-JS paper's setting).
    """
    zc = z - engine.shift.to(z.dtype)
    log_joint = WhitenedGaussians(engine.params, z.dtype).log_joint(zc)  # (n, K)
    with torch.no_grad():
        log_p = torch.log_softmax(unwrap(engine.cluster_net).eval()(zc.detach()), -1)  # (n, K)
    if engine.cfg.net.loss == "kl":
        return kl_loss(log_joint, log_p)
    return ajs_loss(log_joint, log_p, engine.cfg.net.ajs_alpha)


# ---- AE training over one global permutation -------------------------------------------------


@dataclass(frozen=True)
class AEEpochRecord:
    phase: str  # "pretrain" or "finetune"
    round: int
    epoch: int
    loss_recon: float  # mean squared error per feature (normalised inputs)
    loss_cluster: float  # mean clustering loss per point (0 in pretraining)
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


class _AETrainer:
    """The AE, its optimizer and the normalised local rows; one method per epoch kind."""

    def __init__(self, cfg: FitConfig, x: torch.Tensor, global_index: torch.Tensor, n_global: int, comm, device):
        a = cfg.autoencoder
        self.cfg, self.comm, self.device, self.global_index, self.n_global = cfg, comm, device, global_index, n_global
        n_local, d = x.shape
        moments = torch.cat([torch.tensor([float(n_local)], dtype=torch.float64, device=device), x.sum(0)])
        moments = comm.all_reduce_sum(moments)
        self.shift = moments[1:] / moments[0]  # (d,)
        var = comm.all_reduce_sum((x - self.shift).square().sum(0)) / moments[0]
        # One scalar scale (not per-feature): keeps relative feature variances, so low-variance
        # noise directions (PCA tails) are not blown up to unit variance.
        self.scale = float(var.mean().clamp_min(1e-30).sqrt())
        self.x = ((x - self.shift) / self.scale).float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 3)
            ae = Autoencoder(d, a.latent_dim, a.hidden)
        self.ae = comm.wrap(ae.to(device))
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=a.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + 4)  # identical on every rank

    def epoch(self, engine: Engine | None, phase: str, rnd: int, epoch: int) -> AEEpochRecord:
        a = self.cfg.autoencoder
        t0 = time.perf_counter()
        B, world = a.batch_size, self.comm.world_size
        order = epoch_order(self.global_index, self.n_global, self.gen)
        tot_rec = tot_cl = 0.0
        self.ae.train()
        for start in range(0, self.n_global, B):
            nb = min(B, self.n_global - start)
            xb = self.x[order.rows(start, start + nb)]
            z, x_hat = self.ae(xb)
            rec = (x_hat - xb).square().mean(-1)  # (n,)
            loss = a.recon_weight * rec.sum()
            if engine is not None and a.cluster_weight > 0:
                cl = latent_cluster_loss(z, engine)
                loss = loss + a.cluster_weight * cl.sum()
                tot_cl += float(cl.detach().sum())
            loss = loss * (world / nb)  # DDP averages over ranks: the sum over the global batch / nb
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            tot_rec += float(rec.detach().sum())
        sums = torch.tensor([tot_rec, tot_cl], dtype=torch.float64, device=self.device)
        sums = self.comm.all_reduce_sum(sums)
        return AEEpochRecord(
            phase, rnd, epoch, float(sums[0]) / self.n_global, float(sums[1]) / self.n_global,
            time.perf_counter() - t0,
        )

    @torch.no_grad()
    def encode(self, chunk: int = 8192) -> torch.Tensor:
        """Codes of all local rows: (n_local, latent) float64."""
        enc = unwrap(self.ae).encoder.eval()
        return torch.cat([enc(self.x[s : s + chunk]) for s in range(0, self.x.shape[0], chunk)]).double()


def rebase_engine(old: Engine, codes: torch.Tensor, cfg: FitConfig, global_index, n_global: int) -> Engine:
    """The same DPGMM state on new codes: a fresh Engine (new centring, data-scaled prior) that
    loads the old state with means moved into its coordinates, restarts its epoch count for the
    round's schedule, and runs one M-step on the new codes (E-step responsibilities of the old
    parameters as weights, all-reduced like any epoch's statistics)."""
    new = Engine(cfg, codes, global_index, n_global, old.comm, old.device)
    state = old.state_dict()
    delta = (old.shift - new.shift).cpu()
    for key in ("params", "sub_params"):
        state[key] = {**state[key], "means": state[key]["means"] + delta.to(state[key]["means"].dtype)}
    state["epoch"], state["frozen_until"] = 0, -1
    new.load_state_dict(state)
    stats, sub_stats = new.accumulate(use_estep=True)
    new.m_step(new.rows.reduce_stats(stats), new.rows.reduce_stats(sub_stats), clusters=True, subclusters=True)
    return new


# ---- the driver -------------------------------------------------------------------------------


def dpgmm_epochs(cfg: FitConfig) -> int:
    """DPGMM epochs of an AE-mode fit: the first round's schedule plus the later rounds'."""
    return cfg.schedule.epochs + cfg.autoencoder.rounds * cfg.autoencoder.round_epochs


@dataclass
class AEFitResult:
    model: AEModel
    # DPGMM epoch records of all rounds, epochs numbered globally (0 .. dpgmm_epochs - 1);
    # round r starts at round_starts[r].
    history: list[EpochRecord]
    round_starts: list[int]
    ae_history: list[AEEpochRecord]
    k_per_round: list[int]  # K at the end of each round
    codes: np.ndarray  # (n_local, latent) float64 final codes of the training rows
    clusters: np.ndarray  # (n_local,) int64 MAP cluster of those codes
    log_prob: np.ndarray  # (n_local,) float64
    engine: Engine
    margin: np.ndarray  # (n_local,) float64 best minus runner-up log-joint in the latent space

    @property
    def n_clusters(self) -> int:
        return self.model.n_clusters

    def latent_fit(self) -> FitResult:
        """The latent-space fit as a plain FitResult (what trackers and plots consume)."""
        return FitResult(self.model.mixture, self.history, self.clusters, self.log_prob, self.engine, self.margin)


def fit_autoencoder(
    x: np.ndarray | torch.Tensor,
    cfg: FitConfig | None = None,
    callbacks: Sequence[EpochCallback] = (),
    manifest_hash: str | None = None,
    feature_space: dict | None = None,
    comm=None,
    global_index: torch.Tensor | None = None,
    n_global: int | None = None,
    device: torch.device | None = None,
) -> AEFitResult:
    """Autoencoder mode: x (n_local, d) raw features of this process -> AE + latent DPGMM.

    In one process pass x only. Under a distributed trainer pass this rank's rows, their global
    row positions, n_global and a TorchDistComm (as for `Engine`); every rank returns the same
    model. cfg.autoencoder holds the AE settings (`enabled` is not consulted here).
    """
    cfg = (cfg or FitConfig()).validate()
    a = cfg.autoencoder
    comm = comm or LocalComm()
    device = device or resolve_device(cfg.device)
    x_np = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    check_features(x_np, "features", min_rows=1 if n_global else max(2, cfg.k_init))
    n_global = int(n_global if n_global is not None else x_np.shape[0])
    gi = torch.arange(x_np.shape[0]) if global_index is None else torch.as_tensor(global_index, dtype=torch.long)
    xt = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float64)).to(device)
    round_cfg = cfg.replace(**{"schedule.epochs": a.round_epochs})

    history: list[EpochRecord] = []
    round_starts: list[int] = []
    ae_history: list[AEEpochRecord] = []
    k_per_round: list[int] = []

    def run_round(engine: Engine, last: bool) -> None:
        """run_schedule, with the round's epochs renumbered globally for history and callbacks;
        only the last round's end is the fit's end (`stopped`: the progress bar and the tracker
        finish there)."""
        offset = len(history)
        round_starts.append(offset)

        def renumber(rec: EpochRecord, eng: Engine) -> None:
            rec = replace(rec, epoch=offset + rec.epoch, stopped=rec.stopped if last else "")
            history.append(rec)
            for cb in callbacks:
                cb(rec, eng)

        run_schedule(engine, [renumber])
        k_per_round.append(engine.n_clusters)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        trainer = _AETrainer(cfg, xt, gi.to(device), n_global, comm, device)
        del xt
        for e in range(a.pretrain_epochs):
            ae_history.append(trainer.epoch(None, "pretrain", 0, e))
        engine = Engine(cfg, trainer.encode(), gi, n_global, comm, device)
        engine.initialize()
        run_round(engine, last=a.rounds == 0)
        for rnd in range(1, a.rounds + 1):
            for e in range(a.finetune_epochs):
                ae_history.append(trainer.epoch(engine, "finetune", rnd, e))
            engine = rebase_engine(engine, trainer.encode(), round_cfg, gi, n_global)
            run_round(engine, last=rnd == a.rounds)
    mixture, clusters, log_prob, margin = finish_fit(engine, manifest_hash, feature_space)  # as every fit ends
    model = _export(trainer, mixture)
    codes = (engine.x.double() + engine.shift).cpu().numpy()
    return AEFitResult(
        model, history, round_starts, ae_history, k_per_round, codes, clusters, log_prob, engine, margin
    )


def _export(trainer: _AETrainer, mixture: FittedModel) -> AEModel:
    """The encoder's linear layers, the input standardisation and the latent mixture as an AEModel."""
    linears = [m for m in unwrap(trainer.ae).encoder if isinstance(m, nn.Linear)]
    return AEModel(
        encoder=[(m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy()) for m in linears],
        input_shift=trainer.shift.cpu().numpy(),
        input_scale=trainer.scale,
        mixture=mixture,
    )

"""Typed, frozen configuration: one dataclass per component, composed into `FitConfig`.

Every default lives here and only here. `FitConfig.from_dict` parses and validates a
(possibly nested, possibly partial) mapping once, at the edge (CLI, job YAML, Ray Tune);
components receive only their own sub-config.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 2  # checkpoints: 2 adds the prior's kappa and covariance family

# Defaults of the service around the model, stated once: the job configs (ops.jobconfig), the CLI
# options and the library functions all take them from here.
CHECKPOINT_EVERY = 5  # epochs between Ray Train checkpoints of a distributed fit
TOP_M = 16  # `assign --method shortlist`: candidate clusters rescored exactly per row
EXPERIMENT = "cluster_service"  # MLflow experiment of fits and jobs
NOVELTY_FPR = 0.01  # `assign`: share of training-like rows flagged novel (serve.novelty)
# Cosine similarity (of mean-centred rows) at which `duplicates` calls two rows near-duplicates:
# measured on planted duplicates in the ImageNet proxy (BENCHMARKS.md, "Near-duplicates").
DUPLICATE_THRESHOLD = 0.95
# The report's 2-D map: "auto" (UMAP where umap-learn is installed, else PCA), "umap" or "pca";
# the environment variable overrides it (the tests set pca: UMAP's numba compile costs 30-40 s a process).
MAP_LAYOUT_ENV = "CLUSTER_SERVICE_MAP_LAYOUT"
MAP_LAYOUT = "auto"


class ConfigError(ValueError):
    """An invalid configuration value; the message says what is allowed."""


def check_device(name: str, key: str = "device") -> str:
    """The one rule for a device name in a config or option: auto, cpu, cuda or cuda:N
    (core.device.resolve_device turns it into a torch.device where it is used)."""
    if not (name in ("auto", "cpu", "cuda") or str(name).startswith("cuda:")):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def check_train_resources(prefix: str, workers: int, checkpoint_every: int = CHECKPOINT_EVERY,
                          max_failures: int = 0, gpus_per_worker: float = 1.0,
                          cpus_per_worker: float = 1.0) -> None:
    """The one rule for a distributed fit's resources (job `train` section, `fit --workers`,
    trainer.fit_distributed): workers and checkpoint_every >= 1, max_failures >= 0, GPUs and CPUs
    per worker > 0. Messages name each key after `prefix` ("train.", "--" for options)."""

    def name(key: str) -> str:
        return f"{prefix}{key.replace('_', '-') if prefix == '--' else key}"

    for key, value in (("workers", workers), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{name(key)} must be >= 1, got {value}")
    if max_failures < 0:
        raise ConfigError(f"{name('max_failures')} must be >= 0, got {max_failures}")
    for key, value in (("gpus_per_worker", gpus_per_worker), ("cpus_per_worker", cpus_per_worker)):
        if not value > 0:
            raise ConfigError(f"{name(key)} must be > 0, got {value}")


class ScheduleWarning(UserWarning):
    """A valid schedule that cannot do what a fit usually wants (e.g. no split can happen)."""


@dataclass(frozen=True)
class PriorConfig:
    """Dirichlet-process concentration and Normal-Inverse-Wishart hyperparameters.

    The NIW prior is parameterised as in DESIGN §2: (kappa, m, nu, psi) with the prior scale
    matrix nu * psi, so `psi` is on the scale of a covariance.
    """

    # DP concentration. Larger alpha favours more clusters (enters split ratios as +log alpha).
    # 10 is the DeepDPM default; K is insensitive to it within an order of magnitude.
    alpha: float = 10.0
    # Pseudo-count of the prior mean. Tiny so cluster means follow the data.
    kappa: float = 1e-4
    # "evidence": kappa is chosen with the starting partition among `kappa` and the start's
    # between/within ratio tr(W) / tr(B) (niw.between_within_kappa) by the DP marginal likelihood.
    # A vague kappa charges each cluster (d / 2) log(N_k / kappa) nats for its mean, which with few
    # rows per dimension outweighs what separates clusters. "fixed": kappa as given.
    kappa_mode: Literal["evidence", "fixed"] = "evidence"
    # Degrees of freedom in excess of the dimension: nu = n_features + nu_offset. Must be > -1
    # (nu > d - 1). 2 gives the weakest prior with a finite mean covariance (DeepDPM: nu = d + 2).
    nu_offset: float = 2.0
    # "evidence": nu is chosen with the starting partition (FitConfig.init "evidence") among
    # d + nu_offset, 1.5 d, 3 d, 9 d, 33 d by the DP marginal likelihood (empirical Bayes). A
    # large nu holds cluster covariances near psi: what few points per dimension can support
    # (ImageNet-50 test split: ~50 points per class in 128-d). "fixed": nu = d + nu_offset.
    nu_mode: Literal["evidence", "fixed"] = "evidence"
    # How psi is chosen: "pooled" = pooled_scale * pooled within-cluster covariance of an
    # over-clustered k-means start (empirical Bayes: the prior's covariance scale follows the
    # clusters' own spread, so it suits tight UMAP blobs and overlapping high-d mixtures alike);
    # "data_diag" = psi_scale * mean per-dimension variance of the data * I (the previous
    # default; right only when clusters are tiny next to the whole); "fixed" = psi_scale * I
    # (the reference code's 0.005 * I when psi_scale=0.005).
    psi_mode: Literal["pooled", "data_diag", "fixed"] = "pooled"
    # "pooled" mode: multiple of the pooled within-cluster covariance.
    pooled_scale: float = 1.0
    # "pooled" mode with the evidence start: psi = s * pooled_scale * W (+ floor) for each s
    # here is tried, and the DP evidence of the starting partition picks one. Scales below 1 are
    # tried only when the start's cells are under-determined (fewer than 2 (d + 2) points per
    # cell; train.start.evidence_scales), whose pooled scatter overstates the clusters' spread; none
    # above 1, where the evidence over-splits. Measured effects: docs/ARCHITECTURE.md, "K inference".
    pooled_evidence_scales: tuple[float, ...] = (0.00390625, 0.015625, 0.0625, 0.25, 1.0)
    # "data_diag" / "fixed" modes: fraction of the data variance (or absolute scale) a single
    # cluster is expected to have a priori. "pooled" mode: an isotropic floor added to psi, as
    # a fraction of the data variance, because the k-means cells of tight, curved blobs (UMAP)
    # are much smaller than the blobs and a prior of their scatter alone splits each blob.
    psi_scale: float = 0.005
    # Covariance family of every cluster (core/niw.py): "full" (the NIW), "diag" (independent
    # coordinates, 2 d parameters a cluster instead of d (d + 3) / 2), or "auto": the evidence start
    # picks the family with the prior, so clusters with about as many rows as dimensions, or
    # fewer, get a model their rows can estimate (measured in BENCHMARKS.md, "Rows per dimension").
    covariance: Literal["auto", "full", "diag"] = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.pooled_evidence_scales, list):  # YAML/JSON give lists
            object.__setattr__(self, "pooled_evidence_scales", tuple(self.pooled_evidence_scales))

    def validate(self) -> None:
        for name in ("alpha", "kappa", "nu_offset", "psi_scale", "pooled_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"prior.{name} must be a finite number, got {getattr(self, name)}")
        if not self.alpha > 0:
            raise ConfigError(f"prior.alpha must be > 0, got {self.alpha}")
        if not self.kappa > 0:
            raise ConfigError(f"prior.kappa must be > 0, got {self.kappa}")
        if not self.nu_offset > -1:
            raise ConfigError(f"prior.nu_offset must be > -1 (nu > n_features - 1), got {self.nu_offset}")
        if self.nu_mode not in ("evidence", "fixed"):
            raise ConfigError(f"prior.nu_mode must be 'evidence' or 'fixed', got {self.nu_mode!r}")
        if self.kappa_mode not in ("evidence", "fixed"):
            raise ConfigError(f"prior.kappa_mode must be 'evidence' or 'fixed', got {self.kappa_mode!r}")
        if self.covariance not in ("auto", "full", "diag"):
            raise ConfigError(f"prior.covariance must be 'auto', 'full' or 'diag', got {self.covariance!r}")
        if self.psi_mode not in ("pooled", "data_diag", "fixed"):
            raise ConfigError(f"prior.psi_mode must be 'pooled', 'data_diag' or 'fixed', got {self.psi_mode!r}")
        if not (
            isinstance(self.pooled_evidence_scales, tuple)
            and self.pooled_evidence_scales
            and all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in self.pooled_evidence_scales)
        ):
            raise ConfigError(
                f"prior.pooled_evidence_scales must be positive numbers, got {self.pooled_evidence_scales!r}"
            )
        for name in ("psi_scale", "pooled_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"prior.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class NetConfig:
    """Clustering net and batched subclustering nets (DeepDPM §3)."""

    cluster_hidden: int = 128  # hidden width of the clustering net f_cl
    sub_hidden: int = 32  # hidden width of each subclustering net f_sub^k
    lr: float = 2e-3  # Adam learning rate of the clustering net
    sub_lr: float = 5e-3  # Adam learning rate of the subclustering nets
    batch_size: int = 1024
    # An epoch is one pass over the rows in steps of batch_size rows, but at least this many
    # steps: small data sets get smaller batches (n / min_steps_per_epoch rows), never extra
    # passes, so an epoch costs O(n) and the nets still take enough steps to follow a move.
    min_steps_per_epoch: int = 20
    # Clustering loss: "kl" = KL(r || r^E) (DeepDPM); "ajs" = alpha-skew Jensen-Shannon.
    loss: Literal["kl", "ajs"] = "kl"
    ajs_alpha: float = 0.5  # skew of the ajs loss; 0.5 is the symmetric JS divergence
    # The clustering net's training pass (forward and backward; weights, optimizer, loss and
    # every inference stay float32): "auto" = bfloat16 autocast on the truncated path (K above
    # 2 x candidates, where the (batch, K) head is most of the pass) when the device has fast
    # bfloat16 matmuls, else float32: a faster pass that leaves K and NMI where float32 puts them
    # (BENCHMARKS.md). "float32" is the reference.
    train_precision: Literal["auto", "float32", "bfloat16"] = "auto"

    def validate(self) -> None:
        for name in ("cluster_hidden", "sub_hidden", "batch_size", "min_steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"net.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "sub_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"net.{name} must be > 0, got {getattr(self, name)}")
        if self.loss not in ("kl", "ajs"):
            raise ConfigError(f"net.loss must be 'kl' or 'ajs', got {self.loss!r}")
        if not 0 < self.ajs_alpha < 1:
            raise ConfigError(f"net.ajs_alpha must be in (0, 1), got {self.ajs_alpha}")
        if self.train_precision not in ("auto", "float32", "bfloat16"):
            raise ConfigError(
                f"net.train_precision must be 'auto', 'float32' or 'bfloat16', got {self.train_precision!r}"
            )


@dataclass(frozen=True)
class MoveConfig:
    """Split/merge proposals and their guards."""

    # A cluster (or subcluster) with fewer (weighted) points than this is never split, and a
    # split that would create one is rejected.
    min_cluster_size: float = 10.0
    # Merge candidates: each cluster's this-many nearest cluster means (FAISS).
    merge_neighbors: int = 3
    # Clusters whose weighted count falls below this are removed (their points go elsewhere).
    prune_below: float = 1.0
    # Upper bound on K (a safety net, not a tuning knob).
    max_clusters: int = 5000
    # Second split proposal per cluster: k-means with up to this many cells inside the cluster
    # (one per 2 (d + 2) points), merged greedily by the merge ratio; the best level of that
    # tree is a many-way split, tested instead of the subnets' two-way split when its log H_s
    # is higher. Finds what one cut misses (a cloud of many components, a small component
    # beside a large one). 0 = subnets' proposal only (the reference DeepDPM).
    split_cells: int = 32
    # The cells' k-means trains on at most this many rows per cell of each cluster (the same
    # rows in every worker layout), gathered on rank 0: a split round sends at most
    # K * split_cells * this rows, whatever N is (at ImageNet scale, 4 cells of ~1,280 rows: a
    # fifth of the rows). Every row is then binned to its cluster's cells for the statistics.
    split_sample_per_cell: int = 64
    # Delete proposals each merge round: this many of the largest clusters (by hard count) are
    # tested for removal, their rows going to their runner-up clusters (moves.propose_deletes,
    # accepted by the change of the CRP x NIW evidence). Aimed at a catch-all: a broad cluster
    # that absorbs the tails of many components, which the net-weighted M-step grew at ImageNet
    # scale (1.15M x 128, K ~900). Off by default because it changed nothing it was for: at that
    # scale the next M-steps regrew the deleted catch-all (docs/ARCHITECTURE.md, "A catch-all
    # cluster"), and on generated sets (BENCHMARKS.md) it accepted one delete in 12 fits and moved
    # no K or NMI beyond what its extra random draws do. 0 = off.
    delete_largest: int = 0

    def validate(self) -> None:
        if self.min_cluster_size < 2:
            raise ConfigError(f"moves.min_cluster_size must be >= 2, got {self.min_cluster_size}")
        if self.merge_neighbors < 1:
            raise ConfigError(f"moves.merge_neighbors must be >= 1, got {self.merge_neighbors}")
        if self.prune_below < 0:
            raise ConfigError(f"moves.prune_below must be >= 0, got {self.prune_below}")
        if self.max_clusters < 1:
            raise ConfigError(f"moves.max_clusters must be >= 1, got {self.max_clusters}")
        if self.delete_largest < 0:
            raise ConfigError(f"moves.delete_largest must be >= 0, got {self.delete_largest}")
        if self.split_sample_per_cell < 2:
            raise ConfigError(f"moves.split_sample_per_cell must be >= 2, got {self.split_sample_per_cell}")
        if self.split_cells < 0 or self.split_cells == 1:
            raise ConfigError(f"moves.split_cells must be 0 (off) or >= 2, got {self.split_cells}")


@dataclass(frozen=True)
class ScheduleConfig:
    """When things happen, in epochs. `schedule.build_plan` turns this into per-epoch data."""

    epochs: int = 120
    # Epochs during which only the clustering net trains against the k-means init (no M-step).
    warmup_epochs: int = 5
    # First epoch in which the subclustering nets train.
    subcluster_start: int = 5
    # First split epoch; splits then come every `move_period` epochs; merges half-way between.
    first_split: int = 15
    move_period: int = 10
    # After a move, the cluster parameters stay frozen this many epochs while the nets adapt
    # to the new K (the M-step would otherwise average the new clusters back together).
    freeze_epochs: int = 3
    # No moves in the last `final_epochs` epochs: the model settles. (An early stop, below,
    # settles for freeze_epochs + 1 epochs, and only when the last move round changed anything.)
    final_epochs: int = 10
    # Early stop (`epochs` is then a cap): the fit ends at the end of a move round (its merge
    # epoch) when K at the ends of the last `stop_rounds` rounds equals K before them and the
    # clusters' log marginal likelihood changed by at most `stop_tol` nats per row and
    # dimension over those rounds. A K that still grows or shrinks changes between round ends,
    # so it is never cut off. stop_rounds 0 = run every planned epoch (the fixed calendar).
    # stop_tol sits within how far the marginal still creeps once K has settled (the net's
    # responsibilities sharpen) while the partition no longer changes; measured in
    # docs/ARCHITECTURE.md, "Early stop".
    stop_rounds: int = 2
    stop_tol: float = 1e-3
    # "The same K" at those round ends: within stop_k_tol x K, rounded down, so exactly the same
    # below 1 / stop_k_tol clusters: at K ~1,000 each round's Metropolis-Hastings draws accept a
    # few moves either way for ever, so an exact K never repeats (BENCHMARKS.md, the full-scale fit).
    stop_k_tol: float = 0.01
    # EM steps (E-step-weighted M-steps, no moves, no nets) after the last epoch, before the MAP
    # assignment: they remove what the nets' float rounding left in the parameters, so one
    # process and N workers end at the same fixed point (docs/ARCHITECTURE.md, Distribution).
    settle_steps: int = 5

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"schedule.epochs must be >= 1, got {self.epochs}")
        if not (math.isfinite(self.stop_tol) and self.stop_tol >= 0):
            raise ConfigError(f"schedule.stop_tol must be a finite number >= 0, got {self.stop_tol}")
        if not (math.isfinite(self.stop_k_tol) and 0 <= self.stop_k_tol < 1):
            raise ConfigError(f"schedule.stop_k_tol must be a number in [0, 1), got {self.stop_k_tol}")
        for name in ("warmup_epochs", "subcluster_start", "first_split", "freeze_epochs", "final_epochs",
                     "stop_rounds", "settle_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name} must be >= 0, got {getattr(self, name)}")
        if self.move_period < 2:
            raise ConfigError(
                f"schedule.move_period must be >= 2 (split and merge alternate), got {self.move_period}"
            )
        if self.freeze_epochs >= self.move_period // 2 + 1:
            raise ConfigError(
                f"schedule.freeze_epochs ({self.freeze_epochs}) must be <= move_period // 2 "
                f"({self.move_period // 2}) so the nets adapt before the next move"
            )
        if self.first_split <= self.subcluster_start:
            raise ConfigError(
                f"schedule.first_split ({self.first_split}) must come after subcluster_start "
                f"({self.subcluster_start}): splits need trained subclusters"
            )
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"schedule.warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs}): "
                "otherwise the M-step never runs and the result is the k-means initialisation"
            )
        last_move = self.epochs - self.final_epochs
        if self.first_split >= last_move:
            # A warning, not an error: short no-move runs (smoke tests, autoencoder rounds) are legitimate.
            warnings.warn(
                f"schedule: no split or merge can happen (first_split {self.first_split} >= epochs - "
                f"final_epochs = {last_move}), so K stays <= k_init; to infer K use "
                f"schedule.epochs >= {self.first_split + self.final_epochs + 1} or a smaller first_split",
                ScheduleWarning,
                stacklevel=2,
            )


@dataclass(frozen=True)
class AutoencoderConfig:
    """Autoencoder mode (`fit --autoencoder`): cluster an MLP autoencoder's latent codes with the
    DPGMM and alternate AE fine-tuning with clustering (cluster_service.train.autoencoder)."""

    # Off by default: the DPGMM runs on the features as given (MoCo features need no AE).
    enabled: bool = False
    # Latent dimension the DPGMM sees. 10 as in DeepDPM's AE runs: full covariances stay cheap
    # (K * latent^2 statistics) and well determined even for clusters of a few dozen points.
    latent_dim: int = 10
    # Encoder widths d -> h1 -> h2 -> h3 -> latent; the decoder mirrors them. (500, 500, 2000)
    # is the DEC/DCN/DeepDPM architecture; small data sets train faster with e.g. (128, 128, 256).
    hidden: tuple[int, ...] = (500, 500, 2000)
    # Reconstruction-only epochs before the first clustering: the latent space must already
    # carry the data's structure, or the first DPGMM fit locks in a poor K.
    pretrain_epochs: int = 50
    # Alternation rounds after the first clustering: each fine-tunes the AE, re-encodes and
    # continues the DPGMM from its previous state. 0 = pretrained AE + one DPGMM fit.
    rounds: int = 2
    # AE fine-tuning epochs per round (reconstruction + clustering loss against a fixed DPGMM).
    finetune_epochs: int = 5
    # DPGMM epochs per later round (the first round runs schedule.epochs). Long enough for the
    # net to adapt (warm-up) and for a split and a merge at the schedule's period.
    round_epochs: int = 40
    lr: float = 1e-3  # Adam learning rate of the autoencoder (pretraining and fine-tuning)
    batch_size: int = 256  # AE mini-batch; smaller than the nets' since the AE is much larger
    # Loss = recon_weight * MSE(x, x_hat) + cluster_weight * clustering loss. The clustering
    # loss (net.loss: kl | ajs) is bounded and vanishes where the DPGMM and the net agree, so a
    # small weight shapes boundaries without letting codes collapse onto the means.
    recon_weight: float = 1.0
    cluster_weight: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.hidden, list):  # YAML/JSON give lists; keep the frozen config hashable
            object.__setattr__(self, "hidden", tuple(self.hidden))

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"autoencoder.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.hidden, tuple) or not all(isinstance(h, int) and h >= 1 for h in self.hidden):
            raise ConfigError(f"autoencoder.hidden must be a list of positive integers, got {self.hidden!r}")
        for name in ("latent_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"autoencoder.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pretrain_epochs", "rounds", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"autoencoder.{name} must be >= 0, got {getattr(self, name)}")
        if self.round_epochs < 1:
            raise ConfigError(f"autoencoder.round_epochs must be >= 1, got {self.round_epochs}")
        if not self.lr > 0:
            raise ConfigError(f"autoencoder.lr must be > 0, got {self.lr}")
        for name in ("recon_weight", "cluster_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"autoencoder.{name} must be >= 0, got {getattr(self, name)}")
        if self.recon_weight == 0 and self.cluster_weight == 0:
            raise ConfigError("autoencoder.recon_weight and autoencoder.cluster_weight cannot both be 0")


@dataclass(frozen=True)
class FitConfig:
    """Everything a fit needs. Compose sub-configs; parse with `FitConfig.from_dict`."""

    # How the fit starts. "evidence": k-means at K0 = max(k_init, overcluster_factor *
    # sqrt(n_samples)) (more clusters than the data supports) and at K0 / sqrt(2)^i down to 1;
    # the partition with the highest DP marginal likelihood (niw.log_partition_evidence)
    # starts the fit, so K starts near what the model supports and no K_init is guessed.
    # (Greedy merging of the K0 cells was tried: it chains, e.g. 200 components -> 1.)
    # "kmeans": k-means with k_init clusters, K found by the split/merge moves alone (the
    # reference DeepDPM start).
    init: Literal["evidence", "kmeans"] = "evidence"
    k_init: int = 1
    # K0 of the over-clustered start (also the partition whose pooled scatter sets psi in
    # prior.psi_mode "pooled"), per sqrt(n_samples): 1.0 gives 245 cells at 60k rows, 447 at 200k.
    overcluster_factor: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    # Which responsibilities weight the M-step: "net" (DeepDPM: the clustering net's) or
    # "estep" (classic EM responsibilities; the net is still trained and saved).
    responsibilities: Literal["net", "estep"] = "net"
    # Each cluster's total weight in a net-weighted M-step. "estep": held to the E-step's (the
    # net's responsibilities with each cluster's output bias at its calibration optimum, the
    # stationary point of the KL to the targets in that bias, found by a few Sinkhorn steps).
    # "net": the net's as it is (DeepDPM as published); at large K the net follows its targets
    # loosely and "net" lets a broad cluster gather mass epoch after epoch (BENCHMARKS.md).
    net_mass: Literal["estep", "net"] = "estep"
    # Rows per chunk for E-step and statistics: memory is O(chunk * K + K * d^2).
    chunk_size: int = 8192
    # How each process keeps its (centred) rows: "bfloat16" or "float16" halve the rows' memory
    # (a row's relative rounding 2^-9 / 2^-12); every chunk is upcast to float32 where it is
    # scored and its statistics are summed in float64, as with "float32".
    row_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The truncated E-step (train/estep.TruncatedEStep, core/truncated.py): this many clusters
    # scored exactly per row (its best ones of the last scoring, its nearest means, its best
    # cluster's neighbours in the cluster graph, one pseudo-random one) once K exceeds
    # 2 x candidates; below that, scoring all K is cheaper. The nets hold a row's mass off its
    # candidates where the half of them past its best holds almost none. 0 = always all K.
    candidates: int = 16
    prior: PriorConfig = field(default_factory=PriorConfig)
    net: NetConfig = field(default_factory=NetConfig)
    moves: MoveConfig = field(default_factory=MoveConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def validate(self) -> FitConfig:
        for sub in (self.prior, self.net, self.moves, self.schedule, self.autoencoder):
            sub.validate()  # first, so each field's own rule is the message
        if self.k_init < 1:
            raise ConfigError(f"k_init must be >= 1, got {self.k_init}")
        if self.init not in ("evidence", "kmeans"):
            raise ConfigError(f"init must be 'evidence' or 'kmeans', got {self.init!r}")
        if not (math.isfinite(self.overcluster_factor) and self.overcluster_factor > 0):
            raise ConfigError(f"overcluster_factor must be > 0, got {self.overcluster_factor}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.row_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"row_dtype must be float32, bfloat16 or float16, got {self.row_dtype!r}")
        if self.candidates != 0 and self.candidates < 6:
            raise ConfigError(f"candidates must be 0 (always score all K) or >= 6, got {self.candidates}")
        if self.responsibilities not in ("net", "estep"):
            raise ConfigError(f"responsibilities must be 'net' or 'estep', got {self.responsibilities!r}")
        if self.net_mass not in ("estep", "net"):
            raise ConfigError(f"net_mass must be 'estep' or 'net', got {self.net_mass!r}")
        check_device(self.device)
        if self.k_init > self.moves.max_clusters:
            raise ConfigError(
                f"k_init ({self.k_init}) exceeds moves.max_clusters ({self.moves.max_clusters})"
            )
        return self

    # ---- parsing -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys, e.g. {"prior.alpha": 10.0, ...}, for logging as params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[f"{prefix}{k}"] = v

        walk("", self.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None) -> FitConfig:
        """Build and validate from a nested mapping; dotted keys ("prior.alpha") are accepted."""
        return build_typed(cls, _nest(data or {})).validate()

    def replace(self, **overrides: Any) -> FitConfig:
        """A copy with overrides given as dotted keys, e.g. replace(**{"schedule.epochs": 50})."""
        merged = _deep_update(self.to_dict(), _nest(overrides))
        return FitConfig.from_dict(merged)


def _nest(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r} conflicts with a scalar at {p!r}")
        if isinstance(value, dict):
            value = _nest(value)
            node[parts[-1]] = _deep_update(node.get(parts[-1], {}), value)
        else:
            node[parts[-1]] = value
    return out


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def build_typed(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking each value against its annotation: unknown
    keys, missing required keys and values of the wrong type raise ConfigError naming the key
    (`prefix` + name). Fields whose type is a dataclass take a mapping and are built the same
    way. The one builder of every config: FitConfig here, the job sections in ops.jobconfig."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + str(u) for u in unknown)}; "
                          f"allowed under {prefix.rstrip('.') or 'top level'}: {', '.join(sorted(known))}")
    missing = [n for n, f in known.items() if not has_default(f) and n not in data]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(prefix + m for m in missing)}")
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = build_typed(hints[name], value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(prefix + name, value, hints[name])
    return cls(**kwargs)


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """`value` checked (and, where lossless, converted: int -> float, 40.0 -> 40, list -> tuple)
    against the annotation `tp`: int, float, str, bool, Path, Literal, X | None, tuple[X, ...], dict."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_value(key, value, opt)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] + (" or null" if type(None) in options else ""))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:  # a whole float (a search space's 40.0) is an integer; True is not
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str or tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
        return tp(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")  # a programming error, named

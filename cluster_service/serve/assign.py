"""Assign feature rows to the clusters of a fitted model: exactly, by FAISS shortlist, or by the net.

Final assignment (DESIGN §2): k*(x) = argmax_k log pi_k + log N(x; mu_k, Sigma_k).

Three methods, one output (`Assignment`: cluster, log_prob, margin):

    exact      brute force over all K clusters (`FittedModel.log_joint`): 2 K d^2 flops per row.
    shortlist  FAISS finds the top-M clusters under a cheap surrogate score, then the M candidates
               are rescored with the exact Gaussian log-density: 2 (2d+1) K + 2 M d^2 flops per row.
    net        the clustering net's argmax (its logits give the margin).

The surrogate is a diagonal Gaussian per cluster in one shared basis: rotate by the eigenvectors R
of the weighted mean covariance sum_k pi_k Sigma_k, keep each cluster's marginal variances
v_k = diag(R^T Sigma_k R) there, and score

    s_k(z) = log pi_k - 1/2 sum_j log v_kj - 1/2 sum_j (z_j - nu_kj)^2 / v_kj,    z = R^T (x - c)

which is an inner product <q(z), key_k> with q = [z^2, z, 1] and
key_k = [-1/(2 v_k), nu_k / v_k, log pi_k - 1/2 sum log v_k - 1/2 sum nu_k^2 / v_k]; so the top-M
search is a maximum-inner-product search (FAISS IndexFlatIP; HNSW for large K).

`log_prob` is always the exact log pi_k + log N(x; mu_k, Sigma_k) of the assigned cluster (so it is
comparable across methods); `margin` is the method's best score minus its second best (Gaussian
log-joint for exact/shortlist, logits for net; +inf when K = 1).

The batch job over shard directories is cluster_service.runtime.assign_job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cluster_service import index as faiss_index
from cluster_service.config import TOP_M
from cluster_service.core.device import resolve_device
from cluster_service.core.gaussian import WhitenedGaussians
from cluster_service.core.niw import GaussianParams
from cluster_service.serve.model import FittedModel, ModelError

METHODS = ("shortlist", "exact", "net")
DEFAULT_TOP_M = TOP_M


@dataclass
class Assignment:
    cluster: np.ndarray  # (n,) int64
    log_prob: np.ndarray  # (n,) float64 log pi_k + log N(x; mu_k, Sigma_k) of the assigned cluster
    margin: np.ndarray  # (n,) float64 best minus second-best score of the method


def _tensor(a: np.ndarray) -> torch.Tensor:
    """torch view of a numpy array; read-only arrays (Arrow buffers, Ray objects) are copied first."""
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _best_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores: (n, M) -> argmax (n,), max (n,), max minus second max (n,) (+inf when M = 1)."""
    if scores.shape[1] == 1:
        zeros = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
        return zeros, scores[:, 0], torch.full_like(scores[:, 0], np.inf)
    top, arg = scores.topk(2, dim=1)
    return arg[:, 0], top[:, 0], top[:, 0] - top[:, 1]


# ---------------------------------------------------------------------------------------- exact math


class GaussianScorer:
    """Exact log pi_k + log N(x; mu_k, Sigma_k) of a fitted model for chosen (row, cluster)
    pairs: the engine's scorer (core.gaussian.WhitenedGaussians) over the model's parameters."""

    def __init__(self, model: FittedModel, device: torch.device, dtype: torch.dtype = torch.float64):
        params = GaussianParams(*(_tensor(a).to(device, torch.float64) for a in (model.log_weights, model.means,
                                                                                  model.chol)))
        self.scorer = WhitenedGaussians(params, dtype)
        self.dtype, self.device = dtype, device

    def score_pairs(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """x: (n, d); cand: (n, M) int64 cluster ids (-1 = none) -> (n, M) log-joints (-inf for -1);
        one (rows, d) x (d, d) matmul per cluster present, never a loop over rows."""
        return self.scorer.score_pairs(x.to(self.device, self.dtype), cand.to(self.device))


def exact_assign(
    model: FittedModel, x: np.ndarray, device: str = "cpu", chunk_rows: int | None = None
) -> Assignment:
    """Brute force over all K clusters with `FittedModel.log_joint` (float64)."""
    x = np.asarray(x)
    model.check_features(x)
    rows = chunk_rows or max(1, (1 << 24) // max(1, model.n_clusters))
    parts = []
    for s in range(0, x.shape[0], rows):
        lj = torch.from_numpy(model.log_joint(x[s : s + rows], device=device))
        parts.append(_best_two(lj))
    if not parts:
        return Assignment(np.empty(0, np.int64), np.empty(0), np.empty(0))
    cluster, best, margin = (torch.cat(t).numpy() for t in zip(*parts, strict=True))
    return Assignment(cluster.astype(np.int64), best, margin)


# ---------------------------------------------------------------------------------------- shortlist


@dataclass
class DiagonalSurrogate:
    """Per-cluster diagonal Gaussians in a shared rotated basis, as MIPS keys (see module docstring)."""

    center: np.ndarray  # (d,) c
    rotation: np.ndarray  # (d, d) R, columns = eigenvectors of sum_k pi_k Sigma_k
    keys: np.ndarray  # (K, 2 d + 1) float32

    @classmethod
    def from_model(cls, model: FittedModel) -> DiagonalSurrogate:
        pi = np.exp(model.log_weights - model.log_weights.max())
        pi /= pi.sum()
        chol = model.chol.astype(np.float64)
        scaled = chol * np.sqrt(pi)[:, None, None]
        pooled = np.tensordot(scaled, scaled, axes=([0, 2], [0, 2]))  # sum_k pi_k L_k L_k^T: (d, d)
        _, rotation = np.linalg.eigh(pooled)
        center = pi @ model.means
        nu = (model.means - center) @ rotation  # (K, d)
        var = np.square(rotation.T[None] @ chol).sum(2)  # diag(R^T L L^T R): (K, d)
        prec = 1.0 / var
        bias = model.log_weights - 0.5 * np.log(var).sum(1) - 0.5 * (nu * nu * prec).sum(1)
        keys = np.concatenate([-0.5 * prec, nu * prec, bias[:, None]], axis=1)
        return cls(center, rotation, keys.astype(np.float32))

    def queries(self, x: np.ndarray) -> np.ndarray:
        """x: (n, d) -> q = [z^2, z, 1]: (n, 2 d + 1) float32."""
        z = (np.asarray(x, dtype=np.float64) - self.center) @ self.rotation
        return np.concatenate([z * z, z, np.ones((z.shape[0], 1))], axis=1).astype(np.float32)


class ShortlistAssigner:
    """FAISS top-M search under the diagonal surrogate, then exact rescoring of the M candidates."""

    def __init__(
        self,
        model: FittedModel,
        top_m: int = DEFAULT_TOP_M,
        device: str = "cpu",
        index_kind: str = "auto",
        dtype: torch.dtype = torch.float64,
    ):
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {top_m}")
        self.model = model
        self.top_m = min(top_m, model.n_clusters)
        self.surrogate = DiagonalSurrogate.from_model(model)
        self.index = faiss_index.MipsIndex(self.surrogate.keys, index_kind)
        self.scorer = GaussianScorer(model, resolve_device(device), dtype)

    def candidates(self, x: np.ndarray) -> np.ndarray:
        """(n, M) int64 candidate clusters, best surrogate score first."""
        return self.index.search(self.surrogate.queries(x), self.top_m)

    def __call__(self, x: np.ndarray) -> Assignment:
        x = np.asarray(x)
        self.model.check_features(x)
        cand = torch.from_numpy(self.candidates(x))
        scores = self.scorer.score_pairs(_tensor(x), cand)
        pos, best, margin = _best_two(scores)
        cluster = cand.gather(1, pos.cpu()[:, None])[:, 0]
        return Assignment(cluster.numpy(), best.cpu().numpy(), margin.cpu().numpy())


class ExactAssigner:
    def __init__(self, model: FittedModel, device: str = "cpu"):
        self.model, self.device = model, str(resolve_device(device))

    def __call__(self, x: np.ndarray) -> Assignment:
        return exact_assign(self.model, x, self.device)


class NetAssigner:
    """The clustering net's argmax; log_prob is the exact log-joint of that cluster."""

    def __init__(self, model: FittedModel, device: str = "cpu"):
        if not model.net:
            raise ModelError("this model has no clustering-net weights; use --method exact or shortlist")
        self.model = model
        self.scorer = GaussianScorer(model, resolve_device(device))

    def __call__(self, x: np.ndarray) -> Assignment:
        logits = torch.from_numpy(self.model.net_logits(x))
        cluster, _, margin = _best_two(logits)
        log_prob = self.scorer.score_pairs(_tensor(x), cluster[:, None])[:, 0]
        return Assignment(cluster.numpy(), log_prob.cpu().numpy(), margin.numpy().astype(np.float64))


def make_assigner(
    model: FittedModel, method: str = "shortlist", top_m: int = DEFAULT_TOP_M, device: str = "cpu"
) -> Callable[[np.ndarray], Assignment]:
    if method == "shortlist":
        return ShortlistAssigner(model, top_m, device)
    if method == "exact":
        return ExactAssigner(model, device)
    if method == "net":
        return NetAssigner(model, device)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def concat_assignments(parts: list[Assignment]) -> Assignment:
    if not parts:
        return Assignment(np.empty(0, np.int64), np.empty(0), np.empty(0))
    fields = ("cluster", "log_prob", "margin")
    return Assignment(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def agreement(a: Assignment, b: Assignment) -> float:
    """Fraction of rows given the same cluster by two assignments."""
    return float((a.cluster == b.cluster).mean()) if a.cluster.size else 1.0


# ---------------------------------------------------------------------------------------- shard job



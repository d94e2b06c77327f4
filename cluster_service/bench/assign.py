"""Assignment benchmark and the synthetic fitted models it (and the tests) score."""

from __future__ import annotations

import time

import numpy as np
import torch

from cluster_service.core.device import resolve_device
from cluster_service.serve.assign import (
    DEFAULT_TOP_M,
    Assignment,
    ShortlistAssigner,
    agreement,
    concat_assignments,
    exact_assign,
)
from cluster_service.serve.model import FittedModel


def synthetic_model(
    n_clusters: int,
    n_features: int,
    seed: int = 0,
    separation: float = 1.0,
    individuality: float = 0.5,
    version: str = "synthetic",
) -> FittedModel:
    """A FittedModel with known parameters (no training).

    Means ~ N(0, separation^2 I); covariance of cluster k = s_k ((1 - rho) S + rho W_k) scaled to
    trace ~d, where S is one shared anisotropic covariance (decaying spectrum, as real features
    have), W_k a cluster's own random Wishart shape, rho = `individuality` (1: shapes unrelated
    across clusters, the hard case for a shared-basis surrogate) and s_k log-normal; Dirichlet weights.
    """
    rng = np.random.default_rng(seed)
    K, d = n_clusters, n_features
    means = rng.normal(0.0, separation, size=(K, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    shared = (q * (1.0 / np.sqrt(np.arange(1, d + 1)))) @ q.T
    a = rng.normal(size=(K, d, d)) / np.sqrt(d)
    own = a @ np.swapaxes(a, 1, 2) + 0.3 * np.eye(d)
    own /= np.trace(own, axis1=1, axis2=2)[:, None, None]
    cov = (1.0 - individuality) * shared / np.trace(shared) + individuality * own
    cov *= (np.exp(rng.normal(0.0, 0.3, size=K)) * d / np.trace(cov, axis1=1, axis2=2))[:, None, None]
    weights = rng.dirichlet(np.full(K, 5.0))
    prior = {"alpha": 10.0, "kappa": 1e-4, "nu": d + 2.0, "mean": np.zeros(d), "psi": np.eye(d)}
    return FittedModel(np.log(weights), means, np.linalg.cholesky(cov), prior, version=version)


def sample_model(model: FittedModel, n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw points from the model's mixture: X (n, d) float32 and the component of each (n,) int64."""
    rng = np.random.default_rng(seed)
    z = rng.choice(model.n_clusters, size=n_samples, p=np.exp(model.log_weights))
    x = np.empty((n_samples, model.n_features), np.float32)
    for k in np.unique(z):
        rows = np.flatnonzero(z == k)
        x[rows] = model.means[k] + rng.normal(size=(rows.size, model.n_features)) @ model.chol[k].T
    return x, z.astype(np.int64)


def bench_assign(
    n_features: int = 128,
    n_clusters: int = 1000,
    n_rows: int = 20000,
    exact_rows: int = 2000,
    top_m: int = DEFAULT_TOP_M,
    device: str = "cpu",
    batch_size: int = 65536,
    seed: int = 0,
    separation: float = 0.5,
    individuality: float = 0.5,
) -> dict:
    """Rows/s of brute-force exact assignment vs FAISS shortlist + exact rescoring, and their agreement.

    Exact runs on the first `exact_rows` rows (it costs 2 K d^2 flops per row); the shortlist on all
    `n_rows`; agreement is measured on the rows both assigned. Returns a flat dict of figures."""
    model = synthetic_model(n_clusters, n_features, seed, separation, individuality)
    x, z = sample_model(model, n_rows, seed + 1)
    exact_rows = min(exact_rows, n_rows)
    dev = str(resolve_device(device))

    t0 = time.perf_counter()
    shortlist = ShortlistAssigner(model, top_m, dev)
    t_build = time.perf_counter() - t0
    shortlist(x[:256])  # warm-up
    t0 = time.perf_counter()
    fast = concat_assignments([shortlist(x[s : s + batch_size]) for s in range(0, n_rows, batch_size)])
    t_short = time.perf_counter() - t0

    exact_assign(model, x[:256], dev)  # warm-up
    t0 = time.perf_counter()
    exact = exact_assign(model, x[:exact_rows], dev)
    t_exact = time.perf_counter() - t0

    head = Assignment(fast.cluster[:exact_rows], fast.log_prob[:exact_rows], fast.margin[:exact_rows])
    return {
        "n_features": n_features, "n_clusters": n_clusters, "top_m": top_m, "device": dev,
        "separation": separation, "individuality": individuality,
        "torch_threads": torch.get_num_threads(), "index": shortlist.index.kind,
        "rows_exact": exact_rows, "rows_shortlist": n_rows,
        "exact_rows_per_s": exact_rows / t_exact, "shortlist_rows_per_s": n_rows / t_short,
        "speedup": (n_rows / t_short) / (exact_rows / t_exact),
        "shortlist_build_s": t_build,
        "agreement": agreement(head, exact),
        "exact_matches_truth": float((exact.cluster == z[:exact_rows]).mean()),
    }

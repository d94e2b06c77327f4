"""Single-process driver: data in, fitted model and per-epoch records out.

The distributed trainer runs the same `Engine` steps in every worker; this module is the
one-process sequencing of them (and what the distributed path is tested against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cluster_service.config import FitConfig
from cluster_service.engine import Engine, EpochRecord
from cluster_service.model import FittedModel, model_from_engine
from cluster_service.schedule import build_plan

EpochCallback = Callable[[EpochRecord, Engine], None]


@dataclass
class FitResult:
    model: FittedModel
    history: list[EpochRecord]
    clusters: np.ndarray  # (n,) int64 exact MAP assignment of the training rows
    log_prob: np.ndarray  # (n,) float64 log pi_k + log N(x; mu_k, Sigma_k) of that cluster
    engine: Engine

    @property
    def n_clusters(self) -> int:
        return self.model.n_clusters


def check_features(x: np.ndarray, source: str, min_rows: int = 2) -> np.ndarray:
    """Validate a feature matrix; the error names the source, the row and what was expected."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{source}: expected a 2-D array (n_samples, n_features), got shape {shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{source}: expected numeric features, got dtype {x.dtype}")
    n, d = x.shape
    if d < 1:
        raise ValueError(f"{source}: features have dimension 0")
    if n < min_rows:
        raise ValueError(f"{source}: {n} row(s); at least {min_rows} are needed")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{source}: {bad.size} row(s) contain NaN or Inf, first at row {int(bad[0])} "
            f"(rows {bad[:10].tolist()}{'...' if bad.size > 10 else ''})"
        )
    return x


def fit(
    x: np.ndarray | torch.Tensor,
    cfg: FitConfig | None = None,
    callbacks: Sequence[EpochCallback] = (),
    manifest_hash: str | None = None,
) -> FitResult:
    """Fit DeepDPM on x (n, d) in this process; K is inferred."""
    cfg = (cfg or FitConfig()).validate()
    x_np = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    check_features(x_np, "features", min_rows=max(2, cfg.k_init))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        engine = Engine(cfg, torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float64)))
        engine.initialize()
        history = run_schedule(engine, callbacks)
    clusters, log_prob = engine.assign()
    model = model_from_engine(engine, manifest_hash, tree=engine.cluster_tree(clusters))
    return FitResult(model, history, clusters, log_prob, engine)


def run_schedule(
    engine: Engine, callbacks: Sequence[EpochCallback] = (), stop_after: int | None = None
) -> list[EpochRecord]:
    """Run the planned epochs from engine.epoch on (a resumed engine continues where it was)."""
    history = []
    for row in build_plan(engine.cfg.schedule)[engine.epoch :]:
        if stop_after is not None and row.epoch >= stop_after:
            break
        rec = engine.run_epoch(row)
        history.append(rec)
        for cb in callbacks:
            cb(rec, engine)
    return history

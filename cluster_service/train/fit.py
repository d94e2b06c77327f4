"""Single-process driver: data in, fitted model and per-epoch records out.

The distributed trainer runs the same `Engine` steps in every worker; this module is the
one-process sequencing of them (and what the distributed path is tested against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from cluster_service.config import FitConfig
from cluster_service.core.schedule import build_plan
from cluster_service.io.checks import check_features
from cluster_service.serve.model import FittedModel
from cluster_service.train.engine import Engine, EpochRecord
from cluster_service.train.export import finish_fit

EpochCallback = Callable[[EpochRecord, Engine], None]


@dataclass
class FitResult:
    model: FittedModel
    history: list[EpochRecord]
    clusters: np.ndarray  # (n,) int64 exact MAP assignment of the training rows
    log_prob: np.ndarray  # (n,) float64 log pi_k + log N(x; mu_k, Sigma_k) of that cluster
    engine: Engine
    margin: np.ndarray  # (n,) float64 that log-joint minus the runner-up cluster's (+inf when K = 1)

    @property
    def n_clusters(self) -> int:
        return self.model.n_clusters


def fit(
    x: np.ndarray | torch.Tensor,
    cfg: FitConfig | None = None,
    callbacks: Sequence[EpochCallback] = (),
    manifest_hash: str | None = None,
    feature_space: dict | None = None,
) -> FitResult:
    """Fit DeepDPM on x (n, d) in this process; K is inferred."""
    cfg = (cfg or FitConfig()).validate()
    x_np = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    check_features(x_np, "features", min_rows=max(2, cfg.k_init))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # float32 or float64 rows as given (no float64 copy of float32 data); the engine centres in float64
        dtype = x_np.dtype if x_np.dtype in (np.float32, np.float64) else np.float64
        engine = Engine(cfg, torch.from_numpy(np.ascontiguousarray(x_np, dtype=dtype)))
        engine.initialize()
        history = run_schedule(engine, callbacks)
    model, clusters, log_prob, margin = finish_fit(engine, manifest_hash, feature_space)
    return FitResult(model, history, clusters, log_prob, engine, margin)


def run_schedule(
    engine: Engine, callbacks: Sequence[EpochCallback] = (), stop_after: int | None = None
) -> list[EpochRecord]:
    """Run the planned epochs from engine.epoch on (a resumed engine continues where it was)
    until the plan ends or the fit converges (engine.convergence, ScheduleConfig.stop_rounds).
    The last record's `stopped` says why the fit ended."""
    history = []
    plan = build_plan(engine.cfg.schedule)
    for planned in plan[engine.epoch :]:
        if stop_after is not None and planned.epoch >= stop_after:
            break
        row = engine.convergence.allows(planned)
        if row is None:
            break
        rec = engine.run_epoch(row)
        engine.convergence.observe(row, rec)
        if engine.convergence.done_after(rec.epoch) or rec.epoch + 1 == len(plan):
            rec = replace(rec, stopped=engine.convergence.why_stopped(rec.epoch, len(plan)))
        history.append(rec)
        for cb in callbacks:
            cb(rec, engine)
    return history
